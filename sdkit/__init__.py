"""sdkit: Stable Diffusion where people already work.

Import is light: torch and diffusers load on first use of an engine or a mode function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdkit.request import Request, RequestError

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EventKind",
    "Job",
    "JobCancelled",
    "JobState",
    "ModelNotFoundError",
    "ProgressEvent",
    "Request",
    "RequestError",
    "Result",
    "batch",
    "generate",
    "grid",
    "img2img",
    "inpaint",
    "load",
    "outpaint",
    "txt2img",
    "unconditional",
    "upscale",
]

_LAZY = {
    "Engine": "sdkit.engine",
    "Job": "sdkit.jobs",
    "JobCancelled": "sdkit.jobs",
    "ProgressEvent": "sdkit.jobs",
    "JobState": "sdkit.jobs",
    "EventKind": "sdkit.jobs",
    "Result": "sdkit.result",
    "ModelNotFoundError": "sdkit.models",
    "load": "sdkit.api",
    "txt2img": "sdkit.api",
    "img2img": "sdkit.api",
    "inpaint": "sdkit.api",
    "unconditional": "sdkit.api",
    "outpaint": "sdkit.api",
    "upscale": "sdkit.api",
    "generate": "sdkit.api",
    "batch": "sdkit.batch",
    "grid": "sdkit.grid",
}

if TYPE_CHECKING:
    from sdkit.api import (
        generate,
        img2img,
        inpaint,
        load,
        outpaint,
        txt2img,
        unconditional,
        upscale,
    )
    from sdkit.batch import batch
    from sdkit.engine import Engine
    from sdkit.grid import grid
    from sdkit.jobs import EventKind, Job, JobCancelled, JobState, ProgressEvent
    from sdkit.models import ModelNotFoundError
    from sdkit.result import Result


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
