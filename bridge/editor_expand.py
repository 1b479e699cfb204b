"""Expand canvas (issue 15.5): outpaint the whole document by left/right/top/bottom px.

Standard library only (plus the bundled modules): it runs inside the editors' own Pythons.
Both plug-ins call `plan_expand` with the document's merged pixels; the action's request is
the server's ``outpaint`` mode with the sides, and its placement is the whole grown canvas
with only the new area and the repainted seam band opaque (the rest transparent, so the
original layers show through untouched). The plug-in grows its document only once the
result is in and checked, so a failure or a cancel leaves the document as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

try:  # as part of sdkit.bridge, or copied next to a plug-in package
    from . import editor_actions as ea
    from . import editor_geometry as geo
    from . import protocol
    from .editor_connection import ModeInfo
except ImportError:  # copied next to a plug-in script (GIMP): top-level modules
    import editor_actions as ea  # type: ignore[no-redef]
    import editor_geometry as geo  # type: ignore[no-redef]
    import protocol  # type: ignore[no-redef]
    from editor_connection import ModeInfo  # type: ignore[no-redef]

MODE = "outpaint"
DEFAULT_SEAM = 32  # the server's default band of the original repainted under a soft mask


@dataclass(frozen=True)
class Sides:
    """Pixels added on each side of the canvas."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def grown(self, width: int, height: int) -> tuple[int, int]:
        return width + self.left + self.right, height + self.top + self.bottom

    def as_request(self) -> dict:
        return {"left": self.left, "right": self.right, "top": self.top, "bottom": self.bottom}


class ExpandAction(ea.Action):
    """An outpaint of the whole canvas; `placement` covers the grown canvas at (0, 0)."""

    def __init__(
        self,
        mode: ModeInfo,
        params: ea.Params,
        sides: Sides,
        canvas_size: tuple[int, int],
        rgba: bytes,
        seam: int = DEFAULT_SEAM,
    ):
        width, height = canvas_size
        whole = geo.Rect(0, 0, width, height)
        region = geo.Region(whole, width, height, whole)
        super().__init__(mode, params, prepared=geo.Prepared(region, bytes(rgba), b""))
        self.sides = sides
        self.seam = seam
        self.canvas_size = canvas_size

    def request_kwargs(self) -> dict:
        kwargs = super().request_kwargs()
        kwargs["request"].update(self.sides.as_request(), seam=self.seam)
        return kwargs

    def start(self, conn, *, preview: int = 1) -> str:
        out_w, out_h = self.sides.grown(*self.canvas_size)
        limit = conn.limits.max_pixels if conn.state == "connected" else None
        if limit and out_w * out_h > limit:
            raise geo.EditorError(
                f"expanding to {out_w}x{out_h} ({out_w * out_h} pixels) is more than the "
                f"server allows ({limit} pixels): add fewer pixels"
            )
        return super().start(conn, preview=preview)

    def _place(self, ev: protocol.Event) -> geo.Placement:
        images = ev.pictures_named("image") or [p for _, p in ev.pictures]
        if not images:
            raise geo.EditorError("the server's result carried no image")
        pic = images[0]
        if pic.format != "rgba8":
            raise geo.EditorError(f"the server sent a {pic.format} image, not rgba8")
        out_w, out_h = self.sides.grown(*self.canvas_size)
        if (pic.width, pic.height) != (out_w, out_h):
            raise geo.EditorError(
                f"the server sent a {pic.width}x{pic.height} image for a {out_w}x{out_h} canvas"
            )
        seed = (ev.header.get("seeds") or [None])[0]
        rgba = repainted_only(bytes(pic.data), out_w, out_h, self.kept_rect())
        return geo.Placement(0, 0, out_w, out_h, rgba, geo.layer_name(self.params.prompt, seed))

    def kept_rect(self) -> geo.Rect:
        """The part of the original (in grown-canvas pixels) that the server left exact:
        all of it but a `seam` band along each extended side."""
        s, (w, h) = self.sides, self.canvas_size
        x0 = s.left + (self.seam if s.left else 0)
        y0 = s.top + (self.seam if s.top else 0)
        x1 = s.left + w - (self.seam if s.right else 0)
        y1 = s.top + h - (self.seam if s.bottom else 0)
        return geo.Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))


def repainted_only(rgba: bytes, width: int, height: int, kept: geo.Rect) -> bytes:
    """``rgba`` with the alpha of every pixel inside ``kept`` set to 0."""
    out = bytearray(rgba)
    if kept.width <= 0 or kept.height <= 0:
        return bytes(out)
    clear = bytes(kept.width)
    for y in range(kept.y, kept.bottom):
        row = (y * width + kept.x) * 4
        out[row + 3 : row + 4 * kept.width : 4] = clear
    return bytes(out)


def plan_expand(
    mode: ModeInfo,
    params: ea.Params,
    sides: Sides,
    canvas_size: tuple[int, int],
    read_rgba,
    *,
    seam: int = DEFAULT_SEAM,
) -> ExpandAction:
    """Check the sides and read the whole canvas (``read_rgba(rect)``: RGBA8 under rect)."""
    if mode.name != MODE:
        raise geo.EditorError(f"Expand canvas needs the server's {MODE} mode, not {mode.name}")
    if min(sides.left, sides.right, sides.top, sides.bottom) < 0:
        raise geo.EditorError("Expand canvas adds pixels: no side may be negative")
    if not (sides.left or sides.right or sides.top or sides.bottom):
        raise geo.EditorError("Expand canvas: choose how many pixels to add on at least one side")
    width, height = canvas_size
    rgba = read_rgba(geo.Rect(0, 0, width, height))
    return ExpandAction(mode, params, sides, canvas_size, rgba, seam)
