"""What the Krita and GIMP plug-ins share: geometry, masks, pixels, messages, results.

Standard library only (plus ``protocol``), because it runs inside the editors' own
Pythons, which have neither numpy nor sdkit. The editor-specific code reads pixels and
the selection, calls into this module, and writes one layer back; everything that can
be tested without an editor lives here.

Conventions: pixels are straight-alpha RGBA8 row-major ``bytes``; masks are 8-bit
(0 keep ... 255 repaint, soft values allowed); rectangles are in canvas pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

try:  # as part of sdkit.bridge, or copied next to a plug-in package
    from . import protocol
except ImportError:  # copied next to a plug-in script (GIMP): a top-level module
    import protocol  # type: ignore[no-redef]

MULTIPLE = 8
"""Generation sizes are multiples of this (the VAE factor of every model we serve)."""

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
    canvas, then widened to multiples of 8 where the canvas allows). ``width``/``height``
    is what is sent and generated: multiples of 8, at least ``rect``'s size; the rest is
    padding beyond the canvas edge, filled by repeating the edge pixels and cut off again
    when the result is placed. ``selection`` is the selection's bounds on the canvas.
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


def round_up(value: int, multiple: int = MULTIPLE) -> int:
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
    multiple: int = MULTIPLE,
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


def bgra_to_rgba(data: bytes | bytearray) -> bytes:
    """Swap the blue and red bytes of every pixel (Krita's RGBA8 is BGRA in memory).

    The same swap turns RGBA back into BGRA.
    """
    if len(data) % 4:
        raise ValueError(f"pixel data of {len(data)} bytes is not a whole number of 4-byte pixels")
    out = bytearray(data)
    out[0::4] = data[2::4]
    out[2::4] = data[0::4]
    return bytes(out)


rgba_to_bgra = bgra_to_rgba


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


# --- requests and their events ------------------------------------------------------

MODES = ("txt2img", "img2img", "inpaint")


@dataclass
class Params:
    """The fields an editor dialog offers; None leaves the choice to the model's defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.75
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None  # txt2img only; img2img/inpaint use the region's size
    height: int | None = None

    def request(self, mode: str, width: int | None = None, height: int | None = None) -> dict:
        """The JSON ``request`` object of a generate message (Request field names)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        req: dict = {"mode": mode, "prompt": self.prompt, "negative_prompt": self.negative_prompt}
        for key in ("num_inference_steps", "guidance_scale", "seed"):
            value = getattr(self, key)
            if value is not None:
                req[key] = value
        w = width if width is not None else self.width
        h = height if height is not None else self.height
        if w is not None:
            req["width"] = int(w)
        if h is not None:
            req["height"] = int(h)
        if mode != "txt2img":
            req["strength"] = float(self.strength)
        return req


def generate_kwargs(mode: str, params: Params, prepared: Prepared | None = None) -> dict:
    """Keyword arguments for ``protocol.Session.generate`` for one editor action.

    img2img and inpaint need the prepared region; inpaint also sends its mask (img2img
    repaints the whole region and the selection only masks the layer afterwards).
    """
    if mode == "txt2img":
        return {"request": params.request(mode)}
    if prepared is None:
        raise SelectionError(f"{mode} needs a selected region")
    region = prepared.region
    kwargs: dict = {
        "request": params.request(mode, region.width, region.height),
        "image": protocol.Picture(region.width, region.height, "rgba8", prepared.image),
    }
    if mode == "inpaint":
        kwargs["mask"] = protocol.Picture(region.width, region.height, "l8", prepared.mask)
    return kwargs


# --- connection and one action in flight --------------------------------------------

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"  # sdkit.bridge.server.DEFAULT_BIND
HELLO_TIMEOUT = 5.0
CLIENT_NAME = "sdkit-editor"


def _import_zmtp():
    try:
        from . import zmtp
    except ImportError:
        import zmtp  # type: ignore[no-redef]
    return zmtp


class Connection:
    """The plug-in's link to a server: a stdlib ZMTP socket, a Session and the hello reply.

    Never blocks longer than asked, so Krita can pump it from a QTimer; GIMP, which
    runs a plug-in as a process of its own, may simply call ``wait_ready``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        client: str = CLIENT_NAME,
        hello_timeout: float = HELLO_TIMEOUT,
    ):
        self.address = address
        self.client = client
        self.hello_timeout = hello_timeout
        self.session: protocol.Session | None = None
        self.state = "disconnected"  # connecting | connected | failed
        self.error: str | None = None
        self.info: dict = {}
        self.limits = protocol.Limits()
        self._hello: str | None = None
        self._deadline = 0.0
        self._epoch = 0

    # -- lifecycle
    def open(self) -> None:
        """Start connecting (non-blocking); ``poll`` finishes the handshake."""
        self.close()
        try:
            transport = _import_zmtp().Dealer(self.address)
        except (OSError, ValueError) as e:
            self._fail(f"cannot connect to {self.address}: {e}")
            return
        self.session = protocol.Session(transport, client=self.client)
        self._send_hello()

    def _send_hello(self) -> None:
        self.state, self.error = "connecting", None
        self.session.pending.pop(self._hello, None)
        try:
            self._hello = self.session.hello()
        except (OSError, ValueError) as e:
            self._fail(f"cannot reach the sdkit server at {self.address}: {e}")
            return
        self._deadline = time.monotonic() + self.hello_timeout

    def _fail(self, message: str) -> None:
        self.state, self.error, self._hello = "failed", message, None

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.close()
            except OSError:
                pass
        self.session, self._hello = None, None
        self.state = "disconnected"

    # -- pumping
    def poll(self, timeout: float = 0.0) -> list[protocol.Event]:
        """Events for the plug-in's requests; the hello exchange is handled here."""
        if self.session is None:
            return []
        try:
            events = self.session.poll(timeout)
        except OSError as e:
            self._fail(f"lost the connection to {self.address}: {e}")
            return []
        transport = self.session.transport
        if self.state == "connected" and transport.epoch != self._epoch:
            # The server went away (or restarted) while we were idle: greet it again, so a
            # dead server shows up as such instead of swallowing the next request.
            self._send_hello()
        out = []
        for ev in events:
            if self._hello is not None and ev.id == self._hello:
                self._on_hello(ev)
            elif ev.event == "error" and ev.code == "connection_lost":
                # The request is lost with the connection; say so, then reconnect.
                out.append(ev)
                self._send_hello()
            else:
                out.append(ev)
        if self.state == "connecting" and time.monotonic() > self._deadline:
            reason = getattr(transport, "last_error", None)
            self._fail(
                f"no sdkit server answers at {self.address}"
                + (f" ({reason})" if reason else "")
                + ": start one with `sdkit serve` (or serve the engine from a notebook), "
                "then reconnect"
            )
        return out

    def _on_hello(self, ev: protocol.Event) -> None:
        self._hello = None
        if ev.event == "error":
            self._fail(f"the server refused the connection: {ev.message} ({ev.code})")
            return
        self._epoch = self.session.transport.epoch
        self.info = dict(ev.header)
        self.limits = protocol.Limits.from_dict(ev.header.get("limits") or {})
        self.state = "connected"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until connected; raise EditorError with the reason otherwise (GIMP, tests)."""
        if self.session is None and self.state != "failed":
            self.open()
        end = time.monotonic() + (self.hello_timeout + 1 if timeout is None else timeout)
        while self.state == "connecting" and time.monotonic() < end:
            self.poll(0.05)
        if self.state != "connected":
            raise EditorError(self.error or f"could not connect to {self.address}")

    # -- what the UI shows
    def model_text(self) -> str:
        model = self.info.get("model") or {}
        if isinstance(model, dict):
            name = model.get("name") or model.get("spec") or "?"
            defaults = model.get("defaults") or {}
            size = f" {defaults.get('width')}x{defaults.get('height')}" if defaults else ""
            return f"{name} ({model.get('family', '?')}{size}, {model.get('device', '?')})"
        return str(model)

    def status_text(self) -> str:
        if self.state == "connected":
            return f"connected to {self.address}"
        if self.state == "connecting":
            return f"connecting to {self.address}…"
        if self.state == "failed":
            return self.error or "not connected"
        return "not connected"

    def default_size(self) -> tuple[int, int]:
        model = self.info.get("model") or {}
        defaults = model.get("defaults") if isinstance(model, dict) else None
        defaults = defaults or {}
        return int(defaults.get("width") or 512), int(defaults.get("height") or 512)


class Action:
    """One editor action from request to layer, driven by the events of its request id."""

    def __init__(
        self,
        mode: str,
        params: Params,
        *,
        prepared: Prepared | None = None,
        selection_mask: bytes | None = None,
        origin: tuple[int, int] = (0, 0),
    ):
        self.mode = mode
        self.params = params
        self.prepared = prepared
        self.selection_mask = selection_mask
        self.origin = origin
        self.kwargs = generate_kwargs(mode, params, prepared)
        self.id: str | None = None
        self.state = "new"  # sent | queued | running | done | failed | cancelled
        self.status = ""
        self.fraction = 0.0
        self.preview: protocol.Picture | None = None
        self.placement: Placement | None = None
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def start(self, conn: Connection, *, preview: int = 1) -> str:
        if conn.state != "connected" or conn.session is None:
            raise EditorError(conn.error or f"not connected to {conn.address}")
        if self.prepared is not None:
            check_size(self.prepared.region, conn.limits.max_pixels)
        try:
            self.id = conn.session.generate(**self.kwargs, preview=preview)
        except OSError as e:
            raise EditorError(f"could not send the request to {conn.address}: {e}") from e
        self.state, self.status = "sent", "sent…"
        return self.id

    def cancel(self, conn: Connection) -> None:
        if self.id is not None and not self.done and conn.session is not None:
            try:
                conn.session.cancel(self.id)
            except OSError:
                pass
            self.status = "cancelling…"

    def handle(self, ev: protocol.Event) -> bool:
        """Apply one event; True when it was this action's."""
        if ev.id != self.id or self.done:
            return False
        h = ev.header
        if ev.event in ("accepted", "queued"):
            self.state = "queued"
            pos = h.get("position", h.get("queue_position"))
            self.status = f"queued (position {pos})" if pos else "queued"
        elif ev.event == "started":
            self.state, self.status = "running", "running"
        elif ev.event == "progress":
            self.state = "running"
            self.fraction = protocol.progress_fraction(ev)
            self.status = f"step {h.get('step')}/{h.get('total')}"
            previews = ev.pictures_named("preview") or [p for _, p in ev.pictures]
            if previews:
                self.preview = previews[0]
        elif ev.event == "result":
            self._on_result(ev)
        elif ev.event == "error":
            if ev.code == "cancelled":
                self.state, self.status = "cancelled", "cancelled"
            else:
                self.state = "failed"
                where = f" (field {ev.field})" if ev.field else ""
                self.error = f"{ev.message or ev.code}{where}"
                self.status = self.error
        return True

    def _on_result(self, ev: protocol.Event) -> None:
        images = ev.pictures_named("image") or [p for _, p in ev.pictures]
        if not images:
            self.state, self.error = "failed", "the server's result carried no image"
            self.status = self.error
            return
        pic = images[0]
        if pic.format != "rgba8":
            self.state, self.error = "failed", f"the server sent a {pic.format} image, not rgba8"
            self.status = self.error
            return
        seeds = ev.header.get("seeds") or [ev.header.get("seed")]
        seed = seeds[0] if seeds else None
        data = bytes(pic.data)
        try:
            if self.mode == "txt2img":
                x, y = self.origin
                self.placement = place_generated(
                    data, pic.width, pic.height, x=x, y=y, prompt=self.params.prompt, seed=seed
                )
            else:
                self.placement = place_result(
                    self.prepared.region,
                    data,
                    pic.width,
                    pic.height,
                    self.selection_mask,
                    prompt=self.params.prompt,
                    seed=seed,
                )
        except EditorError as e:
            self.state, self.error, self.status = "failed", str(e), str(e)
            return
        self.state, self.fraction, self.status = "done", 1.0, f"done (seed {seed})"


