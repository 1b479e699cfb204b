"""Generation modes: one typed spec per mode, in one registry.

A mode is a `ModeSpec`: its name, the `Request` fields it reads and requires, its picture
inputs, the diffusers pipeline class per model family, and the runner that produces its
images. The engine dispatches through `get(request.mode).run`; `Request.validate`, the CLI's
subcommands, the widget's tabs and the bridge's `hello` are derived from `registered()`.
Adding a mode is a spec plus its runner: `register(ModeSpec(...))`, nothing else to edit.

This module stays light (no torch): the built-in runners live in `sdkit.runners` and are
imported on first run.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sdkit.request import Request, RequestError

if TYPE_CHECKING:
    from PIL import Image


class Mode(StrEnum):
    """The built-in modes; a `Mode` compares equal to its plain string."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    UNCONDITIONAL = "unconditional"
    UPSCALE = "upscale"
    OUTPAINT = "outpaint"


Runner = Callable[..., "list[Image.Image]"]


@dataclass(frozen=True)
class ModeSpec:
    """Everything sdkit knows about one mode.

    `pipelines` maps a model family ("sd1", "sd2", "sdxl", "unconditional") to the diffusers
    pipeline class name serving it; an engine serves the mode only for the families named
    (an empty mapping: every family, for runners that need no diffusers pipeline).
    `run(ctx)` gets a `sdkit.runners.RunContext` and returns the job's images.
    `forced`: values this mode always runs with (e.g. unconditional: no guidance, no prompt).
    `check(request, engine)`: the mode's own checks and fills once the model's defaults are in
    (e.g. the output size an outpaint or upscale will have); returns the request as it will
    run or raises `RequestError`. `Engine.check` calls it; None: nothing beyond the fields.
    """

    name: str
    title: str
    fields: tuple[str, ...]
    required: tuple[str, ...]
    inputs: tuple[str, ...]
    pipelines: Mapping[str, str]
    run: Runner
    forced: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Request, Any], Request] | None = None

    def describe(self) -> dict:
        """JSON-safe summary (the widget's tabs, the bridge's `hello`, `Engine.info()`)."""
        return {
            "name": str(self.name),
            "title": self.title,
            "fields": list(self.fields),
            "required": list(self.required),
            "inputs": list(self.inputs),
        }

    def serves(self, family: str) -> bool:
        """Whether an engine of model `family` can run this mode."""
        return not self.pipelines or family in self.pipelines


_lock = threading.Lock()
_registry: dict[str, ModeSpec] = {}
_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(Request))


def register(spec: ModeSpec) -> ModeSpec:
    """Add `spec` to the registry (a name may be registered once); returns it."""
    for what in ("fields", "required", "inputs"):
        unknown = [f for f in getattr(spec, what) if f not in _REQUEST_FIELDS]
        if unknown:
            raise ValueError(f"mode {spec.name!r}: {what} names unknown Request fields {unknown}")
    if not set(spec.required) <= set(spec.fields) or not set(spec.inputs) <= set(spec.fields):
        raise ValueError(f"mode {spec.name!r}: required and inputs must be among its fields")
    if not set(spec.inputs) <= {"image", "mask"}:
        raise ValueError(f"mode {spec.name!r}: inputs may be 'image' and 'mask' only")
    with _lock:
        if spec.name in _registry:
            raise ValueError(f"mode {spec.name!r} is already registered")
        _registry[str(spec.name)] = dataclasses.replace(
            spec, forced=MappingProxyType(dict(spec.forced))
        )
        return _registry[str(spec.name)]


def unregister(name: str) -> None:
    """Remove the mode `name` (no error when it is not registered)."""
    with _lock:
        _registry.pop(str(name), None)


def get(name: Any) -> ModeSpec:
    """The spec of mode `name`; unknown -> `RequestError("mode", ...)` listing the allowed."""
    with _lock:
        spec = _registry.get(name) if isinstance(name, str) else None
        if spec is None:
            raise RequestError("mode", f"unknown mode {name!r}; allowed: {', '.join(_registry)}")
        return spec


def registered() -> list[ModeSpec]:
    """Every registered mode, in registration order (built-ins first)."""
    with _lock:
        return list(_registry.values())


# ------------------------------------------------------------------------ built-ins

_PROMPTED = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "width",
    "height",
    "seed",
    "scheduler",
    "num_images",
    "clip_skip",
    "loras",
)
_IMG2IMG = (*_PROMPTED, "image", "strength", "resize_mode")
_INPAINT = (*_IMG2IMG, "mask", "mask_blur", "grow", "only_masked", "padding", "fill")
_UNCONDITIONAL = ("num_inference_steps", "width", "height", "seed", "scheduler", "num_images")


