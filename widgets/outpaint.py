"""Extend buttons: grow the current image by N px on one side (an outpaint job, issue 15.5).

A click switches the studio to the Outpaint tab with that one side set (so the user sees
exactly what runs, and can fine-tune it there) and presses Generate. The current image is
the input picture, else the gallery's selected image; after an extend, while its result is
the selected image and the input picture is unchanged, the next click extends that result
(so clicking "← left" twice grows the picture twice). Kept apart from the studio, which
only places the row and hands over itself.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from sdkit.modes import Mode

SIDES = ("left", "right", "top", "bottom")
_LABELS = {"left": "← left", "right": "right →", "top": "↑ up", "bottom": "↓ down"}


class ExtendButtons:
    """The row "Extend by [N] px: ← left, right →, ↑ up, ↓ down" under the input picture."""

    def __init__(self, studio: Any, pixels: int = 64) -> None:
        self.studio = studio
        self.last: tuple[Any, Any] | None = None  # (input picture, job) of the latest extend
        self.pixels = w.BoundedIntText(
            pixels,
            min=1,
            max=4096,
            step=8,
            description="Extend by",
            style={"description_width": "5.5em"},
            layout=w.Layout(width="11em"),
        )
        self.buttons = {side: w.Button(description=_LABELS[side]) for side in SIDES}
        for side, button in self.buttons.items():
            button.layout = w.Layout(width="6.5em")
            button.tooltip = f"outpaint: add the pixels on the {side}"
            button.add_class(f"sdkit-extend-{side}")
            button.on_click(lambda _, s=side: self.studio.extend(s, self.pixels.value))
        self.widget = w.HBox(
            [self.pixels, w.HTML("px"), *self.buttons.values()],
            layout=w.Layout(align_items="center", flex_flow="row wrap"),
        )

    def show_for(self, modes: list[dict]) -> None:
        """Shown only when the engine serves outpaint."""
        served = any(m["name"] == Mode.OUTPAINT for m in modes)
        self.widget.layout.display = None if served else "none"


def extend(studio: Any, side: str, pixels: int) -> Any:
    """Outpaint the current image by `pixels` on `side` with the current prompt and settings;
    returns the Job (None when nothing was submitted, the reason in the status line)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    selected, painter, last = studio.gallery.selected, studio.painter, studio.extend_buttons.last
    chained = (
        last is not None
        and selected is not None
        and painter.image is last[0]
        and selected.request is last[1].request
    )
    if selected is not None and (painter.image is None or chained):
        painter.set_image(selected.image)
    controls = studio.controls
    controls.mode = Mode.OUTPAINT
    for name in SIDES:
        getattr(controls, name).value = pixels if name == side else 0
    job = studio.generate()
    if job is not None:
        studio.extend_buttons.last = (painter.image, job)
    return job
