"""One `Request` for every generation mode, its validation, and its two text forms.

Every way into sdkit (Python call, CLI, widget, bridge message, PNG metadata) becomes a
`Request`.  Field names follow diffusers so keyword arguments carry over.  The request
converts to a JSON-safe dict (the bridge) and to A1111 "infotext" (the PNG `parameters`
text chunk), and parses infotext written by A1111 itself, keeping keys it does not know in
`extra` so that writing it back loses nothing.

Prompt rules follow the mode's spec (`sdkit.modes`): a mode that requires "prompt"
(txt2img) needs a non-empty one; a mode that reads it without requiring it (img2img,
inpaint: the image carries the content, as in A1111) accepts an empty one; a mode that does
not read it (unconditional) refuses a non-empty one rather than silently dropping it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from sdkit.errors import RequestError
from sdkit.images import image_to_base64, load_image, load_mask  # re-exported

T = TypeVar("T")


FILLS = ("original", "fill", "noise")
RESIZE_MODES = ("resize", "crop", "fill")

# Limits, one rule for the API, the CLI, the widget and the bridge (`Request.validate`).
MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_SIZE = 4096
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 100
MAX_PIXELS = 4096 * 4096  # width x height x num_images of one job, as it will run
MIN_STRENGTH = 0.001  # 1000 steps x 0.001 = one denoising step
# [lo, hi] of every numeric field (inclusive); sizes also must be a multiple of the model's
# size multiple, and the engine raises `lo` of width/height to it (`Engine.info()["ranges"]`).
RANGES: dict[str, tuple[float, float]] = {
    "num_inference_steps": (1, MAX_STEPS),
    "guidance_scale": (0, MAX_GUIDANCE),
    "width": (1, MAX_SIZE),
    "height": (1, MAX_SIZE),
    "seed": (0, MAX_SEED),
    "num_images": (1, MAX_IMAGES),
    "strength": (MIN_STRENGTH, 1),
    "mask_blur": (0, 64),  # pixels of feathering
    "grow": (0, 256),  # pixels of dilation
    "padding": (0, 512),  # context pixels around the mask (only_masked)
    "clip_skip": (1, 12),  # A1111's numbering: 1 = the last CLIP layer, 2 = penultimate
    "hires_scale": (1, 4),  # txt2img hires fix: second pass at this multiple of the size
    "hires_steps": (0, MAX_STEPS),  # 0: as many as num_inference_steps (A1111)
    "hires_denoise": (MIN_STRENGTH, 1),  # the second pass's img2img strength
    "hires_width": (0, MAX_SIZE),  # txt2img hires fix target size (A1111's "Resize width
    "hires_height": (0, MAX_SIZE),  # to"); 0 = unset; either one set overrides hires_scale
    "left": (0, MAX_SIZE),  # outpaint: pixels added on each side
    "right": (0, MAX_SIZE),
    "top": (0, MAX_SIZE),
    "bottom": (0, MAX_SIZE),
    "seam": (0, 256),  # outpaint: band of the original repainted under a soft mask
    "upscale_factor": (1, 4),  # upscale: output size / input size
    "tile_overlap": (0, 256),  # upscale: pixels shared by neighbouring tiles
}
LORA_WEIGHTS = (0, 4)  # [lo, hi] of each `loras` entry's weight (A1111's <lora:NAME:WEIGHT>)
HIRES_UPSCALERS = ("Latent", "Lanczos")  # A1111's names
EXTEND_FILLS = ("stretch", "noise", "colour")  # outpaint: what the new area starts from

_IMAGE_FIELDS = ("image", "mask")


# ---------------------------------------------------------------------------- request


@dataclass
class Request:
    """Everything one generation needs; `None` fields are filled from the model's defaults."""

    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    scheduler: str | None = None
    num_images: int = 1
    strength: float = 0.75
    image: Image.Image | None = None
    mask: Image.Image | None = None
    mask_blur: int = 4
    grow: int = 0
    only_masked: bool = False
    padding: int = 32
    fill: str = "original"
    resize_mode: str = "resize"
    clip_skip: int | None = None  # None or 1: the last layer (sdkit.conditioning)
    loras: list[dict] = field(default_factory=list)  # [{"name": str, "weight": float}]
    hires_scale: float | None = None  # txt2img: None or 1 = no hires fix
    hires_steps: int = 0
    hires_denoise: float = 0.7
    hires_upscaler: str = "Latent"
    hires_width: int = 0  # hires target size; 0: from the other side or hires_scale
    hires_height: int = 0
    left: int = 0  # outpaint
    right: int = 0
    top: int = 0
    bottom: int = 0
    extend_fill: str = "stretch"
    seam: int = 32
    upscale_factor: float = 2.0  # upscale
    tile_overlap: int = 32
    control: list[dict] = field(default_factory=list)  # ControlNet units (sdkit.control)
    model: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ validation

    def validate(
        self, *, vae_factor: int = 8, scheduler_names: Iterable[str] | None = None
    ) -> None:
        """Raise one `RequestError` for the first bad field, else return None.

        `vae_factor`: the model's size multiple (`Engine.size_multiple`: max(8, VAE factor)
        for text models, since diffusers' pipelines need multiples of 8).

        The mode must be registered (`sdkit.modes`); its spec says which fields it requires.
        Every numeric field must lie in `RANGES` (inclusive): steps 1..1000, guidance 0..100,
        width/height 1..4096 and a multiple of `vae_factor`, seed 0..2**32-1, num_images
        1..16, strength 0.001..1, mask_blur 0..64, grow 0..256, padding 0..512; and when the
        size is known, width x height x num_images <= MAX_PIXELS (16 Mpx). Huge integers
        are refused like any other out-of-range value (never an OverflowError).

        Side effect, on purpose: `image` and `mask` given as a path, bytes, base64 text or
        array are loaded in place (image -> RGB, mask -> "L") so the engine only sees PIL.
        `None` in the model-default fields (steps, guidance, size, seed, scheduler) is valid.
        """
        from sdkit import modes

        spec = modes.get(self.mode)
        self._validate_prompts(spec)
        _check_range("num_inference_steps", self.num_inference_steps, integer=True)
        _check_range("guidance_scale", self.guidance_scale, integer=False)
        for name in ("width", "height"):
            _check_size(name, getattr(self, name), vae_factor)
        _check_range("seed", self.seed, integer=True)
        _check_range("num_images", self.num_images, integer=True, optional=False)
        _check_range("strength", self.strength, integer=False, optional=False)
        for name in ("mask_blur", "grow", "padding"):
            _check_range(name, getattr(self, name), integer=True, optional=False)
        _check_range("clip_skip", self.clip_skip, integer=True)
        _check_loras(self.loras)
        _check_range("hires_scale", self.hires_scale, integer=False)
        _check_range("hires_steps", self.hires_steps, integer=True, optional=False)
        _check_range("hires_denoise", self.hires_denoise, integer=False, optional=False)
        _check_choice("hires_upscaler", self.hires_upscaler, HIRES_UPSCALERS)
        for name in ("hires_width", "hires_height"):
            _check_range(name, getattr(self, name), integer=True, optional=False)
            if getattr(self, name):
                _check_size(name, getattr(self, name), vae_factor)
        for name in ("left", "right", "top", "bottom", "seam", "tile_overlap"):
            _check_range(name, getattr(self, name), integer=True, optional=False)
        _check_range("upscale_factor", self.upscale_factor, integer=False, optional=False)
        _check_choice("extend_fill", self.extend_fill, EXTEND_FILLS)
        from sdkit.control import check_units

        self.control = check_units(self.control, self.mode, "control" in spec.fields)
        if not isinstance(self.only_masked, bool | np.bool_):
            raise RequestError("only_masked", f"must be True or False, got {self.only_masked!r}")
        if self.fill not in FILLS:
            raise RequestError("fill", f"unknown fill {self.fill!r}; allowed: {', '.join(FILLS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise RequestError(
                "resize_mode",
                f"unknown resize mode {self.resize_mode!r}; allowed: {', '.join(RESIZE_MODES)}",
            )
        if self.model is not None and not isinstance(self.model, str):
            raise RequestError(
                "model", f"must be a string or None, got {type(self.model).__name__}"
            )
        if not isinstance(self.extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.extra.items()
        ):
            raise RequestError("extra", "must be a dict of str to str (unknown infotext keys)")
        if self.scheduler is not None:
            _check_scheduler(self.scheduler, scheduler_names)
        self._validate_images(spec)
        check_pixels(self)

    def _validate_prompts(self, spec: Any) -> None:
        if not isinstance(self.negative_prompt, str):
            raise RequestError(
                "negative_prompt", f"must be a string, got {type(self.negative_prompt).__name__}"
            )
        takes_prompt = "prompt" in spec.fields
        if self.prompt is None:
            if not takes_prompt:
                return
            raise RequestError("prompt", f"missing: {self.mode} needs a prompt string")
        if not isinstance(self.prompt, str):
            raise RequestError("prompt", f"must be a string, got {type(self.prompt).__name__}")
        if "prompt" in spec.required and not self.prompt.strip():
            hint = " (for no prompt use mode='unconditional')" if self.mode == "txt2img" else ""
            raise RequestError("prompt", f"missing: {self.mode} needs a non-empty prompt{hint}")
        if not takes_prompt and self.prompt.strip():
            raise RequestError(
                "prompt",
                f"must be empty for {self.mode} generation (use txt2img for a prompt)",
            )

    def _validate_images(self, spec: Any) -> None:
        if "image" in spec.required and self.image is None:
            raise RequestError("image", f"missing: {self.mode} needs an input image")
        if "mask" in spec.required and self.mask is None:
            raise RequestError(
                "mask", f"missing: {self.mode} needs a mask (white = repaint, black = keep)"
            )
        if "image" in spec.inputs and self.image is not None:
            image = load_image(self.image, "image")
            self.image = image if image.mode == "RGB" else image.convert("RGB")
        if "mask" in spec.inputs and self.mask is not None:
            self.mask = load_mask(self.mask, "mask")
            if self.image is not None and self.mask.size != self.image.size:
                raise RequestError(
                    "mask",
                    f"size {self.mask.size[0]}x{self.mask.size[1]} differs from the image's "
                    f"{self.image.size[0]}x{self.image.size[1]}; they must be equal",
                )

    # ------------------------------------------------------------------ defaults, dicts

    def with_defaults(self, defaults: Mapping[str, Any]) -> Request:
        """A copy with every `None` field that `defaults` names filled in (other keys ignored)."""
        names = {f.name for f in dataclasses.fields(self)}
        fill = {
            k: v
            for k, v in defaults.items()
            if k in names and getattr(self, k) is None and v is not None
        }
        return dataclasses.replace(
            self,
            extra=dict(self.extra),
            loras=[dict(x) for x in self.loras],
            control=[dict(u) for u in self.control],
            **fill,
        )

    def to_dict(self, *, images: bool = False) -> dict:
        """JSON-safe dict; `image`/`mask` (and control unit images) as base64 PNG only when
        `images`, else left out."""
        from sdkit import control

        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _IMAGE_FIELDS:
                if images and value is not None:
                    out[f.name] = image_to_base64(load_image(value, f.name))
                continue
            if f.name == "extra":
                value = dict(value)
            elif f.name == "loras":
                value = [dict(item) for item in value]
            elif f.name == "control":  # unit images like image/mask: base64 or left out
                value = [control.unit_to_dict(u, images) for u in value]
            elif isinstance(value, np.generic):
                value = value.item()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> Request:
        """Inverse of `to_dict`; unknown keys are a `RequestError` that names them."""
        from sdkit import control

        if not isinstance(d, Mapping):
            raise RequestError("request", f"expected a mapping of fields, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise RequestError(
                str(unknown[0]),
                f"unknown field(s) {', '.join(map(repr, unknown))}; known fields: {', '.join(names)}",
            )
        kwargs = dict(d)
        for name in _IMAGE_FIELDS:
            if kwargs.get(name) is not None:
                kwargs[name] = load_image(kwargs[name], name)
        if isinstance(kwargs.get("control"), list):
            kwargs["control"] = [control.unit_from_dict(u, i) for i, u in enumerate(d["control"])]
        if "extra" in kwargs:
            extra = kwargs["extra"]
            if extra is None:
                extra = {}
            if not isinstance(extra, Mapping):
                raise RequestError(
                    "extra", f"must be a mapping of str to str, got {type(extra).__name__}"
                )
            kwargs["extra"] = {str(k): str(v) for k, v in extra.items()}
        return cls(**kwargs)

    # ------------------------------------------------------------------ infotext

    def to_infotext(self, *, seed: int | None = None) -> str:
        """A1111-style parameters text: prompt, `Negative prompt: …`, then `Key: value, …`.

        `seed` overrides the request's seed (a batch writes each image's own seed).
        """
        from sdkit.infotext import format_infotext

        return format_infotext(self, seed=seed)

    @classmethod
    def from_infotext(cls, text: str) -> Request:
        """Parse infotext written by sdkit or by A1111; unknown keys are kept in `extra`."""
        from sdkit.infotext import parse_infotext

        return parse_infotext(text, cls)

    @classmethod
    def from_png(cls, path_or_image: Any) -> Request:
        """The request stored in a PNG's `parameters` text chunk (sdkit or A1111)."""
        image = load_image(path_or_image, "image")
        text = image.info.get("parameters")
        if text is None:
            text = getattr(image, "text", {}).get("parameters") if hasattr(image, "text") else None
        if not isinstance(text, str) or not text.strip():
            raise RequestError(
                "parameters",
                "the image has no 'parameters' text chunk (not written by sdkit or A1111)",
            )
        return cls.from_infotext(text)


