"""A1111-style conditioning on tiny real pipelines: chunks, weights, clip skip, SDXL, editing."""

from __future__ import annotations

import pytest
import torch

from sdkit import conditioning
from sdkit.conditioning import CHUNK, chunks, encode, encode_prompt, prompt_kwargs


@pytest.fixture(scope="module")
def sd(tiny_models):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_models["sd"]))


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_models["sdxl"]))


def _words(n: int) -> str:
    words = "red green blue yellow white black orange purple circle square".split()
    return " ".join(words[i % len(words)] for i in range(n))


# ------------------------------------------------------------------ plain prompts: diffusers


def test_plain_prompt_is_bit_identical_to_diffusers_sd(sd):
    ours = encode(sd, "a red circle", "blue", steps=4)
    pos, neg = sd.encode_prompt("a red circle", "cpu", 1, True, "blue")
    assert torch.equal(ours.positive.embeds, pos)
    assert torch.equal(ours.negative.embeds, neg)


def test_plain_prompt_is_bit_identical_to_diffusers_sdxl(sdxl):
    ours = encode(sdxl, "a red circle", "blue", steps=4)
    pos, neg, pooled, neg_pooled = sdxl.encode_prompt(
        "a red circle", device="cpu", negative_prompt="blue"
    )
    assert torch.equal(ours.positive.embeds, pos)
    assert torch.equal(ours.negative.embeds, neg)
    assert torch.equal(ours.positive.pooled, pooled)
    assert torch.equal(ours.negative.pooled, neg_pooled)


def test_sdxl_empty_negative_is_zeros_like_diffusers(sdxl):
    ours = encode(sdxl, "(red) circle", "", steps=4)
    assert sdxl.config.force_zeros_for_empty_prompt
    assert not ours.negative.embeds.any() and not ours.negative.pooled.any()
    assert ours.negative.embeds.shape == ours.positive.embeds.shape


def test_plain_prompts_take_diffusers_own_path(sd):
    cb = object()
    assert prompt_kwargs(sd, "a red circle", "", steps=4, callback=cb) == {
        "prompt": "a red circle",
        "negative_prompt": None,
        "callback_on_step_end": cb,
    }
    weighted = prompt_kwargs(sd, "a (red) circle", "", steps=4)
    assert "prompt" not in weighted and weighted["prompt_embeds"].shape == (1, 77, 32)
    assert "prompt_embeds" in prompt_kwargs(sd, "a red circle", "", steps=4, clip_skip=2)
    assert "prompt_embeds" in prompt_kwargs(sd, _words(80), "", steps=4)  # > 75 tokens
    assert "prompt_embeds" in prompt_kwargs(sd, "a red circle", "[blue|green]", steps=4)


# ------------------------------------------------------------------ chunks


def test_chunks_of_75_with_bos_eos_and_padding(sd):
    tok = sd.tokenizer
    got = chunks(tok, _words(100))
    assert len(got) == 2 and all(len(c.tokens) == CHUNK + 2 for c in got)
    ids = tok(_words(100), add_special_tokens=False)["input_ids"]
    assert got[0].tokens == [tok.bos_token_id, *ids[:75], tok.eos_token_id]
    assert got[1].tokens == [tok.bos_token_id, *ids[75:], *[tok.eos_token_id] * 51]
    assert chunks(tok, "")[0].tokens == [tok.bos_token_id] + [tok.eos_token_id] * 76


def test_break_starts_a_new_chunk(sd):
    tok = sd.tokenizer
    got = chunks(tok, "red circle BREAK blue square")
    assert len(got) == 2
    red, blue = (tok(w, add_special_tokens=False)["input_ids"] for w in ("red", "blue"))
    assert got[0].tokens[1] == red[0] and got[1].tokens[1] == blue[0]
    assert len(chunks(tok, "red circle BREAK")) == 1  # nothing after it: no empty chunk


