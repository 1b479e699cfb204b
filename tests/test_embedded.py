"""The embedded default model: the oracle, its prompts, its schedulers, guidance."""

from __future__ import annotations

import numpy as np
import pytest

import sdkit
from sdkit.embedded import shapes
from sdkit.schedulers import scheduler_names

# Prompts the shipped model gets right at its defaults on these seeds (checked by the
# evaluation); each judged by the pixel classifier, so the test does not depend on exact
# floating-point output and survives differences between machines.
ORACLE_CASES = [
    ("red", "circle", "blue", 1),
    ("yellow", "square", "black", 2),
    ("white", "triangle", "green", 3),
    ("green", "star", "white", 4),
    ("blue", "circle", "yellow", 5),
    ("purple", "square", "orange", 6),
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


def test_loads_offline_with_its_own_defaults(engine, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert engine.defaults["width"] == 64 and engine.defaults["height"] == 64
    result = engine.generate(sdkit.Request(prompt="a red circle on a blue background", seed=0), progress=False)
    assert result[0].size == (64, 64)


@pytest.mark.parametrize(("colour", "shape", "background", "seed"), ORACLE_CASES)
def test_draws_what_the_prompt_says(engine, colour, shape, background, seed):
    prompt = f"a {colour} {shape} on a {background} background"
    image = engine.generate(sdkit.Request(prompt=prompt, seed=seed), progress=False)[0]
    j = shapes.classify(image)
    assert (j.colour, j.background) == (colour, background), prompt
    assert j.shape == shape, prompt


@pytest.mark.parametrize("name", scheduler_names())
def test_every_scheduler_runs_and_draws(engine, name):
    req = sdkit.Request(prompt="a yellow square on a black background", seed=2, scheduler=name, num_inference_steps=12)
    if name.upper().startswith("LCM"):
        req.num_inference_steps = 4
    image = engine.generate(req, progress=False)[0]
    arr = np.asarray(image)
    assert arr.shape == (64, 64, 3) and np.isfinite(arr).all()
    assert arr.std() > 5, f"{name} produced a flat image"


def _follow_rate(engine, guidance: float) -> float:
    right = 0
    cases = [(c, s, b) for c, s, b, _ in ORACLE_CASES]
    for colour, shape, background in cases:
        for seed in (11, 12):
            req = sdkit.Request(prompt=f"a {colour} {shape} on a {background} background", seed=seed, guidance_scale=guidance)
            j = shapes.classify(engine.generate(req, progress=False)[0])
            right += (j.colour, j.background, j.shape) == (colour, background, shape)
    return right / (2 * len(cases))


def test_guidance_makes_the_prompt_followed_more(engine):
    assert _follow_rate(engine, 7.5) > _follow_rate(engine, 1.0)
