"""The model row: a spec box, Load, and a status that counts the seconds of a background load.

Loading runs on its own thread so the notebook stays responsive; the studio hears of the
outcome through `on_loaded(engine)` / `on_failed(error)`, called on that thread.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w

import sdkit

from .runpanel import err_html, info_html, ok_html

log = logging.getLogger("sdkit.widgets")


class ModelRow:
    """`widget` is the row; `loading` counts loads in flight (`wait_loaded` waits for none)."""

    def __init__(
        self,
        spec: str,
        on_loaded: Callable[[Any], None],
        on_failed: Callable[[BaseException], None],
    ) -> None:
        self._on_loaded = on_loaded
        self._on_failed = on_failed
        self._cond = threading.Condition()
        self.loading = 0
        self.spec = w.Combobox(
            value=spec,
            options=["embedded"],
            placeholder="embedded, folder, file or hub id",
            description="Model",
            ensure_option=False,
            style={"description_width": "3.5em"},
            layout=w.Layout(width="22em"),
        )
        self.load_button = w.Button(
            description="Load", icon="download", layout=w.Layout(width="6em")
        )
        self.status = w.HTML()
        self.status.add_class("sdkit-model-status")  # the browser test waits on it
        self.load_button.on_click(lambda _: self.load(self.spec.value))
        self.widget = w.HBox(
            [
                w.HTML("<b style='font-size:15px;margin-right:8px'>sdkit studio</b>"),
                self.spec,
                self.load_button,
                self.status,
            ],
            layout=w.Layout(align_items="center", flex_flow="row wrap"),
        )

    def show_engine(self, engine: Any) -> None:
        """Name the engine in use (its spec joins the box's options)."""
        spec = str(getattr(engine, "spec", "engine"))
        if spec not in self.spec.options:
            self.spec.options = [*self.spec.options, spec]
        self.spec.value = spec
        self.status.value = ok_html(
            f"{html.escape(spec)} · {engine.family} · "
            f"{engine.device} · {str(engine.dtype).replace('torch.', '')}"
        )

    def load(self, spec: str | None) -> threading.Thread:
        """`sdkit.load(spec)` in the background; the status counts the seconds."""
        spec = (spec or "embedded").strip() or "embedded"
        with self._cond:
            self.loading += 1
        self.load_button.disabled = True
        self.status.value = info_html(f"loading {spec}…")
        thread = threading.Thread(
            target=self._run, args=(spec,), name="sdkit-widget-loader", daemon=True
        )
        thread.start()
        return thread

    def wait_loaded(self, deadline: float | None) -> bool:
        """Block until no load is in flight or `deadline` (time.monotonic) passes."""
        with self._cond:
            while self.loading:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _run(self, spec: str) -> None:
        box: dict[str, Any] = {}

        def load() -> None:
            try:
                box["engine"] = sdkit.load(spec)
            except BaseException as e:  # shown in the widget, not in a cell
                box["error"] = e

        try:
            start = time.perf_counter()
            t = threading.Thread(target=load, name="sdkit-widget-load", daemon=True)
            t.start()
            while t.is_alive():
                t.join(0.25)
                self.status.value = info_html(
                    f"loading {spec}… {time.perf_counter() - start:.1f} s"
                )
            if "error" not in box:
                self._on_loaded(box["engine"])
                took = time.perf_counter() - start
                self.status.value += info_html(f" · loaded in {took:.1f} s")
        except Exception as e:  # using the engine failed: as bad as not loading it
            log.debug("SDWidget: loading %s failed", spec, exc_info=True)
            box["error"] = e
        try:
            if "error" in box:
                self.status.value = err_html(f"could not load {spec}: {box['error']}")
                self._on_failed(box["error"])
        finally:
            self.load_button.disabled = False
            with self._cond:
                self.loading -= 1
                self._cond.notify_all()
