"""One `Request` for every generation mode, its validation, and its two text forms.

Every way into sdkit (Python call, CLI, widget, bridge message, PNG metadata) becomes a
`Request`.  Field names follow diffusers so keyword arguments carry over.  The request
converts to a JSON-safe dict (the bridge) and to A1111 "infotext" (the PNG `parameters`
text chunk), and parses infotext written by A1111 itself, keeping keys it does not know in
`extra` so that writing it back loses nothing.

Prompt rules (decided here, documented in `Request.validate`):
- txt2img needs a non-empty prompt (generation without one is `mode="unconditional"`);
- img2img and inpaint accept an empty prompt (the image carries the content; A1111 does
  the same, e.g. inpainting "nothing" to remove an object);
- unconditional takes no prompt (a non-empty one is an error, not silently dropped); its
  negative prompt is ignored.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

MODES = ("txt2img", "img2img", "inpaint", "unconditional")
FILLS = ("original", "fill", "noise")
RESIZE_MODES = ("resize", "crop", "fill")

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
)
_IMG2IMG = (*_PROMPTED, "image", "strength", "resize_mode")
# The fields each mode reads; the CLI's flags and the widget's tabs both follow this table.
FIELDS_BY_MODE: dict[str, tuple[str, ...]] = {
    "txt2img": _PROMPTED,
    "img2img": _IMG2IMG,
    "inpaint": (*_IMG2IMG, "mask", "mask_blur", "grow", "only_masked", "padding", "fill"),
    "unconditional": ("num_inference_steps", "width", "height", "seed", "scheduler", "num_images"),
}

MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_SIZE = 4096
MAX_SEED = 2**32 - 1

_IMAGE_FIELDS = ("image", "mask")


class RequestError(ValueError):
    """A bad request field: `field` names it, the message names the allowed values."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # keep pickling (multiprocessing, bridge workers) working
        return (type(self), (self.field, self.message))


# ---------------------------------------------------------------------------- images


def load_image(value: Any, field: str = "image") -> Image.Image:
    """Turn a PIL image, a path, encoded bytes, base64 text or a uint8 array into a loaded
    PIL image; anything unreadable is a `RequestError` naming `field`."""
    if isinstance(value, Image.Image):
        try:
            value.load()
        except Exception as e:  # truncated or corrupt file behind a lazy image
            raise RequestError(field, f"the image cannot be read ({e})") from e
        return value
    if isinstance(value, np.ndarray):
        return _image_from_array(value, field)
    if isinstance(value, bytes | bytearray | memoryview):
        return _image_from_bytes(bytes(value), field, "bytes")
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str) and text.startswith("data:") and ";base64," in text:
            return _image_from_bytes(_b64(text.split(",", 1)[1], field), field, "data URL")
        path = Path(text)
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # e.g. a long base64 string is not a valid path
            is_file = False
        if is_file:
            try:
                with Image.open(path) as im:
                    im.load()
                    return im.copy()
            except (OSError, UnidentifiedImageError) as e:
                raise RequestError(field, f"cannot read image file {text!r} ({e})") from e
        if isinstance(text, str) and len(text) > 64:
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                data = None
            if data is not None:
                return _image_from_bytes(data, field, "base64 text")
        raise RequestError(field, f"no such image file: {text!r}")
    raise RequestError(
        field,
        f"expected a PIL image, a path, PNG/JPEG bytes or base64 text, got {type(value).__name__}",
    )


def load_mask(value: Any, field: str = "mask") -> Image.Image:
    """`load_image` then greyscale: 255 repaint, 0 keep, grey in between is soft."""
    im = load_image(value, field)
    return im if im.mode == "L" else im.convert("L")


