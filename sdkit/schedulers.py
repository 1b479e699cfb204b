"""Scheduler names users know (A1111 sampler names, diffusers class names) -> diffusers schedulers.

Every scheduler is built with `Cls.from_config(model_config, **overrides)` so the model's own
betas, prediction type and timestep spacing are kept; the overrides only add what the A1111
name means (Karras sigmas, the SDE variant, ...).  A diffusers class name means exactly
`Cls.from_config(model_config)`, as a plain diffusers user would write it.

diffusers is imported lazily so that `Request.validate` can check names without loading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Sigma-schedule flags: at most one may be true, so an A1111 name sets all three explicitly
# (a model config that ships with e.g. Karras sigmas must not leak into plain "DPM++ 2M").
_PLAIN = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

# A1111 name -> (diffusers class, overrides).  Order is the order users see.
_A1111: dict[str, tuple[str, dict[str, Any]]] = {
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),  # = A1111's PLMS; SD's default
    "DDIM": ("DDIMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", _PLAIN),
    "LMS Karras": ("LMSDiscreteScheduler", _KARRAS),
    "Euler": ("EulerDiscreteScheduler", _PLAIN),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", _PLAIN),
    "DPM2": ("KDPM2DiscreteScheduler", _PLAIN),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", _PLAIN),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, **_PLAIN}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M, **_KARRAS}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, **_PLAIN}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, **_KARRAS}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", _PLAIN),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", _KARRAS),
    "UniPC": ("UniPCMultistepScheduler", _PLAIN),
    "LCM": ("LCMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),  # unconditional-only pipelines (DDPMPipeline) use it
    "DEIS": ("DEISMultistepScheduler", _PLAIN),
}

# Other spellings people type -> canonical A1111 name.
_ALIASES = {
    "PLMS": "PNDM",
    "K-LMS": "LMS",
    "K_LMS": "LMS",
    "K-LMS Karras": "LMS Karras",
    "Euler A": "Euler a",
    "Euler Ancestral": "Euler a",
    "K_EULER": "Euler",
    "K_EULER_ANCESTRAL": "Euler a",
    "K_HEUN": "Heun",
    "K_DPM_2": "DPM2",
    "K_DPM_2_ANCESTRAL": "DPM2 a",
    "DPM++ 2M SDE (Karras)": "DPM++ 2M SDE Karras",
    "DPM++ SDE (Karras)": "DPM++ SDE Karras",
}

# diffusers classes accepted by their own name (plain from_config), in listing order.
_CLASSES = (
    "PNDMScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
)

# A1111 names written into infotext (A1111 knows PNDM-with-skipped-PRK as "PLMS").
_INFOTEXT = {"PNDM": "PLMS"}

_LOOKUP: dict[str, str] = {}
for _name in (*_A1111, *_CLASSES):
    _LOOKUP[_name.lower()] = _name
for _alias, _target in _ALIASES.items():
    _LOOKUP[_alias.lower()] = _target


def scheduler_names() -> list[str]:
    """Every name `make_scheduler` accepts canonically: A1111 names first, then classes."""
    return [*_A1111, *_CLASSES]


def canonical_name(name: str) -> str:
    """The canonical spelling of a scheduler name (case-insensitive, aliases resolved).

    Raises `KeyError` whose message lists the known names.
    """
    if isinstance(name, str):
        key = " ".join(name.split()).lower()
        if key in _LOOKUP:
            return _LOOKUP[key]
    raise KeyError(f"unknown scheduler {name!r}; known: {', '.join(scheduler_names())}")


def scheduler_spec(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, from_config overrides) for a scheduler name."""
    canon = canonical_name(name)
    if canon in _A1111:
        cls_name, overrides = _A1111[canon]
        return cls_name, dict(overrides)
    return canon, {}


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A new diffusers scheduler `name`, built on the model's scheduler config `base_config`
    so its betas and prediction type are kept.

    Exactly `Cls.from_config(base_config, **overrides)`: keys the class does not take stay
    in its config (diffusers keeps them), so converting again from it loses nothing.
    """
    import diffusers

    cls_name, overrides = scheduler_spec(name)
    return getattr(diffusers, cls_name).from_config(base_config, **overrides)


def a1111_name(scheduler_or_name: Any) -> str:
    """The A1111 sampler name for infotext, from a name or a scheduler instance.

    Names A1111 does not have (e.g. `DPMSolverSinglestepScheduler`) come back unchanged;
    unknown names come back as given.
    """
    if isinstance(scheduler_or_name, str):
        try:
            canon = canonical_name(scheduler_or_name)
        except KeyError:
            return scheduler_or_name
        if canon not in _A1111:
            canon = _class_default_name(canon) or canon
        return _INFOTEXT.get(canon, canon)
    name = _instance_name(scheduler_or_name)
    return _INFOTEXT.get(name, name)


def name_of(scheduler: Any) -> str:
    """The canonical sdkit name of a scheduler instance (class plus the flags that matter)."""
    return _instance_name(scheduler)


def _class_default_name(cls_name: str) -> str | None:
    """The A1111 name of a class with its defaults (first table entry with that class)."""
    for a_name, (c, _) in _A1111.items():
        if c == cls_name:
            return a_name
    return None


def _instance_name(scheduler: Any) -> str:
    cls_name = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    karras = bool(config.get("use_karras_sigmas", False))
    if cls_name == "DPMSolverMultistepScheduler":
        sde = str(config.get("algorithm_type", "dpmsolver++")).startswith("sde")
        base = "DPM++ 2M SDE" if sde else "DPM++ 2M"
        if config.get("algorithm_type") not in ("dpmsolver++", "sde-dpmsolver++") or (
            config.get("solver_order", 2) != 2
        ):
            return cls_name
        return f"{base} Karras" if karras else base
    candidates = [n for n, (c, _) in _A1111.items() if c == cls_name]
    if not candidates:
        return cls_name
    for n in candidates:
        if n.endswith(" Karras") == karras:
            return n
    return candidates[0]
