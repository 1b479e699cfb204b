"""Upscale action on a gallery image (issue 15.5): "Upscale [×2 ▾]" in the gallery's detail pane.

A click puts the selected gallery image on the input canvas, switches the studio to the
Upscale tab with that factor (so the user sees exactly what runs and can fine-tune it there)
and presses Generate. Coming from another tab it also sets the light strength tiles want
(`sdkit.tiled_upscale.DEFAULT_STRENGTH`); from the Upscale tab itself the tab's settings are
kept. Kept apart from the studio and the gallery, which only hand over themselves.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from sdkit.modes import Mode
from sdkit.tiled_upscale import DEFAULT_STRENGTH

FACTORS = (2.0, 4.0)


class UpscaleAction:
    """The row "Upscale ×2|×4" placed under the gallery's other actions."""

    def __init__(self, studio: Any) -> None:
        self.studio = studio
        self.factor = w.Dropdown(
            options=[(f"×{f:g}", f) for f in FACTORS], value=FACTORS[0], layout=w.Layout(width="5em")
        )
        self.button = w.Button(
            description="Upscale",
            icon="expand",
            tooltip="tiled upscale of this image (Lanczos, then img2img per tile)",
            layout=w.Layout(width="6em"),
        )
        self.button.add_class("sdkit-upscale")
        self.button.on_click(lambda _: self.studio.upscale(self.factor.value))
        self.widget = w.HBox([self.button, self.factor], layout=w.Layout(align_items="center"))
        self._place(studio.gallery)

    def _place(self, gallery: Any) -> None:
        """Append the row to the box holding the gallery's "Use as input" button."""
        stack = [gallery.detail]
        while stack:
            box = stack.pop()
            children = tuple(getattr(box, "children", ()))
            if gallery.use_button in children:
                box.children = (*children, self.widget)
                return
            stack.extend(children)
        raise RuntimeError("the gallery has no actions box to join")

    def show_for(self, modes: list[dict]) -> None:
        """Shown only when the engine serves upscale."""
        served = any(m["name"] == Mode.UPSCALE for m in modes)
        self.widget.layout.display = None if served else "none"


def upscale(studio: Any, factor: float) -> Any:
    """Upscale the gallery's selected image (else the input picture) by `factor` with the
    current prompt; returns the Job (None when nothing was submitted, the reason shown)."""
    selected = studio.gallery.selected
    if selected is not None:
        studio.painter.set_image(selected.image)
    controls = studio.controls
    if controls.mode != Mode.UPSCALE:
        controls.mode = Mode.UPSCALE
        controls.strength.value = DEFAULT_STRENGTH
    controls.upscale_factor.value = factor
    return studio.generate()