def _family_table(sd: str, sdxl: str) -> Mapping[str, str]:
    return MappingProxyType({"sd1": sd, "sd2": sd, "sdxl": sdxl})


def _builtin_runner(name: str) -> Runner:
    """`sdkit.runners.<name>`, imported on first call (keeps this module free of torch)."""

    def run(ctx: Any) -> list:
        from sdkit import runners

        return getattr(runners, name)(ctx)

    run.__name__ = run.__qualname__ = name
    return run


def _control_check(request: Request, engine: Any) -> Request:
    """Control units' models exist and fit the engine (sdkit.control, imported on first use)."""
    if not request.control:
        return request
    from sdkit import control

    return control.check(request, engine)


def _txt2img_check(request: Request, engine: Any) -> Request:
    """Control units, then the hires-fix target size (sdkit.hires, imported on first use)."""
    request = _control_check(request, engine)
    if request.hires_scale is None and not request.hires_width and not request.hires_height:
        return request
    from sdkit import hires

    return hires.check(request, engine)


HIRES_FIELDS = (  # txt2img's hires-fix fields (the widget's group shows them in this order)
    "hires_scale",
    "hires_width",
    "hires_height",
    "hires_steps",
    "hires_denoise",
    "hires_upscaler",
)

register(
    ModeSpec(
        name=Mode.TXT2IMG,
        title="Text to image",
        fields=(*_PROMPTED, "control", *HIRES_FIELDS),
        required=("prompt",),
        inputs=(),
        pipelines=_family_table("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
        run=_builtin_runner("run_txt2img"),
        check=_txt2img_check,
    )
)
register(
    ModeSpec(
        name=Mode.IMG2IMG,
        title="Image to image",
        fields=(*_IMG2IMG, "control"),
        required=("image",),
        inputs=("image",),
        pipelines=_family_table(
            "StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"
        ),
        run=_builtin_runner("run_img2img"),
        check=_control_check,
    )
)
register(
    ModeSpec(
        name=Mode.INPAINT,
        title="Inpaint",
        fields=(*_INPAINT, "control"),
        required=("image", "mask"),
        inputs=("image", "mask"),
        pipelines=_family_table(
            "StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"
        ),
        run=_builtin_runner("run_inpaint"),
        check=_control_check,
    )
)
register(
    ModeSpec(
        name=Mode.UNCONDITIONAL,
        title="Unconditional",
        fields=_UNCONDITIONAL,
        required=(),
        inputs=(),
        pipelines=MappingProxyType(
            {
                **_family_table("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
                "unconditional": "DDIMPipeline",
            }  # DDPMPipeline when the scheduler is DDPM
        ),
        run=_builtin_runner("run_unconditional"),
        forced={"guidance_scale": 1.0, "prompt": ""},
    )
)


def _upscale_check(request: Request, engine: Any) -> Request:
    from sdkit import tiled_upscale  # imported on first use, like the runners

    return tiled_upscale.check(request, engine)


def _run_upscale(ctx: Any) -> list:
    from sdkit import tiled_upscale

    return tiled_upscale.run_upscale(ctx)


register(
    ModeSpec(
        name=Mode.UPSCALE,
        title="Upscale",
        fields=(
            "image",
            "prompt",
            "negative_prompt",
            "num_inference_steps",
            "guidance_scale",
            "seed",
            "scheduler",
            "clip_skip",
            "loras",
            "strength",
            "upscale_factor",
            "tile_overlap",
        ),
        required=("image",),
        inputs=("image",),
        pipelines=_family_table(
            "StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"
        ),  # tiles run through the img2img runner (sdkit.tiled_upscale)
        run=_run_upscale,
        check=_upscale_check,
    )
)


def _outpaint_check(request: Request, engine: Any) -> Request:
    from sdkit import outpainting  # on first use, like the runners (sdkit.outpaint: the function)

    return outpainting.check(request, engine)


def _run_outpaint(ctx: Any) -> list:
    from sdkit import outpainting

    return outpainting.run(ctx)


register(
    ModeSpec(
        name=Mode.OUTPAINT,
        title="Outpaint",
        fields=(
            "image",
            *(f for f in _PROMPTED if f not in ("width", "height")),  # the size is the output's
            "strength",
            "left",
            "right",
            "top",
            "bottom",
            "extend_fill",
            "seam",
            "mask_blur",
        ),
        required=("image",),
        inputs=("image",),
        pipelines=_family_table(
            "StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"
        ),  # passes run through the inpaint pipeline (sdkit.outpainting)
        run=_run_outpaint,
        check=_outpaint_check,
    )
)
