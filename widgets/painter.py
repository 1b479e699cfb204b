"""Mask painter: an ipycanvas MultiCanvas over the input image.

The mask lives in Python as a NumPy array at *image* resolution, built from the
pointer events themselves, so what the user paints is exactly what gets
inpainted and tests can drive it without a browser. The browser only shows it.

Coordinates: ipycanvas' front end already maps a pointer position from the
canvas' CSS box to canvas pixels (``x = canvas.width * (clientX - left) / cssWidth``),
so the events arrive in canvas pixels whatever the on-screen size. This module
maps canvas pixels to image pixels (``x * image_width / canvas.width``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import ipywidgets as w
import numpy as np
from ipycanvas import MultiCanvas, hold_canvas
from PIL import Image

MASK_RGB = (255, 64, 160)  # overlay colour of painted pixels
MASK_ALPHA = 0.55
PLACEHOLDER_RGB = (64, 64, 72)

Point = tuple[float, float]


def stroke_segment(mask: np.ndarray, p0: Point, p1: Point, radius: float, value: int) -> tuple:
    """Set every pixel whose centre is within ``radius`` of the segment p0-p1.

    That is a line with round caps; a zero-length segment is a round dab. The
    pixel under each end point is always set, so a 1-pixel brush never misses.
    Returns the touched bounding box (x0, y0, x1, y1), exclusive at the end, or ().
    """
    h, wid = mask.shape
    (ax, ay), (bx, by) = p0, p1
    x0 = max(0, math.floor(min(ax, bx) - radius))
    y0 = max(0, math.floor(min(ay, by) - radius))
    x1 = min(wid, math.ceil(max(ax, bx) + radius) + 1)
    y1 = min(h, math.ceil(max(ay, by) + radius) + 1)
    if x0 >= x1 or y0 >= y1:
        return ()
    px = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    py = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    if length2 > 0:
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / length2, 0.0, 1.0)
    else:
        t = np.zeros((1, 1))
    dist2 = (px - (ax + t * dx)) ** 2 + (py - (ay + t * dy)) ** 2
    region = mask[y0:y1, x0:x1]
    region[dist2 <= radius * radius] = value
    for x, y in (p0, p1):
        ix, iy = math.floor(x), math.floor(y)
        if 0 <= ix < wid and 0 <= iy < h:
            mask[iy, ix] = value
    return (x0, y0, x1, y1)


class MaskPainter:
    """Image + mask overlay + brush cursor on a three-layer MultiCanvas, with its tools.

    ``brush_size`` is the brush diameter in image pixels (what gets inpainted),
    the cursor shows it at screen scale.
    """

    IMAGE, OVERLAY, CURSOR = 0, 1, 2
    # What a subclass may change (the control canvas paints white scribbles on black).
    overlay_rgb, overlay_alpha = MASK_RGB, MASK_ALPHA
    placeholder_rgb, placeholder_text = PLACEHOLDER_RGB, "no input image"
    label = "mask"  # the info line's word and its CSS class sdkit-{label}-info

    def __init__(self, width: int = 64, height: int = 64, display_size: int = 320) -> None:
        self.display_size = int(display_size)
        self.image: Image.Image | None = None
        self.mask = np.zeros((int(height), int(width)), dtype=np.uint8)
        self.strokes = 0  # finished strokes since the last reset; shown, and waited on by tests
        self._last: Point | None = None  # image coordinates of the previous pointer point
        self._listeners: list[Callable[[MaskPainter], None]] = []

        self.canvas = MultiCanvas(3, width=1, height=1)
        self.brush_size = w.IntSlider(
            value=min(8, max(width, height)),
            min=1,
            max=max(int(width), int(height)),
            description="Brush",
            style={"description_width": "3.5em"},
            layout=w.Layout(width="230px"),
        )
        self.tool = w.ToggleButtons(
            options=[("Paint", "paint"), ("Erase", "erase")],
            value="paint",
            style={"button_width": "58px"},
        )
        self.clear_button = w.Button(description="Clear", layout=w.Layout(width="62px"))
        self.invert_button = w.Button(description="Invert", layout=w.Layout(width="62px"))
        self.fill_button = w.Button(
            description="Fill", layout=w.Layout(width="52px"), tooltip="Mask the whole image"
        )
        self.info = w.HTML()
        self.clear_button.on_click(lambda _: self.clear())
        self.invert_button.on_click(lambda _: self.invert())
        self.fill_button.on_click(lambda _: self.fill_all())

        c = self.canvas
        c.on_client_ready(self.redraw)
        c.on_mouse_down(self._on_down)
        c.on_mouse_move(self._on_move)
        c.on_mouse_up(self._on_up)
        c.on_mouse_out(self._on_out)
        c.on_touch_start(lambda pts: self._on_down(*pts[0]) if pts else None)
        c.on_touch_move(lambda pts: self._on_move(*pts[0]) if pts else None)
        c.on_touch_end(lambda pts: self._on_up(*pts[0]) if pts else self._end_stroke())
        c.on_touch_cancel(lambda pts: self._end_stroke())

        tools = w.HBox(
            [self.tool, self.brush_size],
            layout=w.Layout(align_items="center", flex_flow="row wrap"),
        )
        actions = w.HBox(
            [self.clear_button, self.invert_button, self.fill_button, self.info],
            layout=w.Layout(align_items="center"),
        )
        self.widget = w.VBox([self.canvas, tools, actions], layout=w.Layout(width="auto"))
        self._resize_canvas()
        self.redraw()

    # ----- geometry -------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        """Image (= mask) size as (width, height)."""
        return self.mask.shape[1], self.mask.shape[0]

    def _resize_canvas(self) -> None:
        iw, ih = self.size
        scale = self.display_size / max(iw, ih)
        cw, ch = max(1, round(iw * scale)), max(1, round(ih * scale))
        self.canvas.width, self.canvas.height = cw, ch
        # An explicit CSS size equal to the canvas size: one canvas pixel per CSS pixel.
        self.canvas.layout.width = f"{cw}px"
        self.canvas.layout.height = f"{ch}px"

    def _fit_brush(self) -> None:
        """The brush slider spans 1 px to the image's longer side (ipywidgets clamps the value)."""
        self.brush_size.max = max(self.size)

    def to_image(self, x: float, y: float) -> Point:
        """Canvas pixel coordinates (as ipycanvas reports them) -> image coordinates."""
        iw, ih = self.size
        return x * iw / self.canvas.width, y * ih / self.canvas.height

    # ----- state ----------------------------------------------------------------------
    def set_image(self, image: Image.Image | None, *, keep_mask: bool = False) -> None:
        """Show ``image`` (or a blank of the current size); the mask is reset unless kept."""
        if image is not None:
            image = image.convert("RGB")
            size = image.size
        else:
            size = self.size
        if not (keep_mask and size == self.size):
            self.mask = np.zeros((size[1], size[0]), dtype=np.uint8)
            self.strokes = 0
        self.image = image
        self._last = None
        self._fit_brush()
        self._resize_canvas()
        self.redraw()
        self._changed()

    def resize_blank(self, width: int, height: int) -> None:
        """Without an image, follow the requested size so a mask can be drawn ahead."""
        if self.image is None and (width, height) != self.size and width > 0 and height > 0:
            self.mask = np.zeros((int(height), int(width)), dtype=np.uint8)
            self.strokes = 0
            self._fit_brush()
            self._resize_canvas()
            self.redraw()
            self._changed()

    def set_mask(self, mask: Image.Image | np.ndarray) -> None:
        """Replace the mask (resized to the image with nearest neighbour; >127 is painted)."""
        if isinstance(mask, Image.Image):
            mask = np.asarray(mask.convert("L").resize(self.size, Image.Resampling.NEAREST))
        mask = np.asarray(mask)
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask: shape {mask.shape} does not match the image {self.mask.shape}")
        self.mask = np.where(mask > 127, 255, 0).astype(np.uint8)
        self.redraw_overlay()
        self._changed()

    def mask_image(self) -> Image.Image:
        """The mask as a PIL "L" image: 255 repaint, 0 keep."""
        return Image.fromarray(self.mask.copy(), mode="L")

    def clear(self) -> None:
        self.mask[:] = 0
        self.redraw_overlay()
        self._changed()

    def invert(self) -> None:
        self.mask = 255 - self.mask
        self.redraw_overlay()
        self._changed()

    def fill_all(self) -> None:
        self.mask[:] = 255
        self.redraw_overlay()
        self._changed()

    def paint_stroke(
        self, points: Sequence[Point], *, erase: bool = False, brush_size: float | None = None
    ) -> None:
        """Paint a polyline given in image coordinates (scripting and notebooks)."""
        radius = (brush_size or self.brush_size.value) / 2
        pts = list(points)
        for a, b in zip(pts, pts[1:] or pts, strict=False):
            stroke_segment(self.mask, a, b, radius, 0 if erase else 255)
        self.strokes += 1
        self.redraw_overlay()
        self._changed()

    def on_change(self, fn: Callable[[MaskPainter], None]) -> None:
        """Call ``fn(painter)`` after every finished edit of the mask or image."""
        self._listeners.append(fn)

    def _changed(self) -> None:
        painted = int(np.count_nonzero(self.mask))
        share = 100.0 * painted / self.mask.size
        s = "" if self.strokes == 1 else "s"
        self.info.value = (
            f"<span class='sdkit-{self.label}-info' style='font-size:12px;color:#555'>"
            f"{self.label} {share:.1f}% · {self.strokes} stroke{s}</span>"
        )
        for fn in self._listeners:
            fn(self)

    # ----- pointer --------------------------------------------------------------------
    def _segment(self, p: Point) -> None:
        value = 0 if self.tool.value == "erase" else 255
        start = self._last if self._last is not None else p
        box = stroke_segment(self.mask, start, p, self.brush_size.value / 2, value)
        self._last = p
        if box:
            self._draw_overlay_box(*box)

    def _on_down(self, x: float, y: float) -> None:
        self._last = None
        self._segment(self.to_image(x, y))
        self._draw_cursor(x, y)

    def _on_move(self, x: float, y: float) -> None:
        if self._last is not None:
            self._segment(self.to_image(x, y))
        self._draw_cursor(x, y)

    def _on_up(self, x: float, y: float) -> None:
        if self._last is not None:
            self._segment(self.to_image(x, y))
            self._end_stroke()

    def _on_out(self, x: float, y: float) -> None:
        self.canvas[self.CURSOR].clear()
        self._end_stroke()

    def _end_stroke(self) -> None:
        if self._last is None:
            return
        self._last = None
        self.strokes += 1
        self.redraw_overlay()
        self._changed()

    # ----- drawing --------------------------------------------------------------------
    def redraw(self) -> None:
        """Send the whole picture; also called when a browser (re)connects."""
        with hold_canvas():
            layer = self.canvas[self.IMAGE]
            layer.clear()
            cw, ch = self.canvas.width, self.canvas.height
            if self.image is None:
                rgb = np.empty((ch, cw, 3), dtype=np.uint8)
                rgb[:] = self.placeholder_rgb
                layer.put_image_data(_rgba(rgb), 0, 0)
                layer.fill_style = "#aaa"
                layer.font = "14px sans-serif"
                layer.text_align = "center"
                layer.fill_text(self.placeholder_text, cw / 2, ch / 2)
            else:
                resample = (
                    Image.Resampling.NEAREST if cw >= self.image.width else Image.Resampling.LANCZOS
                )
                shown = np.asarray(self.image.resize((cw, ch), resample))
                layer.put_image_data(_rgba(shown), 0, 0)
            self.canvas[self.CURSOR].clear()
            self._draw_overlay_box(0, 0, *self.size, clear=True)

    def redraw_overlay(self) -> None:
        with hold_canvas():
            self._draw_overlay_box(0, 0, *self.size, clear=True)

    def _draw_overlay_box(self, x0: int, y0: int, x1: int, y1: int, clear: bool = False) -> None:
        """Show mask[y0:y1, x0:x1] on the overlay layer at canvas scale (exact, no smoothing)."""
        iw, ih = self.size
        cw, ch = self.canvas.width, self.canvas.height
        cx0, cy0 = math.floor(x0 * cw / iw), math.floor(y0 * ch / ih)
        cx1, cy1 = min(cw, math.ceil(x1 * cw / iw)), min(ch, math.ceil(y1 * ch / ih))
        if cx0 >= cx1 or cy0 >= cy1:
            return
        # canvas pixel -> image pixel under its centre
        ix = np.minimum(((np.arange(cx0, cx1) + 0.5) * iw / cw).astype(int), iw - 1)
        iy = np.minimum(((np.arange(cy0, cy1) + 0.5) * ih / ch).astype(int), ih - 1)
        m = self.mask[np.ix_(iy, ix)]
        rgba = np.zeros(m.shape + (4,), dtype=np.uint8)
        rgba[..., :3] = self.overlay_rgb
        rgba[..., 3] = (m.astype(np.float32) * self.overlay_alpha).astype(np.uint8)
        layer = self.canvas[self.OVERLAY]
        if clear:
            layer.clear()
        layer.put_image_data(rgba, cx0, cy0)

    def _draw_cursor(self, x: float, y: float) -> None:
        radius = self.brush_size.value / 2 * self.canvas.width / self.size[0]
        layer = self.canvas[self.CURSOR]
        with hold_canvas():
            layer.clear()
            layer.line_width = 1.5
            layer.stroke_style = "#000" if self.tool.value == "erase" else "#fff"
            layer.stroke_circle(x, y, max(radius, 1.5))


def _rgba(rgb: np.ndarray) -> np.ndarray:
    """Opaque RGBA (ipycanvas sends RGB as lossy JPEG, RGBA as PNG)."""
    out = np.empty(rgb.shape[:2] + (4,), dtype=np.uint8)
    out[..., :3] = rgb[..., :3]
    out[..., 3] = 255
    return out
