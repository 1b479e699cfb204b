"""Control canvas (issue 15.5): a scribble drawn with the mouse, or a gallery picture, as the
image of one ControlNet unit, with the unit's model, weight, start, end and preprocessor.

The scribble is the painter's own stroke code (`painter.MaskPainter`) shown white on black:
what the user draws is exactly the white-on-black control image the embedded `sdkscribble`
model was trained on. A gallery picture goes under the strokes (strokes paint white over
it). Kept apart from the studio, which places the widget and asks `units()` for the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ipywidgets as w
import numpy as np
from PIL import Image

from sdkit.control import DEFAULTS, MODULES, WEIGHTS

from .painter import MaskPainter

_STYLE = {"description_width": "4.5em"}


class ScribblePainter(MaskPainter):
    """The mask painter with white ink on a black sheet: strokes are the scribble."""

    overlay_rgb, overlay_alpha = (255, 255, 255), 1.0
    placeholder_rgb, placeholder_text = (0, 0, 0), ""  # the strokes would cross a hint
    label = "scribble"


class ControlCanvas:
    """`widget`: the canvas, its tools and the unit's settings; `units()` for the request.

    A unit is sent once the user has drawn a stroke or chosen a picture and the engine
    lists a control model (`Engine.info()["controls"]`); "Use control" turns it off again.
    """

    def __init__(self, display_size: int = 320, selected: Callable[[], Any] | None = None) -> None:
        self.painter = ScribblePainter(display_size=display_size)
        self.painter.brush_size.value = 4
        self._selected = selected or (lambda: None)  # the gallery's selected item, if any
        self.enabled = w.Checkbox(False, description="Use control", indent=False)
        self.model = w.Dropdown(options=[], description="Model", style=_STYLE)
        lo, hi = WEIGHTS
        slider = dict(step=0.05, readout_format=".2f", style=_STYLE)
        self.weight = w.FloatSlider(
            DEFAULTS["weight"], min=lo, max=hi, description="Weight", **slider
        )
        self.start = w.FloatSlider(DEFAULTS["start"], min=0, max=1, description="Start", **slider)
        self.end = w.FloatSlider(DEFAULTS["end"], min=0, max=1, description="End", **slider)
        self.module = w.Dropdown(
            options=list(MODULES), value=DEFAULTS["module"], description="Module", style=_STYLE
        )
        self.use_selected = w.Button(
            description="Use gallery image",
            tooltip="the gallery's selected picture as the control image (strokes paint over it)",
            layout=w.Layout(width="auto"),
        )
        self.use_selected.on_click(lambda _: self.use_gallery_image())
        self.painter.on_change(self._on_drawn)
        self.painter.canvas.add_class("sdkit-control-canvas")
        self.widget = w.VBox(
            [
                w.HTML(
                    "<b style='font-size:12px;color:#666'>CONTROL</b> <span style='font-size:"
                    "12px;color:#888'>draw where things go (white on black), or use a "
                    "gallery image</span>"
                ),
                w.HBox([self.enabled, self.use_selected], layout=w.Layout(align_items="center")),
                self.painter.widget,
                self.model,
                self.module,
                self.weight,
                self.start,
                self.end,
            ],
            layout=w.Layout(margin="6px 0"),
        )
        self.widget.add_class("sdkit-control")
        self._served = self._wanted = False
        self._refresh()

    # ----- what the engine and the mode offer -------------------------------------------
    def show(self, info: Mapping[str, Any]) -> None:
        """The engine's control models (names); the canvas is hidden when it has none."""
        names = [n for n in info.get("controls") or [] if isinstance(n, str)]
        current = self.model.value
        self.model.options = names
        if names:
            self.model.value = current if current in names else names[0]
        self._served = bool(names)
        self._refresh()

    def for_mode(self, fields: Iterable[str]) -> None:
        """Shown only for a mode that takes control units."""
        self._wanted = "control" in fields
        self._refresh()

    def _refresh(self) -> None:
        self.widget.layout.display = None if self._served and self._wanted else "none"

    def follow_size(self, width: int, height: int) -> None:
        """Without a picture the sheet has the request's size (drawn at output resolution)."""
        self.painter.resize_blank(width, height)

    # ----- the control image --------------------------------------------------------------
    def use_picture(self, image: Image.Image | None) -> None:
        """`image` under the strokes (None: back to the black sheet); strokes are cleared."""
        self.painter.set_image(image)
        if image is not None:
            self.enabled.value = True

    def use_gallery_image(self) -> None:
        item = self._selected()
        if item is not None:
            self.use_picture(item.image)

    def image(self) -> Image.Image:
        """The control image: the picture (or black) with the strokes in white."""
        p = self.painter
        if p.image is not None:
            rgb = np.array(p.image.convert("RGB"))
        else:
            rgb = np.zeros((*p.mask.shape, 3), np.uint8)
        rgb[p.mask > 0] = 255
        return Image.fromarray(rgb, "RGB")

    def has_image(self) -> bool:
        return self.painter.image is not None or bool(self.painter.mask.any())

    def units(self) -> list[dict]:
        """`[unit]` for `Request.control`, or `[]` when control is off or nothing is drawn."""
        if not (self.enabled.value and self._served and self.has_image()):
            return []
        return [
            {
                "image": self.image(),
                "model": self.model.value,
                "weight": float(self.weight.value),
                "start": float(self.start.value),
                "end": float(self.end.value),
                "module": self.module.value,
            }
        ]

    def on_change(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after every stroke, picture or setting change."""
        self.painter.on_change(lambda _: fn())
        for box in (self.enabled, self.model, self.weight, self.start, self.end, self.module):
            box.observe(lambda _: fn(), "value")

    def _on_drawn(self, painter: MaskPainter) -> None:
        if painter.strokes and painter.mask.any():
            self.enabled.value = True  # drawing means: use it
