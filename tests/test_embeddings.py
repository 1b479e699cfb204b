"""Textual-inversion embeddings through the engine on real tiny pipelines: a prompt word
equal to an embedding's file name loads it (A1111's rule), in the prompt and the negative
prompt, as diffusers' own `load_textual_inversion` does; bad files are `RequestError`s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdkit import conditioning, fast
from sdkit.adapters import short_hash
from sdkit.engine import Engine
from sdkit.request import Request, RequestError
from sdkit.schedulers import make_scheduler

KW = {"seed": 6, "num_inference_steps": 3, "guidance_scale": 7.5, "scheduler": "PNDM"}
STYLE = "a tinystyle circle on a blue background"


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(5)
    # A1111 .pt: two vectors; diffusers .safetensors: one
    a1111 = {"string_to_param": {"*": torch.randn(2, 32, generator=g)}, "name": "x", "step": 9}
    torch.save(a1111, folder / "tinystyle.pt")
    save_file({"tinyone": torch.randn(1, 32, generator=g)}, str(folder / "tinyone.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}}, folder / "widestyle.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, folder / "red.pt")
    (folder / "broken.pt").write_bytes(b"this is not a torch file")
    return folder


@pytest.fixture(scope="module")
def engine(tiny_models, embeddings):
    torch.set_num_threads(1)
    eng = Engine(tiny_models["sd"], device="cpu", embedding_dirs=[embeddings])
    yield eng
    eng.close()


def arr(result) -> np.ndarray:
    return np.asarray(result[0])


def diffusers_run(
    folder, prompt, tokens=(), negative=None, cls_name="StableDiffusionPipeline", **extra
):
    """A fresh diffusers pipeline with `load_textual_inversion(path, token=NAME)`."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    for path in tokens:
        pipe.load_textual_inversion(str(path), token=path.stem)
    pipe.scheduler = make_scheduler("PNDM", dict(pipe.scheduler.config))
    with torch.no_grad():
        out = pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=3,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(6)],
            **extra,
        ).images
    return np.asarray(out[0])


def test_prompt_word_loads_the_embedding_as_diffusers_does(engine, tiny_models, embeddings):
    assert {"tinystyle", "tinyone"} <= set(engine.info()["embeddings"])
    ours = engine.txt2img(STYLE, negative_prompt="tinyone, green", progress=False, **KW)
    theirs = diffusers_run(
        tiny_models["sd"],
        STYLE,
        [embeddings / "tinystyle.pt", embeddings / "tinyone.safetensors"],
        negative="tinyone, green",
        width=32,
        height=32,
    )
    assert np.array_equal(arr(ours), theirs)
    without = diffusers_run(
        tiny_models["sd"], STYLE, negative="tinyone, green", width=32, height=32
    )
    assert not np.array_equal(theirs, without)
    assert ours.request.extra["TI hashes"] == (
        f"tinystyle: {short_hash(embeddings / 'tinystyle.pt', 'embedding')}, "
        f"tinyone: {short_hash(embeddings / 'tinyone.safetensors', 'embedding')}"
    )


def test_weighted_multi_vector_embedding_takes_its_weight_on_both_vectors(engine):
    engine.txt2img(STYLE, progress=False, **KW)  # loaded
    pipe = engine.pipeline("txt2img")
    ids = pipe.tokenizer.convert_tokens_to_ids(["tinystyle", "tinystyle_1"])
    chunk = conditioning.chunks(pipe.tokenizer, "a (tinystyle:1.3) circle", pipe)[0]
    weights = {t: w for t, w in zip(chunk.tokens, chunk.weights, strict=True)}
    assert weights[ids[0]] == weights[ids[1]] == 1.3
    plain = engine.txt2img(STYLE, progress=False, **KW)
    weighted = engine.txt2img("a (tinystyle:1.3) circle on a blue background", progress=False, **KW)
    edited = engine.txt2img(
        "a [tinystyle:green:0.5] circle on a blue background", progress=False, **KW
    )
    assert not np.array_equal(arr(plain), arr(weighted))
    assert not np.array_equal(arr(plain), arr(edited))