def test_a_full_chunk_backs_off_to_a_comma_within_20_tokens(sd):
    tok = sd.tokenizer
    text = _words(60) + ", " + _words(30)  # comma is token 61; the chunk fills at 75
    got = chunks(tok, text)
    comma = tok.get_vocab()[",</w>"]
    assert got[0].tokens[61] == comma and got[0].tokens[62:] == [tok.eos_token_id] * 15
    assert len(got[1].tokens) == 77 and got[1].tokens[1] != tok.eos_token_id
    far = chunks(tok, _words(40) + ", " + _words(50))  # comma 35 tokens back: hard split
    assert far[0].tokens[76] == tok.eos_token_id and far[0].tokens[75] != tok.eos_token_id


def test_long_prompt_is_encoded_chunk_by_chunk(sd):
    got = encode_prompt(sd, _words(100), 4).embeds
    assert got.shape == (1, 154, 32)
    for i, chunk in enumerate(chunks(sd.tokenizer, _words(100))):
        alone = sd.text_encoder(torch.tensor([chunk.tokens]))[0]
        assert torch.allclose(got[:, 77 * i : 77 * (i + 1)], alone, atol=1e-6)


def test_negative_is_padded_with_empty_prompt_chunks(sd):
    got = encode(sd, _words(100), "blue", steps=4)
    assert got.positive.embeds.shape == got.negative.embeds.shape == (1, 154, 32)
    empty = encode_prompt(sd, "", 4).embeds
    assert torch.equal(got.negative.embeds[:, 77:], empty)
    assert torch.equal(got.negative.embeds[:, :77], encode_prompt(sd, "blue", 4).embeds)


def test_positive_is_padded_when_the_negative_is_longer(sd):
    got = encode(sd, "red", _words(100), steps=4)
    assert got.positive.embeds.shape == (1, 154, 32)
    assert torch.equal(got.positive.embeds[:, 77:], encode_prompt(sd, "", 4).embeds)


# ------------------------------------------------------------------ weights


def test_weights_scale_tokens_then_restore_the_chunk_mean(sd):
    tok = sd.tokenizer
    ids = [tok.bos_token_id, *tok("red circle", add_special_tokens=False)["input_ids"]]
    ids += [tok.eos_token_id] * (77 - len(ids))
    z = sd.text_encoder(torch.tensor([ids]))[0]
    w = torch.ones(77)
    w[1] = 1.5
    want = z * w[None, :, None]
    want = want * (z.mean() / want.mean())
    got = encode_prompt(sd, "(red:1.5) circle", 4).embeds
    assert torch.allclose(got, want, atol=1e-6)
    assert got.mean().item() == pytest.approx(z.mean().item(), abs=1e-6)
    assert not torch.allclose(got, z)


# ------------------------------------------------------------------ clip skip


def test_clip_skip_2_is_penultimate_state_then_final_layer_norm(sd):
    te = sd.text_encoder
    ids = torch.tensor([chunks(sd.tokenizer, "a red circle")[0].tokens])
    out = te(ids, output_hidden_states=True)
    want = te.final_layer_norm(out.hidden_states[-2])
    got = encode_prompt(sd, "a red circle", 4, clip_skip=2).embeds
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(encode_prompt(sd, "a red circle", 4, clip_skip=1).embeds, out[0])
    assert not torch.allclose(got, out[0])


def test_clip_skip_applies_to_sd1_only_as_in_a1111(sd, sdxl):
    assert conditioning.effective_clip_skip(sd, 2) == 2
    assert conditioning.effective_clip_skip(sd, None) == 1
    assert conditioning.effective_clip_skip(sd, 2, family="sd2") == 1
    assert conditioning.effective_clip_skip(sdxl, 2) == 1
    assert prompt_kwargs(sdxl, "a red circle", "", steps=4, clip_skip=2)["prompt"] == "a red circle"


def test_sdxl_clip_skip_and_pooled_from_second_encoder_first_chunk(sdxl):
    got = encode_prompt(sdxl, _words(100), 4, clip_skip=2)
    assert got.embeds.shape == (1, 154, 64)
    first = torch.tensor([chunks(sdxl.tokenizer_2, _words(100))[0].tokens])
    out1 = sdxl.text_encoder(first, output_hidden_states=True)
    out2 = sdxl.text_encoder_2(first, output_hidden_states=True)
    want = torch.cat([out1.hidden_states[-3], out2.hidden_states[-3]], dim=-1)
    assert torch.allclose(got.embeds[:, :77], want, atol=1e-6)
    assert torch.allclose(got.pooled, out2.text_embeds, atol=1e-6)