def make_request(mode: str, **fields: Any) -> Request:
    """A Request from keyword arguments; an unknown keyword is a `RequestError` naming it."""
    names = [f.name for f in dataclasses.fields(Request)]
    for key in fields:
        if key not in names or key == "mode":
            raise RequestError(
                key, f"unknown field; known fields: {', '.join(n for n in names if n != 'mode')}"
            )
    return Request(mode=mode, **fields)


def __getattr__(name: str) -> Any:
    """`MODES` and `FIELDS_BY_MODE`: views of the mode registry (`sdkit.modes`), read live."""
    if name in ("MODES", "FIELDS_BY_MODE"):
        from sdkit import modes

        specs = modes.registered()
        if name == "MODES":
            return tuple(str(s.name) for s in specs)
        return {str(s.name): s.fields for s in specs}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------- checks


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def _check_range(name: str, v: Any, *, integer: bool, optional: bool = True) -> None:
    """`v` within `RANGES[name]` (None allowed when `optional`); compares without float()."""
    if v is None and optional:
        return
    lo, hi = RANGES[name]
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} in {lo}..{hi}"
    ok_type = _is_int(v) if integer else _is_number(v)
    if not ok_type:
        raise RequestError(name, f"must be {allowed}, got {_shown(v)}")
    if not integer and not _is_int(v):
        try:
            finite = math.isfinite(v)
        except (OverflowError, ValueError):
            finite = False
        if not finite:
            raise RequestError(name, f"must be {allowed}, got {_shown(v)}")
    if not lo <= v <= hi:  # exact for ints of any size (no float conversion)
        raise RequestError(name, f"must be {allowed}, got {_shown(v)}")


