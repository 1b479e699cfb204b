"""`SDWidget`: the notebook studio (model, controls, mask painter, progress, gallery).

Generation runs as a `Job` on the engine; the widget learns about every job of its
engine through `Engine.subscribe`, so jobs that others submit (e.g. the editor bridge)
show up here too. The engine's listener only queues the event (`follow.JobFollower`);
the widget's own thread updates widget values (ipywidgets sends them from any thread),
encodes pictures and saves results. Every result of ours is saved with its infotext to
`outputs_dir`, as A1111 does, so a kernel restart loses nothing.

Over 400 lines because it is the composition root: the layout and the wiring between the
parts, which live in their own modules (controls, painter, gallery, runpanel, modelrow,
follow), read best in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as w
from PIL import Image

from sdkit.jobs import TERMINAL_EVENTS, EventKind
from sdkit.request import Request, RequestError, load_image

from .adapterlist import AdapterList, add_to_prompt
from .control import ControlCanvas
from .controls import RequestControls
from .follow import JobFollower
from .gallery import Gallery, GalleryItem
from .grid import GridPanel
from .live import LiveMode
from .modelrow import ModelRow
from .outpaint import ExtendButtons
from .outpaint import extend as extend_image
from .painter import MaskPainter
from .runpanel import CSS, RunPanel, upload_button
from .upscale import UpscaleAction
from .upscale import upscale as upscale_image

OUTPUTS_ENV = "SDKIT_OUTPUTS"  # default folder for auto-saved results ("outputs" if unset)

log = logging.getLogger("sdkit.widgets")


def _guard(method: Callable) -> Callable:
    """Run a UI callback; an exception is shown in the widget's status and logged.

    ipywidgets would only log it (or print it into whatever cell ran last); the
    user must see it where they clicked.
    """

    @functools.wraps(method)
    def wrapper(self: SDWidget, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            log.exception("SDWidget: %s failed", method.__name__)
            self._set_status(f"{type(e).__name__}: {e}", error=True)
            return None

    return wrapper


class SDWidget(w.VBox):
    """Stable Diffusion studio for a notebook: `SDWidget()` in a cell is all it takes.

    `engine`: an `sdkit.Engine` to share (jobs others submit to it show here too);
    otherwise `model` (a spec for `sdkit.load`, default the embedded model) is loaded
    in the background. `outputs_dir`: where every result of ours is saved as PNG with
    its infotext (default `$SDKIT_OUTPUTS`, else "outputs" in the working directory;
    None or False: not saved). Other keyword arguments are initial `Request` fields.
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        model: str | None = None,
        display_size: int = 320,
        outputs_dir: str | os.PathLike | None | bool = True,
        **fields: Any,
    ) -> None:
        self.engine: Any = None
        self.outputs_dir = resolve_outputs_dir(outputs_dir)
        self._unsubscribe: Callable[[], None] | None = None
        self._lock = threading.RLock()
        self._deferred: list[Request] = []  # Generate pressed while the model loads
        self.follower = JobFollower(self._handle_event)
        self.last_job: Any = None
        self.last_seed: int | None = None
        self.saved: list[Path] = []  # every file auto-saved to outputs_dir

        self.controls = RequestControls()
        self.adapters = AdapterList(self.insert_in_prompt)
        self.painter = MaskPainter(display_size=display_size)
        self.gallery = Gallery()
        self.panel = RunPanel()
        self.generate_button = self.panel.generate_button
        self.cancel_button = self.panel.cancel_button
        self.progress, self.status, self.preview = (
            self.panel.progress,
            self.panel.status,
            self.panel.preview,
        )
        self.errors = self.panel.errors  # every error shown in the status line

        self.model_row = ModelRow(model or "embedded", self._loaded, self._load_failed)
        self.model_spec = self.model_row.spec
        self.load_button = self.model_row.load_button
        self.model_status = self.model_row.status
        self.settings_upload = upload_button("Load PNG settings", ".png,image/png", "file-image-o")
        self.settings_upload.observe(self._on_settings_upload, "value")

        # ----- input image -----
        self.image_upload = upload_button("Upload image", "image/*", "upload")
        self.image_upload.observe(self._on_image_upload, "value")
        e = self.controls.errors
        self.input_box = w.VBox(
            [
                w.HBox([self.image_upload, e["image"]], layout=w.Layout(align_items="center")),
                self.painter.widget,
                e["mask"],
            ]
        )

        self.generate_button.on_click(lambda _: self.generate())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.controls.reuse_seed.on_click(lambda _: self._reuse_seed())

        # ----- wiring -----
        self.controls.on_change(self._on_control_change)
        self.painter.on_change(lambda _: self._on_control_change("mask"))
        self.gallery.on("use", self._use_as_input)
        self.gallery.on("inpaint", self._send_to_inpaint)
        self.gallery.on("rerun", self.rerun)
        self.extend_buttons = ExtendButtons(self)  # outpaint the current image by N px
        self.upscale_action = UpscaleAction(self)  # joins the gallery's actions
        self.control = ControlCanvas(display_size, lambda: self.gallery.selected)  # a scribble
        self.control.on_change(lambda: self._on_control_change("control"))
        self.live = LiveMode(self)  # regenerates on every change (issue 16.3)
        self.grid_panel = GridPanel(self)  # X/Y plot of the current request (issue 17.4)

        left = w.VBox(
            [self.controls.mode_tabs, self.adapters.widget],
            layout=w.Layout(width="52%", min_width="420px"),
        )
        right = w.VBox(
            [
                self.input_box,
                self.extend_buttons.widget,
                self.control.widget,
                w.HBox([self.preview, self.live.widget], layout=w.Layout(margin="6px 0")),
            ],
            layout=w.Layout(margin="0 0 0 10px"),
        )
        footer = w.HBox(
            [
                self.settings_upload,
                w.HTML(
                    "<span style='font-size:12px;color:#666'>"
                    "restores the parameters stored in a PNG (sdkit "
                    "or A1111)</span>"
                ),
            ],
            layout=w.Layout(align_items="center"),
        )
        super().__init__(
            [
                w.HTML(CSS),
                self.model_row.widget,
                w.HBox([left, right], layout=w.Layout(flex_flow="row wrap")),
                self.panel.row,
                self.grid_panel.widget,
                w.HTML("<b style='font-size:12px;color:#666'>GALLERY</b>"),
                self.gallery.widget,
                footer,
            ]
        )
        self.add_class("sdkit-studio")
        if self.outputs_dir is not None:
            self.gallery.save_dir.value = str(self.outputs_dir)
        for widget, name in (
            (self.image_upload, "sdkit-image-upload"),
            (self.settings_upload, "sdkit-settings-upload"),
            (self.painter.canvas, "sdkit-canvas"),
        ):
            widget.add_class(name)  # stable hooks for styling and the browser test

        if fields:
            self.controls.set_request(Request(**{"mode": self.controls.mode, **fields}))
        self._on_control_change("mode")
        if engine is not None:
            self.use_engine(engine)
        else:
            self.load_model(model or "embedded")

    # ----- model -----------------------------------------------------------------------
    def use_engine(self, engine: Any) -> None:
        """Drive `engine` (and show every job submitted to it, by anyone)."""
        with self._lock:
            if self._unsubscribe is not None:
                self._unsubscribe()
            self.engine = engine
            self._unsubscribe = engine.subscribe(self.follower.listener)
        self.live.engine_changed()
        info = engine.info()
        self.controls.apply_model(info, engine.check)
        self.adapters.show(info)
        self.extend_buttons.show_for(info["modes"])
        self.upscale_action.show_for(info["modes"])
        self.control.show(info)
        self.model_row.show_engine(engine)
        self._on_control_change("mode")

    def load_model(self, spec: str | None) -> threading.Thread:
        """Load a model in the background; progress and errors show in the widget."""
        return self.model_row.load(spec)

    def _loaded(self, engine: Any) -> None:
        self.use_engine(engine)
        with self._lock:
            deferred, self._deferred = self._deferred, []
        for request in deferred:
            self._submit(request)

    def _load_failed(self, error: BaseException) -> None:
        self.errors.append(f"model: {error}")
        with self._lock:
            deferred, self._deferred = self._deferred, []
        if deferred:
            self._set_status("not generated: no model loaded", error=True)

    # ----- requests ----------------------------------------------------------------------
    def request(self) -> Request:
        """The Request the widget currently describes, input image and mask included."""
        inputs = self.controls.spec["inputs"]
        extra: dict[str, Any] = {}
        if "image" in inputs:
            extra["image"] = self.painter.image
        if "mask" in inputs:
            extra["mask"] = self.painter.mask_image()
        if "control" in self.controls.spec["fields"]:
            extra["control"] = self.control.units()
        return self.controls.request(**extra)

    def set_request(self, request: Request) -> None:
        """Restore settings (e.g. from a PNG); an input image/mask in it goes on the canvas."""
        self.controls.set_request(request)
        if request.image is not None:
            self.painter.set_image(load_image(request.image))
            if request.mask is not None:
                self.painter.set_mask(request.mask)

    def insert_in_prompt(self, text: str) -> None:
        """Add a LoRA tag or an embedding's name to the prompt (the adapter buttons)."""
        self.controls.prompt.value = add_to_prompt(self.controls.prompt.value, text)

    def _on_control_change(self, field: str) -> None:
        self.live.changed()
        inputs = self.controls.spec["inputs"]
        if field in ("width", "height"):
            self.painter.resize_blank(self.controls.width.value, self.controls.height.value)
            self.control.follow_size(self.controls.width.value, self.controls.height.value)
        if field == "mode":
            self.adapters.for_mode(self.controls.spec["fields"])
            self.control.for_mode(self.controls.spec["fields"])
            self.input_box.layout.display = None if "image" in inputs else "none"
            for child in self.painter.widget.children[1:]:
                child.layout.display = None if "mask" in inputs else "none"
        # Live check: show a fresh error for the field just changed; clear a fixed one.
        shown = self.controls.shown_error
        if shown is None and field == "mode" and self.panel.status_error is None:
            return
        err = self.controls.validate(self.request())
        named = self.panel.status_error
        if named is not None and (err is None or str(err) != str(named)):
            self._set_status("")  # the error the status line named is fixed
        if err is not None and err.field in (shown, field):
            self.controls.show_error(err)
        elif shown is not None:
            self.controls.show_error(None)

    @_guard
    def generate(self) -> Any:
        """Submit the current settings; returns the Job (None if invalid or deferred)."""
        request = self.request()
        err = self.controls.validate(request)
        self.controls.show_error(err)
        if err is not None:
            self._set_status(f"not generated: {err}", error=err)
            return None
        with self._lock:
            if self.engine is None:
                if self.model_row.loading:  # a model is loading: submit when it is there
                    self._deferred.append(request)
                    self._set_status("waiting for the model to load…")
                    return None
                self._set_status("no model loaded: choose one and press Load", error=True)
                return None
        return self._submit(request)

    def _submit(self, request: Request) -> Any:
        try:
            job = self.follower.submit(self.engine, request)
        except RequestError as err:
            self.controls.show_error(err)
            self._set_status(f"not generated: {err}", error=err)
            return None
        self.last_job = job
        self.cancel_button.disabled = False
        if job.state == "queued":
            self._set_status(f"queued ({self.engine.queue_length()} waiting)")
        return job

    @_guard
    def extend(self, side: str, pixels: int) -> Any:
        """Outpaint the current image by `pixels` on `side` (the extend buttons); the Job."""
        return extend_image(self, side, pixels)

    @_guard
    def upscale(self, factor: float) -> Any:
        """Upscale the selected gallery image by `factor` (its Upscale button); the Job."""
        return upscale_image(self, factor)

    @_guard
    def cancel(self) -> None:
        """Cancel this widget's running and queued jobs (a running one stops within a step)."""
        with self._lock:
            jobs = self.follower.ours()
            self._deferred.clear()
        for job in jobs:
            job.cancel()
        if jobs:
            self._set_status("cancelling…")

    def wait(self, timeout: float | None = 120) -> None:
        """Block until model loading and every job seen on the engine are over, their
        results in the gallery (scripts and tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.model_row.wait_loaded(deadline):
            raise TimeoutError(f"SDWidget still loading a model after {timeout} s")
        if not self.live.wait_settled(None if deadline is None else deadline - time.monotonic()):
            raise TimeoutError(f"SDWidget live change not submitted after {timeout} s")
        if not self.follower.wait_idle(deadline):
            raise TimeoutError(f"SDWidget still busy after {timeout} s")

    # ----- engine events (the follower's thread, never the engine's) ---------------------
    def _handle_event(self, kind: EventKind, job: Any, event: Any, ours: bool) -> None:
        if self.live.handle(kind, job):  # live frames go to the preview, not the gallery
            return
        if kind == EventKind.DONE:
            self._finished(job.result(timeout=0), ours)
        else:
            self.panel.show(kind, job, event, ours)
        if kind == EventKind.FAILED and ours and isinstance(job.error, RequestError):
            self.controls.show_error(job.error)
        if kind in TERMINAL_EVENTS:
            self.cancel_button.disabled = not [j for j in self.follower.ours() if j is not job]

    def _finished(self, result: Any, ours: bool) -> None:
        """Keep the result: saved with its infotext (ours), then in the gallery."""
        paths: list[Path] = []
        note = failure = ""
        if ours and self.outputs_dir is not None:
            try:
                paths = [Path(p) for p in result.save(self.outputs_dir)]
            except OSError as e:  # a bad folder is the user's to fix; the result stays here
                failure = f"could not save to {self.outputs_dir}: {e}"
            else:
                self.saved.extend(paths)
                note = f" · saved to {self.outputs_dir}"
        self.gallery.add_result(result, source="widget" if ours else "engine", paths=paths)
        if result.seeds:
            self.last_seed = int(result.seeds[0])
            self.controls.reuse_seed.disabled = False
        self.panel.done(result, note, ours)
        if failure:
            self._set_status(failure, error=True)

    def _set_status(self, text: str, *, error: bool | RequestError = False) -> None:
        self.panel.set_status(text, error=error)

    # ----- gallery actions ---------------------------------------------------------------
    @_guard
    def _use_as_input(self, item: GalleryItem) -> None:
        self._set_input(item.image)
        self._switch_to_image_mode()

    @_guard
    def _send_to_inpaint(self, item: GalleryItem) -> None:
        self._set_input(item.image)
        self._switch_to_image_mode(mask=True)

    def _switch_to_image_mode(self, *, mask: bool = False) -> None:
        """Keep the current mode if it takes an input picture (and a mask, if asked), else
        switch to the registered mode that takes it with the fewest other inputs."""
        want = {"image", "mask"} if mask else {"image"}
        if want <= set(self.controls.spec["inputs"]):
            return
        fitting = [m for m in self.controls.modes if want <= set(m["inputs"])]
        if fitting:
            self.controls.mode = min(fitting, key=lambda m: len(m["inputs"]))["name"]

    @_guard
    def rerun(self, item: GalleryItem | None = None) -> Any:
        """Re-run the selected (or given) gallery image's settings with its own seed."""
        item = item or self.gallery.selected
        if item is None:
            return None
        request = dataclasses.replace(item.request, seed=item.seed, num_images=1)
        self.set_request(request)
        return self.generate()

    def _set_input(self, image: Image.Image) -> None:
        self.painter.set_image(image)
        factor = self.controls.size_multiple
        if image.width % factor == 0 and image.height % factor == 0:
            self.controls.width.value, self.controls.height.value = image.size
        self._on_control_change("image")

    def _reuse_seed(self) -> None:
        if self.last_seed is not None:
            self.controls.seed.value = self.last_seed
            self.controls.random_seed.value = False

    # ----- uploads -----------------------------------------------------------------------
    @_guard
    def _on_image_upload(self, change: dict) -> None:
        files = change["new"]
        if not files:
            return
        data = bytes(files[0]["content"])
        self.image_upload.value = ()  # the same file can be uploaded again
        try:
            image = load_image(data, "image").convert("RGB")
        except RequestError as err:
            self.controls.show_error(err)
            return
        self._set_input(image)
        self._switch_to_image_mode()

    @_guard
    def _on_settings_upload(self, change: dict) -> None:
        files = change["new"]
        if not files:
            return
        name = files[0].get("name", "PNG")
        data = bytes(files[0]["content"])
        self.settings_upload.value = ()
        self.load_settings(data, name=name)

    def load_settings(self, png: Any, *, name: str = "PNG") -> Request | None:
        """Restore the settings stored in a PNG (ours or A1111's) into the controls."""
        try:
            request = Request.from_png(png)
        except RequestError as err:
            self._set_status(f"{name}: {err}", error=True)
            return None
        self.controls.set_request(request)
        self._set_status(f"settings restored from {name}")
        return request

    # ----- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop listening to the engine (the engine itself stays loaded for others)."""
        with self._lock:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
        self.follower.close()
        super().close()

    def result_images(self) -> list[Image.Image]:
        """All gallery images, newest first (for scripts)."""
        return [item.image for item in self.gallery.items]


def resolve_outputs_dir(value: str | os.PathLike | None | bool) -> Path | None:
    """`outputs_dir` as given: True means `$SDKIT_OUTPUTS` or "outputs" (relative to the
    working directory); None or False turn auto-saving off."""
    if value is None or value is False:
        return None
    if value is True:
        value = os.environ.get(OUTPUTS_ENV) or "outputs"
    return Path(value).expanduser()