def image_to_base64(image: Image.Image) -> str:
    """PNG, base64, no data-URL prefix (what `to_dict(images=True)` writes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _b64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(field, f"invalid base64 image data ({e})") from e


def _image_from_bytes(data: bytes, field: str, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise RequestError(field, f"the {what} are not a readable image ({e})") from e


def _image_from_array(arr: np.ndarray, field: str) -> Image.Image:
    if (
        arr.dtype != np.uint8
        or arr.ndim not in (2, 3)
        or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4))
    ):
        raise RequestError(
            field, f"an array image must be uint8 HxW, HxWx3 or HxWx4, got {arr.dtype} {arr.shape}"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr))


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
    model: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ validation

    def validate(
        self, *, vae_factor: int = 8, scheduler_names: Iterable[str] | None = None
    ) -> None:
        """Raise one `RequestError` for the first bad field, else return None.

        Side effect, on purpose: `image` and `mask` given as a path, bytes, base64 text or
        array are loaded in place (image -> RGB, mask -> "L") so the engine only sees PIL.
        `None` in the model-default fields (steps, guidance, size, seed, scheduler) is valid.
        """
        if self.mode not in MODES:
            raise RequestError("mode", f"unknown mode {self.mode!r}; allowed: {', '.join(MODES)}")
        self._validate_prompts()
        _check_int("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS, optional=True)
        g = self.guidance_scale
        if g is not None:
            if not _is_number(g) or not math.isfinite(g):
                raise RequestError("guidance_scale", f"must be a number >= 0, got {g!r}")
            if g < 0:
                raise RequestError(
                    "guidance_scale", f"must be >= 0 (0 turns guidance off), got {g!r}"
                )
        for name in ("width", "height"):
            _check_size(name, getattr(self, name), vae_factor)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("num_images", self.num_images, 1, MAX_IMAGES)
        s = self.strength
        if not _is_number(s) or not math.isfinite(s) or not 0 < s <= 1:
            raise RequestError("strength", f"must be a number in (0, 1], got {s!r}")
        for name in ("mask_blur", "grow", "padding"):
            _check_int(name, getattr(self, name), 0, None)
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
        self._validate_images()

    def _validate_prompts(self) -> None:
        if not isinstance(self.negative_prompt, str):
            raise RequestError(
                "negative_prompt", f"must be a string, got {type(self.negative_prompt).__name__}"
            )
        if self.prompt is None:
            if self.mode == "unconditional":
                return
            raise RequestError("prompt", f"missing: {self.mode} needs a prompt string")
        if not isinstance(self.prompt, str):
            raise RequestError("prompt", f"must be a string, got {type(self.prompt).__name__}")
        if self.mode == "txt2img" and not self.prompt.strip():
            raise RequestError(
                "prompt",
                "missing: txt2img needs a non-empty prompt (for no prompt use mode='unconditional')",
            )
        if self.mode == "unconditional" and self.prompt.strip():
            raise RequestError(
                "prompt", "must be empty for unconditional generation (use txt2img for a prompt)"
            )

    def _validate_images(self) -> None:
        if self.mode not in ("img2img", "inpaint"):
            return
        if self.image is None:
            raise RequestError("image", f"missing: {self.mode} needs an input image")
        image = load_image(self.image, "image")
        self.image = image if image.mode == "RGB" else image.convert("RGB")
        if self.mode != "inpaint":
            return
        if self.mask is None:
            raise RequestError(
                "mask", "missing: inpaint needs a mask (white = repaint, black = keep)"
            )
        self.mask = load_mask(self.mask, "mask")
        if self.mask.size != self.image.size:
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
        return dataclasses.replace(self, extra=dict(self.extra), **fill)

    def to_dict(self, *, images: bool = False) -> dict:
        """JSON-safe dict; `image`/`mask` as base64 PNG only when `images`, else left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _IMAGE_FIELDS:
                if images and value is not None:
                    out[f.name] = image_to_base64(load_image(value, f.name))
                continue
            if f.name == "extra":
                value = dict(value)
            elif isinstance(value, np.generic):
                value = value.item()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> Request:
        """Inverse of `to_dict`; unknown keys are a `RequestError` that names them."""
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


# ---------------------------------------------------------------------------- checks


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def _check_int(name: str, v: Any, lo: int, hi: int | None, *, optional: bool = False) -> None:
    if v is None and optional:
        return
    allowed = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
    if not _is_int(v):
        raise RequestError(name, f"must be {allowed}, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise RequestError(name, f"must be {allowed}, got {v}")


def _check_size(name: str, v: Any, vae_factor: int) -> None:
    if v is None:
        return
    allowed = (
        f"a positive multiple of {vae_factor} up to {MAX_SIZE} (the VAE factor is {vae_factor})"
    )
    if not _is_int(v) or v <= 0 or v > MAX_SIZE or v % vae_factor:
        hint = ""
        if _is_int(v) and 0 < v <= MAX_SIZE and v % vae_factor:
            lower = v - v % vae_factor
            hint = f"; try {lower or vae_factor} or {lower + vae_factor}"
        raise RequestError(name, f"must be {allowed}, got {v!r}{hint}")


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