# ------------------------------------------------------------------ editing in the loop


def _unet_conditions(pipe, **call) -> list[torch.Tensor]:
    """The encoder_hidden_states the UNet saw at each call."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**call, num_inference_steps=4, output_type="latent", width=32, height=32)
    finally:
        handle.remove()
    return seen


@pytest.fixture
def euler(sd):
    from diffusers import EulerDiscreteScheduler

    old = sd.scheduler
    sd.scheduler = EulerDiscreteScheduler.from_config(old.config)
    yield sd
    sd.scheduler = old


@pytest.mark.parametrize(
    ("prompt", "texts"),
    [
        # A1111: entry k is used at 0-based step i while i <= its end step
        ("a [red:blue:2] circle", ["a red circle"] * 3 + ["a blue circle"]),
        ("a [red|blue] circle", ["a red circle"] * 2 + ["a blue circle", "a red circle"]),
        ("a [red:blue:0.5] circle", ["a red circle"] * 3 + ["a blue circle"]),
    ],
)
def test_prompt_editing_switches_the_conditioning_at_the_right_step(euler, prompt, texts):
    pipe = euler
    kwargs = prompt_kwargs(pipe, prompt, "green", steps=4)
    seen = _unet_conditions(pipe, **kwargs, generator=torch.Generator().manual_seed(1))
    assert len(seen) == 4
    negative = encode_prompt(pipe, "green", 4).embeds
    for step, (cond, text) in enumerate(zip(seen, texts, strict=True)):
        assert cond.shape[0] == 2  # CFG: negative, positive
        assert torch.allclose(cond[0], negative[0], atol=1e-5)
        want = encode_prompt(pipe, text, 4).embeds[0]
        assert torch.allclose(cond[1], want, atol=1e-5), f"step {step}: expected {text!r}"


def test_negative_prompt_editing_switches_the_negative_half(euler):
    pipe = euler
    kwargs = prompt_kwargs(pipe, "a red circle", "[green:yellow:2]", steps=4)
    seen = _unet_conditions(pipe, **kwargs, generator=torch.Generator().manual_seed(1))
    green, yellow = (encode_prompt(pipe, t, 4).embeds[0] for t in ("green", "yellow"))
    for cond, want in zip(seen, [green, green, green, yellow], strict=True):
        assert torch.allclose(cond[0], want, atol=1e-5)


def test_editing_without_guidance_and_several_images(euler):
    pipe = euler
    kwargs = prompt_kwargs(pipe, "a [red:blue:1] circle", "", steps=4)
    seen = _unet_conditions(
        pipe, **kwargs, guidance_scale=1.0, num_images_per_prompt=2, generator=None
    )
    red, blue = (encode_prompt(pipe, t, 4).embeds[0] for t in ("a red circle", "a blue circle"))
    assert [c.shape[0] for c in seen] == [2, 2, 2, 2]
    for cond, want in zip(seen, [red, red, blue, blue], strict=True):
        assert torch.allclose(cond[0], want, atol=1e-5) and torch.allclose(cond[1], want, atol=1e-5)


def test_sdxl_editing_switches_embeds_and_pooled(sdxl):
    from diffusers import EulerDiscreteScheduler

    pipe = sdxl
    old = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(old.config)
    pooled_seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        pooled_seen.append(kwargs["added_cond_kwargs"]["text_embeds"].clone())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        kwargs = prompt_kwargs(pipe, "a [red:blue:1] circle", "green", steps=4)
        seen = _unet_conditions(pipe, **kwargs)
    finally:
        handle.remove()
        pipe.scheduler = old
    red = encode_prompt(pipe, "a red circle", 4)
    blue = encode_prompt(pipe, "a blue circle", 4)
    for cond, pooled, want in zip(seen, pooled_seen, [red, red, blue, blue], strict=True):
        assert torch.allclose(cond[1], want.embeds[0], atol=1e-5)
        assert torch.allclose(pooled[1], want.pooled[0], atol=1e-5)


def test_schedule_entries_share_one_weighting_batch(sd):
    """A1111 encodes a prompt's schedule as one batch: the mean restore spans the batch."""
    got = encode_prompt(sd, "[(red:1.5)|blue] circle", 2)
    assert got.ends == [1, 2] and got.embeds.shape == (2, 77, 32)
    assert conditioning.entry_at(got.ends, 0) == 0


