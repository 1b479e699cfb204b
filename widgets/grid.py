"""The studio's *Grid* panel (issue 17.4): A1111's X/Y plot of the studio's current request.

Pick a field and its values for x (and optionally y), press *Grid*: the cells run through
`sdkit.grid` (so through `sdkit.batch`) on the studio's engine in a background thread, and
the labelled grid lands in the gallery like any result (saved with the request's infotext).
Kept apart from the studio, which only hands over itself.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets as w

from sdkit.request import RequestError
from sdkit.result import Result

FIELDS = (  # the fields a comparison usually sweeps (A1111's X/Y/Z plot types)
    "guidance_scale",
    "num_inference_steps",
    "scheduler",
    "seed",
    "strength",
    "width",
    "height",
    "clip_skip",
    "hires_scale",
    "hires_denoise",
    "negative_prompt",
)
NONE = "(none)"


class GridPanel:
    """x/y field pickers with their comma-separated values, a Grid button, a status line."""

    def __init__(self, studio: Any) -> None:
        self.studio = studio
        self.x_field = w.Dropdown(options=FIELDS, value="guidance_scale", description="x")
        self.x_values = w.Text(value="3, 5, 7", placeholder="values, comma-separated")
        self.y_field = w.Dropdown(options=(NONE, *FIELDS), value=NONE, description="y")
        self.y_values = w.Text(value="", placeholder="values, comma-separated")
        for d in (self.x_field, self.y_field):
            d.layout = w.Layout(width="16em")
        self.run_button = w.Button(description="Grid", icon="th", tooltip="run the X/Y plot")
        self.run_button.add_class("sdkit-grid-run")
        self.run_button.on_click(lambda _: self.run())
        self.status = w.HTML()
        self.result: Any = None  # the last `sdkit.grid.Grid`
        self._thread: threading.Thread | None = None
        rows = [
            w.HBox([self.x_field, self.x_values]),
            w.HBox([self.y_field, self.y_values]),
            w.HBox([self.run_button, self.status], layout=w.Layout(align_items="center")),
        ]
        self.widget = w.Accordion(children=[w.VBox(rows)], selected_index=None)
        self.widget.set_title(0, "Grid (X/Y plot)")
        self.widget.add_class("sdkit-grid")

    def axes(self) -> dict[str, tuple[str, list[str]]]:
        """The chosen axes; a RequestError names the axis when its values are empty."""
        axes = {}
        for axis, field, values in (
            ("x", self.x_field.value, self.x_values.value),
            ("y", self.y_field.value, self.y_values.value),
        ):
            if field == NONE:
                continue
            items = [v.strip() for v in values.split(",") if v.strip()]
            if not items:
                raise RequestError(field, f"axis {axis}: give its values, comma-separated")
            axes[axis] = (field, items)
        return axes

    def run(self) -> threading.Thread | None:
        """Start the grid in the background; None (the reason shown) when it cannot start."""
        studio = self.studio
        if studio.engine is None:
            self._show("no model loaded yet", error=True)
            return None
        if self._thread is not None and self._thread.is_alive():
            self._show("a grid is already running", error=True)
            return None
        try:
            request, axes = studio.request(), self.axes()
        except RequestError as e:
            self._show(str(e), error=True)
            return None
        self.run_button.disabled = True
        self._show("running…")
        self._thread = threading.Thread(
            target=self._work, args=(studio.engine, request, axes), daemon=True
        )
        self._thread.start()
        return self._thread

    def wait(self, timeout: float | None = 120) -> None:
        """Block until the running grid is over (scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"grid still running after {timeout} s")

    def _work(self, engine: Any, request: Any, axes: dict) -> None:
        from sdkit.grid import grid

        try:
            g = grid(request, executor=engine, **axes)
        except Exception as e:  # noqa: BLE001 - shown to the user, the panel stays usable
            self._show(str(e), error=True)
        else:
            self.result = g
            # the cells' own events (the studio shows every job on its engine) first, so
            # the grid lands last in the gallery and stays selected
            self.studio.follower.wait_idle(time.monotonic() + 30)
            request = g.request
            assert request is not None and request.seed is not None  # checked by grid()
            sheet = Result([g.image], [request.seed], request)
            self.studio._finished(sheet, True)  # saved, into the gallery, selected
            self._show(f"{len(g.images)} cells · {g.image.width}x{g.image.height}")
        finally:
            self.run_button.disabled = False

    def _show(self, text: str, *, error: bool = False) -> None:
        import html

        colour = "#c62828" if error else "#444"
        self.status.value = (
            f"<span style='font-size:12px;color:{colour}'>{html.escape(text)}</span>"
        )
