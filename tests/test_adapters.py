"""The embedded model's shipped example adapters (sdkit/embedded/adapters/).

A kohya-format LoRA that teaches a new shape and an A1111 embedding that teaches a new
colour: each must load through diffusers' own loaders and still do what its card says.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks import adapters_eval as ev
from sdkit.embedded import shapes
from sdkit.embedded.train_adapters import ADAPTERS_DIR, LORA_NAME, NEW_COLOUR, NEW_SHAPE, TI_NAME

LORA = ADAPTERS_DIR / f"{LORA_NAME}.safetensors"
EMBEDDING = ADAPTERS_DIR / f"{TI_NAME}.pt"


@pytest.fixture
def pipe():
    torch.set_num_threads(1)
    return ev.load_pipeline()


def unet_out(pipe) -> torch.Tensor:
    """The UNet's prediction for the LoRA's prompt, through the text encoder (both carry
    LoRA layers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(
        ["a red x on a blue background", "a green circle on a yellow background"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        c = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([900, 300]), encoder_hidden_states=c).sample


# ------------------------------------------------------------------ the classifier


def test_classifier_judges_the_new_shape_and_colour_only_when_asked():
    rng = np.random.default_rng(8)
    scenes = [
        dataclasses.replace(shapes.random_scene(rng), shape=NEW_SHAPE, colour=NEW_COLOUR)
        for _ in range(40)
    ]
    asked = [ev.judge(shapes.render(s)) for s in scenes]
    assert all((j.shape, j.colour) == (NEW_SHAPE, NEW_COLOUR) for j in asked)
    assert all(j.background == s.background for j, s in zip(asked, scenes, strict=True))
    default = [shapes.classify(shapes.render(s)) for s in scenes]
    assert all(j.shape in (*shapes.SHAPES, None) for j in default)
    assert all(j.colour in (*shapes.COLOURS, None) for j in default)


def test_classifier_with_the_extras_still_judges_ordinary_renders():
    rng = np.random.default_rng(9)
    scenes = [shapes.random_scene(rng) for _ in range(100)]
    right = sum(
        (j.colour, j.background, j.shape) == (s.colour, s.background, s.shape)
        for s, j in ((s, ev.judge(shapes.render(s))) for s in scenes)
    )
    assert right >= 99


# ------------------------------------------------------------------ the files


def test_lora_file_is_kohya_format_and_small():
    from safetensors.torch import load_file

    assert LORA.stat().st_size <= 2 * 1024 * 1024
    sd = load_file(LORA)
    modules = {k.split(".")[0] for k in sd}
    assert any(m.startswith("lora_unet_") for m in modules)
    assert any(m.startswith("lora_te_") for m in modules)  # the word `x` is learnt too
    assert all(m.startswith(("lora_unet_", "lora_te_")) for m in modules)
    for m in modules:
        down, up = sd[f"{m}.lora_down.weight"], sd[f"{m}.lora_up.weight"]
        assert down.shape[0] == up.shape[1]  # the rank
        assert sd[f"{m}.alpha"].numel() == 1
    assert len(sd) == 3 * len(modules)


def test_embedding_file_is_a1111_format_and_small():
    assert EMBEDDING.stat().st_size <= 2 * 1024 * 1024
    data = torch.load(EMBEDDING, weights_only=True)
    vectors = data["string_to_param"]["*"]
    assert vectors.ndim == 2 and vectors.shape[1] == 128  # the text encoder's width
    assert data["name"] == TI_NAME and data["step"] > 0


# ------------------------------------------------------------------ diffusers' loaders


def test_lora_loads_through_diffusers_with_every_module_mapped(pipe):
    from safetensors.torch import load_file

    base = unet_out(pipe)
    ev.load_lora(pipe)
    layers = [
        n
        for model in (pipe.unet, pipe.text_encoder)
        for n, m in model.named_modules()
        if hasattr(m, "lora_A")
    ]
    assert len(layers) == len({k.split(".")[0] for k in load_file(LORA)})
    full = unet_out(pipe)
    assert (full - base).abs().max() > 1e-3
    pipe.set_adapters([LORA_NAME], [0.0])
    assert torch.equal(unet_out(pipe), base)
    pipe.set_adapters([LORA_NAME], [0.5])
    half = unet_out(pipe)
    pipe.fuse_lora(lora_scale=1.0)  # fuses at the active adapter weight, 0.5
    pipe.unload_lora_weights()
    torch.testing.assert_close(unet_out(pipe), half, atol=1e-4, rtol=1e-4)


def test_embedding_loads_through_diffusers(pipe):
    vectors = torch.load(EMBEDDING, weights_only=True)["string_to_param"]["*"]
    ev.load_embedding(pipe)
    prompt = pipe.maybe_convert_prompt(f"a {TI_NAME} circle", pipe.tokenizer)
    tokens = prompt.split()[1:-1]
    assert len(tokens) == len(vectors)
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], vectors.to(table.dtype))


# ------------------------------------------------------------------ what they draw


@pytest.mark.slow
def test_lora_draws_the_new_shape_by_weight(pipe):
    n = 16
    without = ev.new_shape_rate(pipe, n)
    ev.load_lora(pipe)
    pipe.set_adapters([LORA_NAME], [1.0])
    full = ev.new_shape_rate(pipe, n)
    pipe.set_adapters([LORA_NAME], [0.5])
    half = ev.new_shape_rate(pipe, n)
    # Measured on 48 held-out cases (the card): 0 % without, 81 % at weight 1 (the issue's
    # target: 80 %), 40 % at weight 0.5: the effect grows with the weight. 16 cases here.
    assert without <= 1 / n
    assert full >= 0.6
    assert without + 2 / n <= half <= full - 2 / n


@pytest.mark.slow
def test_lora_at_weight_zero_leaves_ordinary_prompts_alone(pipe):
    n = 12
    base = ev.ordinary_scores(pipe, n)
    ev.load_lora(pipe)
    pipe.set_adapters([LORA_NAME], [0.0])
    zero = ev.ordinary_scores(pipe, n)
    assert all(np.array_equal(a, b) for a, b in zip(base["images"], zero["images"], strict=True))
    pipe.set_adapters([LORA_NAME], [1.0])
    assert ev.ordinary_scores(pipe, n)["all"] >= base["all"] - 3 / n


@pytest.mark.slow
def test_embedding_draws_the_new_colour(pipe):
    n = 16
    without = ev.new_colour_rate(pipe, n)
    ev.load_embedding(pipe)
    assert without <= 1 / n  # measured 0 of 32
    assert ev.new_colour_rate(pipe, n) >= 0.8  # measured 31 of 32