# ------------------------------------------------------------------ through the engine


def _direct(engine, seed=3, steps=3, **prompts):
    """A diffusers call on the engine's own pipeline, as the runner makes it."""
    from sdkit.schedulers import make_scheduler

    pipe = engine.pipeline("txt2img")
    pipe.scheduler = make_scheduler("PNDM", engine.scheduler_config)
    return pipe(
        **prompts,
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=32,
        height=32,
        generator=[torch.Generator("cpu").manual_seed(seed)],
    ).images[0]


def _px(image):
    import numpy as np

    return np.asarray(image)


def test_engine_plain_prompt_takes_todays_path(sd_engine, monkeypatch):
    import numpy as np

    def refuse(*a, **k):
        raise AssertionError("a plain prompt must not be encoded by sdkit")

    monkeypatch.setattr(conditioning, "encode", refuse)
    ours = sd_engine.txt2img(
        "a red circle",
        negative_prompt="green",
        seed=3,
        num_inference_steps=3,
        scheduler="PNDM",
        progress=False,
    )
    plain = _direct(sd_engine, prompt="a red circle", negative_prompt="green")
    assert np.array_equal(_px(ours[0]), _px(plain))


@pytest.mark.parametrize(
    ("prompt", "clip_skip"),
    [("a (red:1.5) circle", None), ("a red circle", 2), ("[a red|a blue] circle", None)],
)
def test_engine_runs_syntax_and_clip_skip_through_prompt_embeds(sd_engine, prompt, clip_skip):
    import numpy as np

    ours = sd_engine.txt2img(
        prompt,
        negative_prompt="green",
        seed=3,
        num_inference_steps=3,
        scheduler="PNDM",
        clip_skip=clip_skip,
        progress=False,
    )
    pipe = sd_engine.pipeline("txt2img")
    kwargs = prompt_kwargs(pipe, prompt, "green", steps=3, clip_skip=clip_skip)
    direct = _direct(sd_engine, **kwargs)
    assert np.array_equal(_px(ours[0]), _px(direct))
    literal = _direct(sd_engine, prompt=prompt, negative_prompt="green")
    assert not np.array_equal(_px(ours[0]), _px(literal))


def test_engine_editing_keeps_progress_and_cancel(sd_engine):
    from sdkit.jobs import JobCancelled
    from sdkit.request import Request

    def request():
        return Request(
            prompt="a [red:blue:1] circle", seed=1, num_inference_steps=3, scheduler="Euler"
        )

    steps = []
    job = sd_engine.submit(
        request(), callback=lambda k, j, e: k == "progress" and steps.append(e.step)
    )
    job.result(timeout=120)
    job.wait_delivered(10)
    assert steps == [1, 2, 3]

    def cancel_at_first_step(kind, job, event):
        if event is not None:
            job.cancel()

    job = sd_engine.submit(request(), callback=cancel_at_first_step)
    with pytest.raises(JobCancelled):
        job.result(timeout=120)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_engine_other_modes_take_weighted_prompts(sd_engine, inpaint_engine, mode):
    from PIL import Image

    from sdkit.request import Request

    engine = sd_engine if mode == "img2img" else inpaint_engine
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    extra = {"mask": Image.new("L", (32, 32), 255)} if mode == "inpaint" else {}
    out = engine.generate(
        Request(
            mode=mode,
            prompt="a (blue:1.3) [square:circle:1]",
            image=image,
            **extra,
            seed=1,
            num_inference_steps=3,
            strength=0.9,
            clip_skip=2,
        ),
        progress=False,
    )
    assert out[0].size == (32, 32)