def _check_choice(name: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise RequestError(name, f"unknown value {_shown(v)}; allowed: {', '.join(allowed)}")


def _check_loras(loras: Any) -> None:
    """`loras`: a list of {"name": non-empty str, "weight": number in RANGES["lora_weight"]}."""
    if not isinstance(loras, list):
        raise RequestError("loras", f"must be a list of {{name, weight}}, got {_shown(loras)}")
    lo, hi = LORA_WEIGHTS
    for i, item in enumerate(loras):
        where = f"loras[{i}]"
        if not isinstance(item, Mapping) or set(item) - {"name", "weight"}:
            raise RequestError(
                where, f"must be {{'name': str, 'weight': number}}, got {_shown(item)}"
            )
        name = item.get("name")
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\:<>"):
            raise RequestError(
                f"{where}.name", f"must be a LoRA name (no path), got {_shown(name)}"
            )
        weight = item.get("weight", 1.0)
        if not _is_number(weight) or not math.isfinite(weight) or not lo <= weight <= hi:
            raise RequestError(
                f"{where}.weight",
                f"LoRA {name!r}: weight must be a number in {lo}..{hi}, got {_shown(weight)}",
            )


def filled(value: T | None, field: str) -> T:
    """A field `Engine.check` fills (size, steps, seed, ...): never None once checked."""
    if value is None:
        raise RequestError(field, "missing: not filled in (run the request through Engine.check)")
    return value


def check_pixels(req: Request) -> None:
    """width x height x num_images <= MAX_PIXELS once the size is known (the job as it runs)."""
    w, h, n = req.width, req.height, req.num_images
    if w is None or h is None or not (_is_int(w) and _is_int(h) and _is_int(n)):
        return
    if w * h * n > MAX_PIXELS:
        field = "num_images" if n > 1 and w * h <= MAX_PIXELS else "width"
        raise RequestError(
            field,
            f"{w}x{h} x {n} image(s) = {w * h * n} pixels; one job may make at most "
            f"{MAX_PIXELS} pixels (width x height x num_images)",
        )


def _check_size(name: str, v: Any, vae_factor: int) -> None:
    if v is None:
        return
    allowed = f"a positive multiple of {vae_factor} up to {MAX_SIZE} (this model's size step)"
    if not _is_int(v) or v <= 0 or v > MAX_SIZE or v % vae_factor:
        hint = ""
        if _is_int(v) and 0 < v <= MAX_SIZE and v % vae_factor:
            lower = v - v % vae_factor
            hint = f"; try {lower or vae_factor} or {lower + vae_factor}"
        raise RequestError(name, f"must be {allowed}, got {_shown(v)}{hint}")


def _shown(v: Any) -> str:
    """A value for an error message; a huge integer is cut short, not printed in full."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _check_scheduler(name: Any, scheduler_names: Iterable[str] | None) -> None:
    from sdkit import schedulers

    if not isinstance(name, str):
        raise RequestError(
            "scheduler", f"must be a scheduler name (string), got {type(name).__name__}"
        )
    if scheduler_names is None:
        known = schedulers.scheduler_names()
        try:
            schedulers.canonical_name(name)
            return
        except KeyError:
            pass
    else:
        known = list(scheduler_names)
        lowered = {n.lower() for n in known}
        if name.lower() in lowered:
            return
        try:
            if schedulers.canonical_name(name).lower() in lowered:
                return
        except KeyError:
            pass
    raise RequestError("scheduler", f"unknown scheduler {name!r}; known: {', '.join(known)}")
