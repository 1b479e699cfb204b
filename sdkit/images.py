"""Loading the pictures a request carries: whatever a user passes becomes a loaded PIL image.

A PIL image, a path, PNG/JPEG bytes, base64 text (or a data URL) or a uint8 array; anything
unreadable is a `RequestError` naming the field, never a PIL exception from deep inside.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdkit.errors import RequestError


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
                    _check_header(im, field)
                    im.load()
                    return im.copy()
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
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
            _check_header(im, field)
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(field, f"the {what} are not a readable image ({e})") from e


def _check_header(im: Image.Image, field: str) -> None:
    """Refuse a picture over the pixel limit from its header, before decoding a byte of it
    (a small PNG can claim gigapixels)."""
    from sdkit.request import MAX_PIXELS

    w, h = im.size
    if w * h > MAX_PIXELS:
        raise RequestError(
            field, f"{w}x{h} is over the limit of {MAX_PIXELS} pixels; it was not decoded"
        )


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