def test_engine_sdxl_weighted_prompt(sdxl_engine):
    import numpy as np

    ours = sdxl_engine.txt2img(
        "a (red:1.4) circle", seed=2, num_inference_steps=3, scheduler="Euler", progress=False
    )
    plain = sdxl_engine.txt2img(
        "a red circle", seed=2, num_inference_steps=3, scheduler="Euler", progress=False
    )
    assert not np.array_equal(_px(ours[0]), _px(plain[0]))
    skipped = sdxl_engine.txt2img(
        "a red circle",
        seed=2,
        num_inference_steps=3,
        scheduler="Euler",
        clip_skip=2,
        progress=False,
    )  # A1111 ignores clip skip on SDXL (its PNGs still say "Clip skip: 2")
    assert np.array_equal(_px(skipped[0]), _px(plain[0]))


# ------------------------------------------------------------------ the request field


def test_clip_skip_field_range_and_infotext():
    from sdkit.request import Request, RequestError

    with pytest.raises(RequestError) as err:
        Request(prompt="x", clip_skip=13).validate()
    assert err.value.field == "clip_skip"
    with pytest.raises(RequestError):
        Request(prompt="x", clip_skip=0).validate()
    Request(prompt="x", clip_skip=12).validate()
    text = Request(prompt="x", clip_skip=2, seed=1).to_infotext()
    assert "Clip skip: 2" in text
    assert "Clip skip" not in Request(prompt="x", clip_skip=1).to_infotext()
    a1111 = "a (cat:1.2)\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Clip skip: 2"
    req = Request.from_infotext(a1111)
    assert req.clip_skip == 2 and "Clip skip" not in req.extra
    assert Request.from_infotext(req.to_infotext()).clip_skip == 2


# ------------------------------------------------------------------ the embedded model


def test_prompt_weights_shift_the_colours_on_the_embedded_model():
    """`(red:1.5) circle on a (blue:0.6) background`: more red, less blue than the plain
    prompt, seed by seed (these seeds shift >= 60 of 4096 pixels either way, at 1 and 2
    threads; the test asks for 10). Read literally, the weighted prompt draws another picture."""
    import numpy as np

    import sdkit
    from sdkit.embedded import shapes

    engine = sdkit.load()
    names = list(shapes.COLOURS)

    def colours(prompt, seed):
        image = engine.txt2img(prompt, seed=seed, progress=False)[0]
        labels = shapes.nearest_colours(np.asarray(image.convert("RGB")))
        return np.array([(labels == names.index(c)).sum() for c in ("red", "blue")])

    for seed in (0, 1, 3, 7):
        plain = colours("a red circle on a blue background", seed)
        weighted = colours("a (red:1.5) circle on a (blue:0.6) background", seed)
        red, blue = weighted - plain
        assert red > 10 and blue < -10, f"seed {seed}: red {red:+d} px, blue {blue:+d} px"


def test_benchmark_script_prints_its_table():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "benchmarks/prompts.py", "--steps", "2", "--rounds", "1"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "weighted prompt: 150 tokens, 2 chunks, 2 schedule entries" in proc.stdout
    assert "| weighted |" in proc.stdout and "extra cost of the weighted prompt:" in proc.stdout


def test_textual_inversion_tokens_reach_the_chunks_as_diffusers_expands_them(tiny_models):
    """A multi-vector embedding loaded with diffusers' own loader is expanded the same way
    on our path (plain prompt: bit-identical to diffusers; weighted: it is weighted)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
    torch.manual_seed(0)
    pipe.load_textual_inversion({"emb": torch.randn(2, 32)}, token="emb")
    ours = encode_prompt(pipe, "a emb circle", 4).embeds
    theirs, _ = pipe.encode_prompt("a emb circle", "cpu", 1, False)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, encode_prompt(pipe, "a circle", 4).embeds)
    weighted = chunks(pipe.tokenizer, "a (emb:1.2) circle", pipe)[0]
    assert weighted.weights[2:4] == [1.2, 1.2] and weighted.weights[4] == 1.0
