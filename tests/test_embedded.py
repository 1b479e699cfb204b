"""The embedded default model: the oracle, its prompts, its schedulers, guidance."""

from __future__ import annotations

import numpy as np
import pytest

import sdkit
from sdkit.embedded import shapes
from sdkit.schedulers import scheduler_names

# Prompts the shipped model gets right at its defaults on these seeds, picked where the best
# shape template beats the runner-up by >= 0.1 IoU and the verdict is the same at 1 and 2
# CPU threads (different float summation order); each judged by the pixel classifier, so the
# test does not depend on exact floating-point output and survives differences between
# machines. (Squares are the closest call: a rounded square is nearly a circle.)
ORACLE_CASES = [
    ("orange", "circle", "white", 200),
    ("black", "triangle", "green", 201),
    ("yellow", "square", "blue", 208),
    ("green", "circle", "red", 211),
    ("white", "star", "yellow", 214),
    ("green", "triangle", "blue", 215),
    ("blue", "triangle", "yellow", 218),
    ("white", "square", "green", 222),
    ("black", "star", "purple", 223),
    ("red", "star", "yellow", 226),
    ("red", "star", "purple", 227),
    ("blue", "circle", "black", 228),
    ("white", "triangle", "blue", 232),
]


@pytest.fixture(scope="module")
def engine():
    return sdkit.load()


def test_classifier_is_right_on_clean_renders():
    rng = np.random.default_rng(123)
    scenes = [shapes.random_scene(rng) for _ in range(300)]
    right = sum(
        (j.colour, j.background, j.shape) == (s.colour, s.background, s.shape)
        for s, j in ((s, shapes.classify(shapes.render(s))) for s in scenes)
    )
    assert right / len(scenes) >= 0.99


def test_classifier_notices_wrong_images():
    scene = shapes.Scene("circle", "red", "blue", 32, 32, 18, 0)
    j = shapes.classify(shapes.render(scene))
    assert (j.colour, j.background, j.shape) == ("red", "blue", "circle")
    swapped = shapes.classify(shapes.render(shapes.Scene("star", "blue", "red", 32, 32, 18, 0)))
    assert (swapped.colour, swapped.background, swapped.shape) == ("blue", "red", "star")


def test_classifier_tolerates_soft_edges():
    """Decoded latents have soft edges and rounded corners; the verdict must not hinge on them."""
    from PIL import ImageFilter

    rng = np.random.default_rng(321)
    scenes = [shapes.random_scene(rng) for _ in range(120)]
    right = sum(
        shapes.classify(shapes.render(s).filter(ImageFilter.GaussianBlur(1.5))).shape == s.shape
        for s in scenes
    )
    assert right / len(scenes) >= 0.97


def test_classifier_calls_a_smear_no_shape():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), shapes.COLOURS["blue"])
    ImageDraw.Draw(image).rectangle([2, 29, 61, 34], fill=shapes.COLOURS["red"])
    j = shapes.classify(image)
    assert (j.colour, j.background, j.shape) == ("red", "blue", None)


def test_loads_offline_with_its_own_defaults(monkeypatch, tmp_path):
    # An empty hub cache and offline mode: anything that tried the hub would fail here.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    engine = sdkit.load()
    assert engine.defaults["width"] == 64 and engine.defaults["height"] == 64
    result = engine.generate(
        sdkit.Request(prompt="a red circle on a blue background", seed=0), progress=False
    )
    assert result[0].size == (64, 64)
    engine.close()


def test_every_sampler_starts_from_pure_noise(engine):
    """The shipped config spaces timesteps from t = 999 ("trailing"); SD's "leading" spacing
    starts 12 steps at t = 914, skipping where the shape is decided (shape 0.72 vs 0.86)."""
    from sdkit.schedulers import make_scheduler

    config = engine.pipeline("txt2img").scheduler.config
    for name in ("Euler a", "DPM++ 2M", "DDIM", "PNDM", "UniPC"):
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(12)
        assert int(scheduler.timesteps[0]) == 999, name


@pytest.mark.parametrize(("colour", "shape", "background", "seed"), ORACLE_CASES)
def test_draws_what_the_prompt_says(engine, colour, shape, background, seed):
    prompt = f"a {colour} {shape} on a {background} background"
    image = engine.generate(sdkit.Request(prompt=prompt, seed=seed), progress=False)[0]
    j = shapes.classify(image)
    assert (j.colour, j.background) == (colour, background), prompt
    assert j.shape == shape, prompt


# DDPM is offered only for unconditional-only (UNet2DModel) models: it needs ~1000 steps.
# PNDM (PLMS) and LMS get this prompt's colours wrong on this model at 20 steps (0 of 6
# seeds each) and right at 50, Stable Diffusion's default step count for PLMS: both are
# 4th-order multistep methods, whose extrapolation amplifies a step-to-step wobble of the
# predicted mean (benchmarks/pndm_order.py; LMS capped at order 2 got 6 of 6 at 20 steps).
_STEPS = {
    name: 50 for name in ("PNDM", "PNDMScheduler", "LMS", "LMS Karras", "LMSDiscreteScheduler")
}


@pytest.mark.parametrize("name", [n for n in scheduler_names() if n != "DDPM"])
def test_every_scheduler_runs_and_draws(engine, name):
    req = sdkit.Request(
        prompt="a yellow square on a black background",
        seed=2,
        scheduler=name,
        num_inference_steps=_STEPS.get(name, 20),
    )
    if name.upper().startswith("LCM"):
        req.num_inference_steps = 4
    image = engine.generate(req, progress=False)[0]
    arr = np.asarray(image)
    assert arr.shape == (64, 64, 3) and np.isfinite(arr).all()
    assert arr.std() > 5, f"{name} produced a flat image"
    if not name.upper().startswith("LCM"):  # LCM needs a distilled model; it only has to run
        # A broken sampler (e.g. DDIM clipping latents to [-1, 1]) loses both colours; some
        # samplers (LMS) follow colours less well in 20 steps, so one of two must hold.
        j = shapes.classify(image)
        assert j.colour == "yellow" or j.background == "black", f"{name}: {j}"


def _prompts_followed(engine, guidance: float) -> int:
    """Images whose colour, background and shape all match, over a fixed grid of prompts and seeds.

    Sampled with DPM++ 2M at 20 steps, a deterministic sampler at Stable Diffusion's usual
    step count (measured: 18 of 32 at guidance 1, 27 at 7.5)."""
    rng = np.random.default_rng(9)
    combos = [
        (c, s, b) for c in shapes.COLOURS for s in shapes.SHAPES for b in shapes.COLOURS if c != b
    ]
    right = 0
    for k, i in enumerate(rng.permutation(len(combos))[:32]):
        colour, shape, background = combos[i]
        req = sdkit.Request(
            prompt=f"a {colour} {shape} on a {background} background",
            seed=40 + k,
            guidance_scale=guidance,
            scheduler="DPM++ 2M",
            num_inference_steps=20,
        )
        j = shapes.classify(engine.generate(req, progress=False)[0])
        right += (j.colour, j.background, j.shape) == (colour, background, shape)
    return right


def test_guidance_makes_the_prompt_followed_more(engine):
    unguided = _prompts_followed(engine, 1.0)
    guided = _prompts_followed(engine, 7.5)
    print(f"prompts followed of 32: guidance 1 -> {unguided}, 7.5 -> {guided}")
    assert guided > unguided
