"""LoRA through the engine on real tiny pipelines: the same pictures as diffusers' own
`load_lora_weights` + `set_adapters`, nothing left behind after a job, files read and
injected once, and every bad LoRA a `RequestError` naming it (the engine stays usable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdkit.adapters import short_hash
from sdkit.engine import Engine
from sdkit.request import Request, RequestError
from sdkit.schedulers import make_scheduler

PROMPT = "a red circle on a blue background"
KW = {"seed": 4, "num_inference_steps": 3, "guidance_scale": 7.5, "scheduler": "PNDM"}


def kohya_lora(pipe, path: Path, *, seed: int, te: bool = True, rank: int = 4) -> Path:
    """A kohya-format LoRA (as A1111 users download them) on every attention projection of
    the UNet and, with `te`, every text-encoder projection and MLP: random, small weights."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(prefix: str, name: str, module) -> None:
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(float(rank) / 2)

    for name, module in pipe.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            add("lora_unet_", name, module)
    if te:
        for name, module in pipe.text_encoder.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
                add(
                    "lora_te_",
                    name if name.startswith("text_model.") else f"text_model.{name}",
                    module,
                )
    save_file(sd, str(path))
    return path


def peft_lora(folder: Path, path: Path, *, cls_name: str = "StableDiffusionPipeline") -> Path:
    """A diffusers/PEFT-format LoRA (`save_lora_weights`) trained-looking: random A and B."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cls = getattr(diffusers, cls_name)
    pipe = cls.from_pretrained(str(folder))
    torch.manual_seed(11)
    unet_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    pipe.unet.add_adapter(unet_cfg)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if cls_name == "StableDiffusionPipeline":
        te_cfg = LoraConfig(
            r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
        )
        pipe.text_encoder.add_adapter(te_cfg)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
    cls.save_lora_weights(str(path.parent), weight_name=path.name, **layers)
    return path


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory) -> Path:
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("loras")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
    kohya_lora(pipe, folder / "kohya_a.safetensors", seed=1)
    kohya_lora(pipe, folder / "kohya_b.safetensors", seed=2, te=False)
    peft_lora(tiny_models["sd"], folder / "peft_c.safetensors")
    good = (folder / "kohya_a.safetensors").read_bytes()
    (folder / "corrupt.safetensors").write_bytes(good[: len(good) // 2])
    # passes the header checks, but its text-encoder part does not fit: the UNet part
    # loads first, then the load fails (what must not stay behind)
    bad = kohya_lora(pipe, folder / "bad_te.safetensors", seed=3)
    from safetensors.torch import load_file

    sd = load_file(str(bad))
    key = next(k for k in sd if k.startswith("lora_te_") and k.endswith("lora_up.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    save_file(sd, str(bad))
    # an SDXL LoRA's keys (two text encoders, 2048-wide cross-attention)
    sdxl = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(
            4, 768
        ),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(
            4, 2048
        ),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(
            640, 4
        ),
    }
    save_file(sdxl, str(folder / "xl_style.safetensors"))
    save_file({"conv.weight": torch.ones(3)}, str(folder / "not_a_lora.safetensors"))
    return folder


@pytest.fixture(scope="module")
def engine(tiny_models, loras):
    torch.set_num_threads(1)
    eng = Engine(tiny_models["sd"], device="cpu", lora_dirs=[loras])
    yield eng
    eng.close()


def arr(result) -> np.ndarray:
    return np.asarray(result[0])


def as_engine_runs(pipe):
    """The speed options every engine applies to its model (`sdkit.fast`: channels-last
    UNet on the CPU). Plain outputs do not change with them; a LoRA's extra matmuls on the
    channels-last activations round differently (UNet outputs ~1e-6 apart), so the diffusers
    reference runs with them too."""
    from sdkit import fast

    fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32)
    return pipe


def diffusers_txt2img(folder, prompt, adapters=(), cls_name="StableDiffusionPipeline", **extra):
    """What a diffusers user writes: a fresh pipeline, `load_lora_weights` + `set_adapters`."""
    import diffusers

    pipe = as_engine_runs(getattr(diffusers, cls_name).from_pretrained(str(folder)))
    pipe.set_progress_bar_config(disable=True)
    names = []
    for path, _weight in adapters:
        pipe.load_lora_weights(str(path), adapter_name=path.stem)
        names.append(path.stem)
    if names:
        pipe.set_adapters(names, [w for _, w in adapters])
    pipe.scheduler = make_scheduler("PNDM", dict(pipe.scheduler.config))
    with torch.no_grad():
        out = pipe(
            prompt,
            num_inference_steps=KW["num_inference_steps"],
            guidance_scale=KW["guidance_scale"],
            width=32,
            height=32,
            generator=[torch.Generator().manual_seed(KW["seed"])],
            **extra,
        ).images
    return np.asarray(out[0])


def run(engine, prompt=PROMPT, **fields):
    return engine.txt2img(prompt, progress=False, **{**KW, **fields})


# ------------------------------------------------------------------ same as diffusers


@pytest.mark.parametrize("name", ["kohya_a", "peft_c"])
def test_lora_output_equals_diffusers_own_loader(engine, tiny_models, loras, name):
    ours = run(engine, f"{PROMPT} <lora:{name}:0.7>")
    theirs = diffusers_txt2img(
        tiny_models["sd"], f"{PROMPT} ", [(loras / f"{name}.safetensors", 0.7)]
    )
    assert np.array_equal(arr(ours), theirs)
    assert not np.array_equal(theirs, diffusers_txt2img(tiny_models["sd"], PROMPT))


def test_field_and_tag_are_the_same_lora(engine):
    by_tag = run(engine, f"{PROMPT}<lora:kohya_a:0.5>")
    by_field = run(engine, PROMPT, loras=[{"name": "kohya_a", "weight": 0.5}])
    assert np.array_equal(arr(by_tag), arr(by_field))


def test_several_loras_with_their_weights(engine, tiny_models, loras):
    ours = run(engine, f"{PROMPT} <lora:kohya_a:0.6>", loras=[{"name": "kohya_b", "weight": 1.3}])
    theirs = diffusers_txt2img(
        tiny_models["sd"],
        f"{PROMPT} ",
        [(loras / "kohya_a.safetensors", 0.6), (loras / "kohya_b.safetensors", 1.3)],
    )
    assert np.array_equal(arr(ours), theirs)
    assert ours.request.extra["Lora hashes"] == (
        f"kohya_a: {short_hash(loras / 'kohya_a.safetensors', 'lora')}, "
        f"kohya_b: {short_hash(loras / 'kohya_b.safetensors', 'lora')}"
    )


def test_img2img_pipeline_sees_the_lora(engine, tiny_models, loras):
    import diffusers
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 40))
    assert engine.pipeline("img2img").unet is engine.pipeline("txt2img").unet
    ours = engine.img2img(
        image,
        PROMPT,
        strength=0.7,
        progress=False,
        loras=[{"name": "kohya_a", "weight": 1.0}],
        **KW,
    )
    pipe = as_engine_runs(
        diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_models["sd"]))
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras / "kohya_a.safetensors"), adapter_name="a")
    pipe.set_adapters(["a"], [1.0])
    pipe.scheduler = make_scheduler("PNDM", dict(pipe.scheduler.config))
    with torch.no_grad():
        theirs = pipe(
            PROMPT,
            image=image,
            strength=0.7,
            num_inference_steps=3,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(4)],
        ).images[0]
    assert np.array_equal(arr(ours), np.asarray(theirs))


def test_sdxl_lora_equals_diffusers_own_loader(tiny_models, tmp_path):
    path = peft_lora(
        tiny_models["sdxl"], tmp_path / "xl.safetensors", cls_name="StableDiffusionXLPipeline"
    )
    eng = Engine(tiny_models["sdxl"], device="cpu", lora_dirs=[tmp_path])
    try:
        ours = run(eng, f"{PROMPT}<lora:xl:0.8>")
        plain_after = run(eng)
    finally:
        eng.close()
    theirs = diffusers_txt2img(
        tiny_models["sdxl"], PROMPT, [(path, 0.8)], cls_name="StableDiffusionXLPipeline"
    )
    assert np.array_equal(arr(ours), theirs)
    plain = diffusers_txt2img(tiny_models["sdxl"], PROMPT, cls_name="StableDiffusionXLPipeline")
    assert np.array_equal(arr(plain_after), plain)


# ------------------------------------------------------------------ nothing leaks, cache


def test_job_without_lora_after_one_with_lora_is_a_fresh_engines(engine, tiny_models):
    run(engine, f"{PROMPT} <lora:kohya_a:1.2>", loras=[{"name": "peft_c", "weight": 0.4}])
    after = run(engine)
    fresh = Engine(tiny_models["sd"], device="cpu")
    try:
        assert np.array_equal(arr(after), arr(run(fresh)))
    finally:
        fresh.close()
    assert np.array_equal(arr(after), diffusers_txt2img(tiny_models["sd"], PROMPT))
    assert "Lora hashes" not in after.request.extra


def test_second_job_neither_rereads_nor_reinjects(engine):
    state = engine._adapter_state
    first = run(engine, f"{PROMPT} <lora:kohya_b:1>")
    reads, injections = state.file_reads, state.injections
    again = run(engine, f"{PROMPT} <lora:kohya_b:1>")
    other_weight = run(engine, f"{PROMPT} <lora:kohya_b:0.3>")
    assert (state.file_reads, state.injections) == (reads, injections)
    assert np.array_equal(arr(first), arr(again))
    assert not np.array_equal(arr(first), arr(other_weight))


def test_evicted_adapter_reloads_from_the_cached_file(engine):
    state = engine._adapter_state
    before = run(engine, f"{PROMPT} <lora:kohya_a:1>")
    old = state.max_loaded
    state.max_loaded = 1
    try:
        run(engine, f"{PROMPT} <lora:kohya_b:1>")  # evicts kohya_a
        assert len(state.loaded) == 1
        reads, injections = state.file_reads, state.injections
        again = run(engine, f"{PROMPT} <lora:kohya_a:1>")
        assert (state.file_reads, state.injections) == (reads, injections + 1)
    finally:
        state.max_loaded = old
    assert np.array_equal(arr(before), arr(again))


# ------------------------------------------------------------------ bad LoRAs


def check_error(engine, prompt=PROMPT, **fields) -> RequestError:
    with pytest.raises(RequestError) as err:
        engine.check(Request(prompt=prompt, **fields))
    return err.value


def test_unknown_name_lists_the_folders(engine, loras):
    err = check_error(engine, f"{PROMPT} <lora:nowhere:1>")
    assert err.field == "prompt" and "'nowhere'" in str(err) and str(loras) in str(err)
    err = check_error(engine, loras=[{"name": "nowhere", "weight": 1}])
    assert err.field == "loras" and str(loras) in str(err)


def test_lora_of_another_family_names_the_file_and_both(engine, loras):
    err = check_error(engine, f"{PROMPT} <lora:xl_style:1>")
    assert "xl_style.safetensors" in str(err) and "SDXL" in str(err) and "SD 1.x" in str(err)


def test_lora_of_another_width_is_refused(tiny_models, tmp_path):
    peft_lora(
        tiny_models["sdxl"], tmp_path / "xl.safetensors", cls_name="StableDiffusionXLPipeline"
    )
    eng = Engine(tiny_models["sd"], device="cpu", lora_dirs=[tmp_path])
    try:
        err = check_error(eng, loras=[{"name": "xl", "weight": 1}])
    finally:
        eng.close()
    assert "xl.safetensors" in str(err) and "width 64" in str(err) and "32" in str(err)


@pytest.mark.parametrize("name", ["corrupt", "not_a_lora"])
def test_unreadable_file_names_it_and_the_engine_goes_on(engine, tiny_models, name):
    err = check_error(engine, f"{PROMPT} <lora:{name}:1>")
    assert f"{name}.safetensors" in str(err)
    assert np.array_equal(arr(run(engine)), diffusers_txt2img(tiny_models["sd"], PROMPT))


def test_failed_load_leaves_nothing_behind(engine, tiny_models, loras):
    engine.check(Request(prompt=f"{PROMPT} <lora:bad_te:1>"))  # its header is fine
    job = engine.submit(Request(prompt=f"{PROMPT} <lora:bad_te:1>", **KW))
    with pytest.raises(RequestError, match="bad_te.safetensors"):
        job.result()
    base = engine.pipeline("txt2img")
    for component in (base.unet, base.text_encoder):
        for module in component.modules():
            assert not any(k.startswith("bad_te") for k in getattr(module, "lora_A", {}))
        assert not any(k.startswith("bad_te") for k in getattr(component, "peft_config", {}))
    assert np.array_equal(arr(run(engine)), diffusers_txt2img(tiny_models["sd"], PROMPT))
    ours = run(engine, f"{PROMPT} <lora:kohya_a:0.7>")
    theirs = diffusers_txt2img(
        tiny_models["sd"], f"{PROMPT} ", [(loras / "kohya_a.safetensors", 0.7)]
    )
    assert np.array_equal(arr(ours), theirs)


def test_hash_from_an_a1111_png_must_match(engine, loras):
    actual = short_hash(loras / "kohya_a.safetensors", "lora")
    err = check_error(
        engine, f"{PROMPT} <lora:kohya_a:1>", extra={"Lora hashes": "kohya_a: 0123456789ab"}
    )
    assert "'kohya_a'" in str(err) and actual in str(err) and "0123456789ab" in str(err)
    ok = engine.check(
        Request(prompt=f"{PROMPT} <lora:kohya_a:1>", extra={"Lora hashes": f"kohya_a: {actual}"})
    )
    assert ok.extra["Lora hashes"] == f"kohya_a: {actual}"
    # a stale entry for a LoRA the job does not use is dropped, not written back
    assert (
        "Lora hashes"
        not in engine.check(
            Request(prompt=PROMPT, extra={"Lora hashes": "other: 0123456789ab"})
        ).extra
    )


@pytest.mark.parametrize(
    ("prompt", "fields", "words"),
    [
        (f"{PROMPT} <lora:kohya_a:1>", {"loras": [{"name": "kohya_a", "weight": 1}]}, "twice"),
        (f"{PROMPT} <lora:kohya_a:-1>", {}, "0..4"),
        (f"{PROMPT} <lora:kohya_a:40>", {}, "0..4"),
        (f"{PROMPT} <lora:kohya_a:x>", {}, "not a number"),
    ],
)
def test_bad_tags_and_duplicates(engine, prompt, fields, words):
    assert words in str(check_error(engine, prompt, **fields))


def test_info_lists_names_only(engine, loras):
    info = engine.info()
    assert {"kohya_a", "kohya_b", "peft_c"} <= set(info["loras"])
    assert str(loras) not in str(info)
    assert info["embeddings"] == [] and info["controls"] == []


# ------------------------------------------------------------------ the embedded model


@pytest.mark.slow
def test_embedded_model_with_the_shipped_lora(tmp_path):
    from benchmarks import adapters_eval as ev
    from sdkit.embedded.train_adapters import ADAPTERS_DIR, LORA_NAME

    torch.set_num_threads(1)
    eng = Engine(None, device="cpu")
    prompt = "a red x on a blue background"
    kw = {"seed": 50_001, "num_inference_steps": 6}
    try:
        assert LORA_NAME in eng.info()["loras"]
        plain = eng.txt2img(prompt, progress=False, **kw)
        with_lora = eng.txt2img(f"{prompt} <lora:{LORA_NAME}:1>", progress=False, **kw)
        after = eng.txt2img(prompt, progress=False, **kw)
    finally:
        eng.close()
    assert not np.array_equal(arr(plain), arr(with_lora))
    assert np.array_equal(arr(plain), arr(after))
    pipe = as_engine_runs(ev.load_pipeline())
    pipe.load_lora_weights(str(ADAPTERS_DIR / f"{LORA_NAME}.safetensors"), adapter_name="x")
    pipe.set_adapters(["x"], [1.0])
    d = pipe.sdkit_defaults
    with torch.no_grad():
        theirs = pipe(
            f"{prompt} ",
            num_inference_steps=6,
            guidance_scale=d["guidance_scale"],
            width=d["width"],
            height=d["height"],
            generator=[torch.Generator().manual_seed(50_001)],
        ).images[0]
    assert np.array_equal(arr(with_lora), np.asarray(theirs))


def test_benchmark_times_first_load_and_cached_switch(engine):
    from benchmarks.prompts import lora_times

    times = lora_times(engine, "kohya_b", rounds=1)
    assert times is not None and times.pop("name") == "kohya_b"
    assert set(times) == {
        "first load",
        "cached switch",
        "reload from cached file",
        "restore after job",
    }
    assert all(t > 0 for t in times.values())
    base = engine.pipeline("txt2img")
    assert not any(  # the benchmark's adapters are gone again
        k.startswith("kohya_b_") and k not in engine._adapter_state.loaded
        for k in getattr(base.unet, "peft_config", {})
    )


def test_a1111_infotext_runs_with_its_lora_and_writes_its_hashes_back(engine, loras):
    actual = short_hash(loras / "kohya_a.safetensors", "lora")
    text = (
        f"{PROMPT} <lora:kohya_a:0.7>\n"
        f'Steps: 3, Sampler: PNDM, CFG scale: 7.5, Seed: 4, Size: 32x32, Lora hashes: "kohya_a: {actual}"'
    )
    req = Request.from_infotext(text)
    assert req.extra["Lora hashes"] == f"kohya_a: {actual}"
    result = engine.generate(req, progress=False)
    assert np.array_equal(arr(result), arr(run(engine, f"{PROMPT} <lora:kohya_a:0.7>")))
    written = result.request.to_infotext()
    assert f'Lora hashes: "kohya_a: {actual}"' in written
    assert Request.from_infotext(written).extra["Lora hashes"] == f"kohya_a: {actual}"
    with pytest.raises(RequestError, match="kohya_a"):
        engine.generate(Request.from_infotext(text.replace(actual, "ffffffffffff")), progress=False)
