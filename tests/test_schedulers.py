"""Scheduler names -> real diffusers schedulers, each run on an oracle denoiser.

The oracle knows the clean latents x0 and answers with the exact noise in its input, so a
scheduler that steps correctly ends at (or, for schedules that stop at t=1, right next to)
x0.  That checks the configuration (betas kept, Karras/SDE flags) end to end without a
model; the engine tests run every scheduler on real pipelines.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from sdkit.request import Request, RequestError
from sdkit.schedulers import (
    a1111_name,
    canonical_name,
    make_scheduler,
    name_of,
    scheduler_names,
    scheduler_spec,
)

# Stable Diffusion 1.x's scheduler config (as shipped in scheduler/scheduler_config.json).
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.42.1",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "clip_sample": False,
}

A1111_NAMES = [
    "PNDM",
    "DDIM",
    "PLMS",
    "LMS",
    "LMS Karras",
    "Euler",
    "Euler a",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "DPM++ SDE",
    "DPM++ SDE Karras",
    "UniPC",
    "LCM",
]


def denoise_with_oracle(scheduler, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `steps` steps from pure noise with a denoiser that knows x0; return (x, x0)."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(1, 4, 8, 8, generator=g) * 2 - 1
    x = torch.randn(1, 4, 8, 8, generator=g) * scheduler.init_noise_sigma
    extra = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    alphas = scheduler.alphas_cumprod
    for t in scheduler.timesteps:
        # sigma-parameterised schedulers scale their input to the VP form; the scale is sqrt(abar)
        scale = float(scheduler.scale_model_input(torch.ones(()), t))
        x_in = scheduler.scale_model_input(x, t)
        abar = scale * scale if abs(scale - 1) > 1e-6 else float(alphas[int(round(float(t)))])
        eps = (x_in - abar**0.5 * x0) / (1 - abar) ** 0.5
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x, x0


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's float-rounding notice
        yield


@pytest.mark.parametrize("name", scheduler_names())
def test_every_scheduler_denoises_to_x0(name):
    scheduler = make_scheduler(name, SD_CONFIG)
    x, x0 = denoise_with_oracle(scheduler, steps=6)
    assert torch.isfinite(x).all()
    # from noise of mean |.| ~ 0.8+ to x0; DDIM-like schedules end at t=1 (abar = 0.99915)
    assert float((x - x0).abs().mean()) < 0.05, name


@pytest.mark.parametrize("name", scheduler_names())
def test_betas_and_prediction_type_come_from_the_model_config(name):
    config = {**SD_CONFIG, "prediction_type": "v_prediction"}
    scheduler = make_scheduler(name, config)
    assert scheduler.config.beta_start == 0.00085
    assert scheduler.config.beta_end == 0.012
    assert scheduler.config.beta_schedule == "scaled_linear"
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert torch.allclose(scheduler.betas.float(), expected)
    if "prediction_type" in scheduler.config:
        assert scheduler.config.prediction_type == "v_prediction"


def test_a1111_names_map_to_the_right_classes_and_flags():
    cases = {
        "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
        "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
        "DDIM": ("DDIMScheduler", {}),
        "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
        "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
        "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
        "Euler a": ("EulerAncestralDiscreteScheduler", {}),
        "Heun": ("HeunDiscreteScheduler", {}),
        "DPM2": ("KDPM2DiscreteScheduler", {}),
        "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
        "DPM++ 2M": (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        ),
        "DPM++ 2M Karras": (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
        ),
        "DPM++ 2M SDE": (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False},
        ),
        "DPM++ 2M SDE Karras": (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        ),
        "DPM++ SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
        "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
        "UniPC": ("UniPCMultistepScheduler", {}),
        "LCM": ("LCMScheduler", {}),
    }
    assert set(cases) == set(A1111_NAMES)
    for name, (cls_name, flags) in cases.items():
        scheduler = make_scheduler(name, SD_CONFIG)
        assert type(scheduler).__name__ == cls_name, name
        for key, value in flags.items():
            assert scheduler.config[key] == value, (name, key)


def test_karras_sigmas_really_change_the_schedule():
    plain = make_scheduler("DPM++ 2M", SD_CONFIG)
    karras = make_scheduler("DPM++ 2M Karras", SD_CONFIG)
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert not torch.equal(plain.sigmas, karras.sigmas)


def test_model_config_flags_do_not_leak_into_a1111_names():
    # a model that ships DPM++ 2M Karras: asking for plain "DPM++ 2M" must turn Karras off
    shipped = {**SD_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert make_scheduler("DPM++ 2M", shipped).config.use_karras_sigmas is False
    assert make_scheduler("Euler", shipped).config.use_karras_sigmas is False
    # the diffusers class name means plain from_config: the model's flags are kept
    assert make_scheduler("DPMSolverMultistepScheduler", shipped).config.use_karras_sigmas is True


def test_class_name_equals_plain_diffusers_from_config():
    import diffusers

    for cls_name in ("EulerAncestralDiscreteScheduler", "DDIMScheduler", "UniPCMultistepScheduler"):
        ours = make_scheduler(cls_name, SD_CONFIG)
        theirs = getattr(diffusers, cls_name).from_config(SD_CONFIG)
        assert dict(ours.config) == dict(theirs.config)


def test_ancestral_schedulers_are_reproducible_with_a_generator():
    a, _ = denoise_with_oracle(make_scheduler("Euler a", SD_CONFIG), steps=4, seed=3)
    b, _ = denoise_with_oracle(make_scheduler("Euler a", SD_CONFIG), steps=4, seed=3)
    assert torch.equal(a, b)


def test_names_are_case_insensitive_and_aliases_resolve():
    assert canonical_name("euler A") == "Euler a"
    assert canonical_name("  dpm++  2m   karras ") == "DPM++ 2M Karras"
    assert canonical_name("PLMS") == "PNDM"
    assert canonical_name("K-LMS") == "LMS"
    assert canonical_name("DPM++ 2M SDE (Karras)") == "DPM++ 2M SDE Karras"
    assert canonical_name("eulerancestraldiscretescheduler") == "EulerAncestralDiscreteScheduler"
    assert scheduler_spec("euler a") == ("EulerAncestralDiscreteScheduler", {})


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError) as err:
        canonical_name("Euler b")
    assert "Euler b" in str(err.value)
    assert "DPM++ 2M Karras" in str(err.value) and "UniPC" in str(err.value)
    with pytest.raises(KeyError):
        make_scheduler("nope", SD_CONFIG)


def test_scheduler_names_lists_a1111_names_first():
    names = scheduler_names()
    assert names[0] == "PNDM"
    for name in A1111_NAMES:
        canonical_name(name)
    first_class = next(i for i, n in enumerate(names) if n.endswith("Scheduler"))
    assert all(not n.endswith("Scheduler") for n in names[:first_class])
    assert len(names) == len(set(names))


def test_a1111_name_for_infotext():
    assert a1111_name("PNDM") == "PLMS"
    assert a1111_name("dpm++ 2m karras") == "DPM++ 2M Karras"
    assert a1111_name("EulerAncestralDiscreteScheduler") == "Euler a"
    assert a1111_name("something else") == "something else"
    assert a1111_name(make_scheduler("DPM++ 2M SDE Karras", SD_CONFIG)) == "DPM++ 2M SDE Karras"
    assert a1111_name(make_scheduler("PNDMScheduler", SD_CONFIG)) == "PLMS"
    assert a1111_name(make_scheduler("LMS Karras", SD_CONFIG)) == "LMS Karras"
    assert name_of(make_scheduler("Euler a", SD_CONFIG)) == "Euler a"


def test_request_validation_uses_the_scheduler_names():
    Request(prompt="x", scheduler="dpm++ 2m karras").validate()
    Request(prompt="x", scheduler="EulerDiscreteScheduler").validate()
    with pytest.raises(RequestError) as err:
        Request(prompt="x", scheduler="Euler b").validate()
    assert err.value.field == "scheduler"
    assert "Euler a" in str(err.value)
    # an engine that only has some schedulers passes its own list
    Request(prompt="x", scheduler="euler a").validate(scheduler_names=["Euler a", "DDIM"])
    with pytest.raises(RequestError) as err:
        Request(prompt="x", scheduler="LMS").validate(scheduler_names=["Euler a", "DDIM"])
    assert "known: Euler a, DDIM" in str(err.value)
