"""The plug-ins' geometry and pixels: which canvas area to send, masks, the layer to add.

Standard library only, because it runs inside the editors' own Pythons, which have
neither numpy nor sdkit. The editor-specific code reads pixels and the selection, calls
into this module (and ``editor_actions``), and writes one layer back; everything that can
be tested without an editor lives here.

Conventions: pixels are straight-alpha RGBA8 row-major ``bytes``; masks are 8-bit
(0 keep ... 255 repaint, soft values allowed); rectangles are in canvas pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MULTIPLE = 8
"""Generation sizes are multiples of this unless the server's ``hello`` says otherwise."""

DEFAULT_MARGIN = 32
"""Context pixels added around a selection so the model sees what surrounds it."""

LAYER_PREFIX = "[sdkit]"


class EditorError(ValueError):
    """A problem the artist can fix; its message is shown as is in the editor."""


class SelectionError(EditorError):
    """The selection cannot be used (empty, outside the canvas, too large)."""


@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle in canvas pixels; ``right``/``bottom`` are exclusive."""

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.x + self.width

    @property
    def bottom(self) -> int:
        return self.y + self.height

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    def is_empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def intersect(self, other: Rect) -> Rect:
        x, y = max(self.x, other.x), max(self.y, other.y)
        r, b = min(self.right, other.right), min(self.bottom, other.bottom)
        return Rect(x, y, max(r - x, 0), max(b - y, 0))

    def contains(self, other: Rect) -> bool:
        return (
            self.x <= other.x
            and self.y <= other.y
            and other.right <= self.right
            and other.bottom <= self.bottom
        )

    @classmethod
    def from_corners(cls, x1: int, y1: int, x2: int, y2: int) -> Rect:
        return cls(x1, y1, x2 - x1, y2 - y1)


@dataclass(frozen=True)
class Region:
    """Where a selection's request comes from and how big the generated image is.

    ``rect`` is the canvas area read (the selection grown by the margin, clamped to the
    canvas, then widened to the size multiple where the canvas allows). ``width``/``height``
    is what is sent and generated: multiples of the server's size multiple, at least
    ``rect``'s size; the rest is padding beyond the canvas edge, filled by repeating the
    edge pixels and cut off again when the result is placed. ``selection`` is the selection's bounds on the canvas.
    """

    rect: Rect
    width: int
    height: int
    selection: Rect

    @property
    def pad_right(self) -> int:
        return self.width - self.rect.width

    @property
    def pad_bottom(self) -> int:
        return self.height - self.rect.height


def round_up(value: int, multiple: int = DEFAULT_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def _fit_axis(start: int, end: int, canvas: int, multiple: int) -> tuple[int, int, int]:
    """Widen [start, end) to a multiple within [0, canvas); returns (start, end, sent size).

    When the canvas itself is too short, the whole axis is read and the sent size is
    rounded up (the difference is padding).
    """
    length = end - start
    target = round_up(length, multiple)
    if target > canvas:
        return 0, canvas, round_up(canvas, multiple)
    extra = target - length
    start -= extra // 2
    end += extra - extra // 2
    if start < 0:
        end, start = end - start, 0
    if end > canvas:
        start, end = start - (end - canvas), canvas
    return start, end, target


def context_region(
    selection: Rect,
    canvas_width: int,
    canvas_height: int,
    *,
    margin: int = DEFAULT_MARGIN,
    multiple: int = DEFAULT_MULTIPLE,
) -> Region:
    """The canvas area to send for a selection: grown by ``margin``, clamped, rounded.

    Raises SelectionError for an empty selection or one that lies outside the canvas.
    """
    if canvas_width <= 0 or canvas_height <= 0:
        raise EditorError(f"the canvas is empty ({canvas_width}x{canvas_height})")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if selection.is_empty():
        raise SelectionError(
            "nothing is selected: select the region to change first (Select All for the whole image)"
        )
    canvas = Rect(0, 0, canvas_width, canvas_height)
    sel = selection.intersect(canvas)
    if sel.is_empty():
        raise SelectionError(
            f"the selection ({selection.width}x{selection.height} at {selection.x},{selection.y}) "
            f"lies outside the {canvas_width}x{canvas_height} canvas"
        )
    grown = Rect(sel.x - margin, sel.y - margin, sel.width + 2 * margin, sel.height + 2 * margin)
    grown = grown.intersect(canvas)
    x0, x1, width = _fit_axis(grown.x, grown.right, canvas_width, multiple)
    y0, y1, height = _fit_axis(grown.y, grown.bottom, canvas_height, multiple)
    return Region(Rect(x0, y0, x1 - x0, y1 - y0), width, height, sel)


def check_size(region: Region, max_pixels: int | None) -> None:
    """Refuse a region the server would refuse, with a message that says what to do."""
    if max_pixels and region.width * region.height > max_pixels:
        raise SelectionError(
            f"the selected area needs a {region.width}x{region.height} image "
            f"({region.width * region.height} pixels) but the server allows at most "
            f"{max_pixels} pixels: select a smaller region"
        )


# --- pixels and masks ---------------------------------------------------------------


def _check_len(data: bytes | bytearray, width: int, height: int, channels: int, what: str) -> None:
    if len(data) != width * height * channels:
        raise ValueError(
            f"{what}: expected {width}x{height}x{channels} = {width * height * channels} bytes, "
            f"got {len(data)}"
        )


def crop(data: bytes, width: int, height: int, rect: Rect, channels: int) -> bytes:
    """Rows ``rect`` of an image ``width`` x ``height`` with ``channels`` bytes per pixel."""
    _check_len(data, width, height, channels, "crop")
    if not Rect(0, 0, width, height).contains(rect):
        raise ValueError(f"crop {rect} is outside the {width}x{height} image")
    stride = width * channels
    out = bytearray()
    for y in range(rect.y, rect.bottom):
        start = y * stride + rect.x * channels
        out += data[start : start + rect.width * channels]
    return bytes(out)


def pad(
    data: bytes,
    width: int,
    height: int,
    new_width: int,
    new_height: int,
    channels: int,
    fill: int | None = None,
) -> bytes:
    """Grow an image to the right and bottom: repeat the edge (``fill=None``) or a constant."""
    _check_len(data, width, height, channels, "pad")
    if new_width < width or new_height < height:
        raise ValueError(f"cannot pad {width}x{height} down to {new_width}x{new_height}")
    if (new_width, new_height) == (width, height):
        return bytes(data)
    stride = width * channels
    extra = new_width - width
    rows = []
    for y in range(height):
        row = data[y * stride : (y + 1) * stride]
        if fill is None:
            tail = row[-channels:] * extra
        else:
            tail = bytes([fill]) * (extra * channels)
        rows.append(bytes(row) + tail)
    last = rows[-1] if fill is None else bytes([fill]) * (new_width * channels)
    rows.extend([last] * (new_height - height))
    return b"".join(rows)


def mask_is_empty(mask: bytes) -> bool:
    return not mask.strip(b"\x00")


def mask_bounds(mask: bytes, width: int, height: int) -> Rect | None:
    """Tight bounds of the non-zero pixels of an 8-bit mask, or None when it is all zero."""
    _check_len(mask, width, height, 1, "mask_bounds")
    rows = [y for y in range(height) if mask[y * width : (y + 1) * width].strip(b"\x00")]
    if not rows:
        return None
    left, right = width, 0
    for y in rows:
        row = mask[y * width : (y + 1) * width]
        left = min(left, len(row) - len(row.lstrip(b"\x00")))
        right = max(right, len(row.rstrip(b"\x00")))
    return Rect(left, rows[0], right - left, rows[-1] + 1 - rows[0])


def apply_mask_alpha(rgba: bytes, mask: bytes) -> bytes:
    """Multiply each pixel's alpha by the mask (255 keeps it, 0 clears it, grey blends).

    This is how a result is "masked by the selection": the new layer is transparent
    outside the selection and fades out along its soft edge.
    """
    if len(rgba) != 4 * len(mask):
        raise ValueError(f"image of {len(rgba)} bytes does not match a mask of {len(mask)} pixels")
    out = bytearray(rgba)
    alpha = rgba[3::4]
    if alpha.count(255) == len(alpha):
        out[3::4] = mask
    else:
        out[3::4] = bytes((a * m + 127) // 255 for a, m in zip(alpha, mask, strict=True))
    return bytes(out)


def full_mask(width: int, height: int) -> bytes:
    return b"\xff" * (width * height)


@dataclass(frozen=True)
class Prepared:
    """The pixels and mask of a region, padded to the size that is sent."""

    region: Region
    image: bytes  # RGBA8, region.width x region.height
    mask: bytes  # 8-bit, region.width x region.height


def prepare(region: Region, rgba: bytes, mask: bytes | None) -> Prepared:
    """Pad the pixels read from ``region.rect`` (and the selection mask there) for sending.

    ``mask`` covers ``region.rect`` (one byte per pixel); None means "everything". The
    padding repeats the edge pixels (so the model sees no hard border) and is never
    repainted (mask 0).
    """
    r = region.rect
    _check_len(rgba, r.width, r.height, 4, "image under the selection")
    if mask is None:
        mask = full_mask(r.width, r.height)
    _check_len(mask, r.width, r.height, 1, "selection mask")
    if mask_is_empty(mask):
        raise SelectionError("the selection is empty (fully transparent): select a region first")
    image = pad(rgba, r.width, r.height, region.width, region.height, 4)
    mask = pad(mask, r.width, r.height, region.width, region.height, 1, fill=0)
    return Prepared(region, image, mask)


@dataclass(frozen=True)
class Placement:
    """A result ready to become a layer: straight-alpha RGBA8 at (x, y) on the canvas."""

    x: int
    y: int
    width: int
    height: int
    rgba: bytes
    name: str


def layer_name(prompt: str, seed: int | None, limit: int = 40) -> str:
    """``[sdkit] prompt (seed)``, the prompt shortened so the layer list stays readable."""
    text = " ".join(prompt.split()) or "(no prompt)"
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return f"{LAYER_PREFIX} {text} ({seed})" if seed is not None else f"{LAYER_PREFIX} {text}"


def place_result(
    region: Region,
    rgba: bytes,
    width: int,
    height: int,
    mask: bytes | None,
    *,
    prompt: str,
    seed: int | None,
) -> Placement:
    """Turn a generated image for ``region`` into the layer to add.

    The layer covers the selection's bounds (not the context margin around them): the
    padding and margin are cut off, and when a selection ``mask`` (covering
    ``region.rect``) is given the layer is masked by it, so it fades out along the
    selection's soft edge and is transparent outside it.
    """
    if (width, height) != (region.width, region.height):
        raise EditorError(
            f"the server sent a {width}x{height} image for a {region.width}x{region.height} request"
        )
    _check_len(rgba, width, height, 4, "result image")
    r, sel = region.rect, region.selection
    local = Rect(sel.x - r.x, sel.y - r.y, sel.width, sel.height)
    pixels = crop(rgba, width, height, local, 4)
    if mask is not None:
        _check_len(mask, r.width, r.height, 1, "selection mask")
        pixels = apply_mask_alpha(pixels, crop(mask, r.width, r.height, local, 1))
    return Placement(sel.x, sel.y, sel.width, sel.height, pixels, layer_name(prompt, seed))


def place_generated(
    rgba: bytes, width: int, height: int, *, x: int = 0, y: int = 0, prompt: str, seed: int | None
) -> Placement:
    """A txt2img result as a layer of its own size at (x, y), unmasked."""
    _check_len(rgba, width, height, 4, "result image")
    return Placement(x, y, width, height, bytes(rgba), layer_name(prompt, seed))
