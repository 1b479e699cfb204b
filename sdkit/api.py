"""The scripting face: `sdkit.load` (cached engines) and one function per mode."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from sdkit.engine import Engine
from sdkit.models import normalise_spec, resolve_device, resolve_dtype
from sdkit.request import Request, make_request
from sdkit.result import Result

_engines: dict[tuple, Engine] = {}
_lock = threading.Lock()


def load(
    spec: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **options: Any,
) -> Engine:
    """The `Engine` for a model spec, loaded once per (spec, device, dtype) and reused.

    `spec`: None/"embedded"/"default" (the shipped model), a local diffusers folder, a
    `.safetensors`/`.ckpt` file (`config=` a local diffusers folder of the same family,
    else one next to the file), or a hub id from the local Hugging Face cache.
    `options`: `Engine`'s keywords, e.g. `lora_dirs=`, `embedding_dirs=`, `control_dirs=`
    (folders searched for adapters by name, before `SDKIT_LORA_DIRS` & co. and the
    `loras/`, `embeddings/`, `controlnet/` folders next to a local model).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = (
        normalise_spec(spec),
        str(dev),
        str(dt),
        tuple(sorted((k, str(v)) for k, v in options.items())),
    )
    with _lock:
        engine = _engines.get(key)
        if engine is None or engine._closed:
            engine = Engine(spec, dev, dt, **options)
            _engines[key] = engine
        return engine


def unload_all() -> None:
    """Close and forget every cached engine (frees their memory)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()


def txt2img(prompt: str, *, model: Any = None, progress: bool = True, **fields: Any) -> Result:
    """Text to image; `fields` are `Request` fields (num_inference_steps, seed, ...)."""
    return _engine(model).generate(
        make_request("txt2img", prompt=prompt, **fields), progress=progress
    )


def img2img(
    image: Any, prompt: str = "", *, model: Any = None, progress: bool = True, **fields: Any
) -> Result:
    """Image to image at `strength`; an init image of another size is fit by `resize_mode`."""
    req = make_request("img2img", image=image, prompt=prompt, **fields)
    return _engine(model).generate(req, progress=progress)


def inpaint(
    image: Any,
    mask: Any,
    prompt: str = "",
    *,
    model: Any = None,
    progress: bool = True,
    **fields: Any,
) -> Result:
    """Repaint where `mask` is white; pixels outside the grown, feathered mask stay exact."""
    req = make_request("inpaint", image=image, mask=mask, prompt=prompt, **fields)
    return _engine(model).generate(req, progress=progress)


def unconditional(*, model: Any = None, progress: bool = True, **fields: Any) -> Result:
    """Images with no prompt: guidance off for text models, or a UNet2DModel's own pipeline."""
    return _engine(model).generate(make_request("unconditional", **fields), progress=progress)


def upscale(
    image: Any,
    prompt: str = "",
    *,
    factor: float = 2.0,
    strength: float = 0.3,
    model: Any = None,
    progress: bool = True,
    **fields: Any,
) -> Result:
    """Upscale x `factor` (1..4): Lanczos, then img2img in overlapping tiles of the model's
    native size (`tile_overlap` px), blended seamlessly; `strength` defaults low (0.3) so
    tiles refine rather than redraw (`sdkit.tiled_upscale`)."""
    return _engine(model).upscale(
        image, prompt, factor=factor, strength=strength, progress=progress, **fields
    )


def outpaint(
    image: Any, prompt: str = "", *, model: Any = None, progress: bool = True, **fields: Any
) -> Result:
    """Extend the canvas by `left`/`right`/`top`/`bottom` px and paint the new area, with a
    soft `seam` band into the original; the original outside that band stays exact."""
    return _engine(model).outpaint(image, prompt, progress=progress, **fields)


def generate(request: Request, *, model: Any = None, progress: bool = True) -> Result:
    """Run a ready `Request` (e.g. `Request.from_png(path)`) on `model` (default: the
    embedded model; the request's own `model` field is informational only)."""
    return _engine(model).generate(request, progress=progress)


def _engine(model: Any) -> Engine:
    if isinstance(model, Engine):
        return model
    return load(model)