def plan_action(
    mode: str,
    params: Params,
    canvas_size: tuple[int, int],
    selection: Rect | None,
    read_rgba,
    read_mask,
    *,
    margin: int = DEFAULT_MARGIN,
) -> Action:
    """Everything between the editor's button and the request, for both plug-ins.

    ``read_rgba(rect)`` returns the merged image under ``rect`` as RGBA8 and
    ``read_mask(rect)`` the selection's 8-bit mask there (None without a selection).
    txt2img puts its layer at the selection's corner (or the canvas origin); img2img
    without a selection works on the whole canvas; inpaint needs a selection.
    """
    width, height = canvas_size
    if mode == "txt2img":
        origin = (selection.x, selection.y) if selection and not selection.is_empty() else (0, 0)
        return Action(mode, params, origin=origin)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if selection is None:
        if mode == "inpaint":
            raise SelectionError(
                "Inpaint selection needs a selection: select the region to repaint first"
            )
        selection = Rect(0, 0, width, height)
    region = context_region(selection, width, height, margin=margin)
    mask = read_mask(region.rect)
    if mask is not None and mask_is_empty(mask):
        raise SelectionError("the selection is empty: select the region to change first")
    prepared = prepare(region, read_rgba(region.rect), mask)
    return Action(mode, params, prepared=prepared, selection_mask=mask)


def run_blocking(conn: Connection, action: Action, *, on_progress=None, timeout=None) -> Placement:
    """Send ``action`` and pump until it ends (GIMP's plug-in process, tests).

    ``on_progress(action)`` is called after every event. Raises EditorError with the
    server's (or the connection's) message when the action fails or is cancelled.
    """
    if conn.state != "connected":
        conn.wait_ready()
    action.start(conn)
    end = None if timeout is None else time.monotonic() + timeout
    while not action.done:
        for ev in conn.poll(0.05):
            if action.handle(ev) and on_progress is not None:
                on_progress(action)
        if not action.done and conn.state == "failed":
            action.state, action.error = "failed", conn.error
        if not action.done and end is not None and time.monotonic() > end:
            action.cancel(conn)
            action.state, action.error = "failed", f"no result within {timeout} s"
    if action.state != "done":
        raise EditorError(action.error or action.status or action.state)
    return action.placement