def test_every_mode_sees_the_embedding(engine, tiny_models, embeddings):
    import diffusers

    image = Image.new("RGB", (32, 32), (20, 200, 40))
    base = engine.pipeline("txt2img")
    for mode in ("img2img", "inpaint"):
        assert engine.pipeline(mode).tokenizer is base.tokenizer
        assert engine.pipeline(mode).text_encoder is base.text_encoder
    ours = engine.img2img(image, STYLE, strength=0.8, progress=False, **KW)
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_models["sd"]))
    fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32)  # as every engine does
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(embeddings / "tinystyle.pt"), token="tinystyle")
    pipe.scheduler = make_scheduler("PNDM", dict(pipe.scheduler.config))
    with torch.no_grad():
        theirs = pipe(
            STYLE,
            image=image,
            strength=0.8,
            num_inference_steps=3,
            guidance_scale=7.5,
            generator=[torch.Generator().manual_seed(6)],
        ).images[0]
    assert np.array_equal(arr(ours), np.asarray(theirs))


def test_prompt_without_the_word_is_unchanged(engine, tiny_models):
    engine.txt2img(STYLE, progress=False, **KW)
    prompt = "a yellow circle on a blue background"  # ("red" would call red.pt)
    after = engine.txt2img(prompt, progress=False, **KW)
    assert np.array_equal(arr(after), diffusers_run(tiny_models["sd"], prompt, width=32, height=32))
    assert "TI hashes" not in after.request.extra


def check_error(engine, **fields) -> RequestError:
    with pytest.raises(RequestError) as err:
        engine.check(Request(**{"prompt": "a circle", **fields}))
    return err.value


def test_bad_embeddings_name_the_file(engine, tiny_models):
    err = check_error(engine, prompt="a widestyle circle")
    assert err.field == "prompt" and "widestyle.pt" in str(err) and "64" in str(err)
    err = check_error(engine, negative_prompt="broken")
    assert err.field == "negative_prompt" and "broken.pt" in str(err)
    err = check_error(engine, prompt="a red circle")
    assert "red.pt" in str(err) and "rename" in str(err)
    prompt = "a green circle on a blue background"
    ours = engine.txt2img(prompt, progress=False, **KW)  # the engine goes on
    assert np.array_equal(arr(ours), diffusers_run(tiny_models["sd"], prompt, width=32, height=32))


def test_hash_from_an_a1111_png_must_match(engine, embeddings):
    actual = short_hash(embeddings / "tinystyle.pt", "embedding")
    err = check_error(engine, prompt=STYLE, extra={"TI hashes": "tinystyle: abcdefabcdef"})
    assert "'tinystyle'" in str(err) and actual in str(err)
    ok = engine.check(Request(prompt=STYLE, extra={"TI hashes": f"tinystyle: {actual}"}))
    assert ok.extra["TI hashes"] == f"tinystyle: {actual}"


# ------------------------------------------------------------------ the embedded model


