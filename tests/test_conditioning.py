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