@pytest.mark.slow
def test_embedded_model_uses_the_shipped_embedding_in_both_prompts():
    from benchmarks import adapters_eval as ev
    from sdkit.embedded.train_adapters import ADAPTERS_DIR, TI_NAME

    torch.set_num_threads(1)
    prompt = f"a {TI_NAME} circle on a yellow background"
    negative = f"{TI_NAME}, blurry"
    kw = {"seed": 50_002, "num_inference_steps": 6}
    eng = Engine(None, device="cpu")
    try:
        assert TI_NAME in eng.info()["embeddings"]
        ours = eng.txt2img(prompt, progress=False, **kw)
        ours_neg = eng.txt2img(
            "a red circle on a yellow background", negative_prompt=negative, progress=False, **kw
        )
    finally:
        eng.close()

    def theirs(pipe, p, n=None):
        d = pipe.sdkit_defaults
        with torch.no_grad():
            return np.asarray(
                pipe(
                    p,
                    negative_prompt=n,
                    num_inference_steps=6,
                    guidance_scale=d["guidance_scale"],
                    width=d["width"],
                    height=d["height"],
                    generator=[torch.Generator().manual_seed(50_002)],
                ).images[0]
            )

    def load():  # as every engine runs it (sdkit.fast's speed options)
        pipe = ev.load_pipeline()
        fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32)
        return pipe

    plain = load()
    raw = theirs(plain, prompt), theirs(plain, "a red circle on a yellow background", negative)
    with_ti = load()
    with_ti.load_textual_inversion(str(ADAPTERS_DIR / f"{TI_NAME}.pt"), token=TI_NAME)
    want = theirs(with_ti, prompt), theirs(with_ti, "a red circle on a yellow background", negative)
    assert np.array_equal(arr(ours), want[0]) and np.array_equal(arr(ours_neg), want[1])
    assert not np.array_equal(want[0], raw[0]) and not np.array_equal(want[1], raw[1])


def test_multi_vector_embedding_counts_as_its_vectors_for_chunking(engine):
    """74 words + a 2-vector embedding = 76 tokens: A1111 makes two chunks; diffusers' own
    path would cut the last token, so these prompts go through our encoder."""
    engine.txt2img(STYLE, progress=False, **KW)  # loaded
    pipe = engine.pipeline("txt2img")
    words = " ".join(["circle"] * 74)
    assert not conditioning.needs_embeds(pipe, f"{words} blue", "", 3, 1)  # 75 tokens
    assert conditioning.needs_embeds(pipe, f"{words} tinystyle", "", 3, 1)
    assert len(conditioning.chunks(pipe.tokenizer, f"{words} tinystyle", pipe)) == 2


def test_sdxl_embedding_loads_into_both_text_encoders(tiny_models, tmp_path):
    import diffusers

    g = torch.Generator().manual_seed(8)
    vectors = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}
    save_file(vectors, str(tmp_path / "xlstyle.safetensors"))
    eng = Engine(tiny_models["sdxl"], device="cpu", embedding_dirs=[tmp_path])
    prompt = "a xlstyle circle on a blue background"
    try:
        ours = eng.txt2img(prompt, progress=False, **KW)
    finally:
        eng.close()
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_models["sdxl"]))
    fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for key, encoder, tokenizer in (
        ("clip_l", pipe.text_encoder, pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        pipe.load_textual_inversion(
            vectors[key], token="xlstyle", text_encoder=encoder, tokenizer=tokenizer
        )
    pipe.scheduler = make_scheduler("PNDM", dict(pipe.scheduler.config))
    with torch.no_grad():
        theirs = pipe(
            prompt,
            num_inference_steps=3,
            guidance_scale=7.5,
            width=32,
            height=32,
            generator=[torch.Generator().manual_seed(6)],
        ).images[0]
    assert np.array_equal(arr(ours), np.asarray(theirs))
    assert "xlstyle: " in ours.request.extra["TI hashes"]


def test_embedding_named_by_ti_hashes_but_missing_is_an_error(engine, embeddings):
    """A1111 PNG: `TI hashes` say the word was an embedding; without its file the job would
    read it as a plain word, so it is an error naming it and the folders searched."""
    err = check_error(
        engine, prompt="a lostone circle", extra={"TI hashes": "lostone: 0123456789ab"}
    )
    assert err.field == "prompt" and "'lostone'" in str(err) and str(embeddings) in str(err)
    # a name the prompts do not use is dropped with the rest of the stale entry
    ok = engine.check(Request(prompt="a circle", extra={"TI hashes": "other: 0123456789ab"}))
    assert "TI hashes" not in ok.extra
