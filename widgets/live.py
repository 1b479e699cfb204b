"""Live mode for the studio (issue 16.3): the picture follows every change.

*Live* on loads the live preset (`sdkit.live.LIVE_DEFAULTS`: few steps, no guidance) into
the controls, then every finished change (a painter stroke, the prompt, strength, seed, any
control) restarts a short debounce timer; when it fires, the studio's current settings are
submitted as an img2img (inpaint when a mask is painted) with a fixed seed and the engine's
``replace`` policy, so a newer frame supersedes the one waiting or running. Frames show in
the studio's preview, never in the gallery; *Keep* puts the current one there.

Nothing here runs on the front end's message thread but restarting a timer, so strokes are
never held up: the timer's thread submits, the engine's worker generates, and the studio's
follower thread (``follow.JobFollower``) hands the live jobs' events to `handle`. A frame is
shown only if it is newer than the one on screen.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
from typing import Any

import ipywidgets as w
import numpy as np

from sdkit.jobs import EventKind
from sdkit.live import LIVE_DEFAULTS
from sdkit.modes import Mode
from sdkit.request import RequestError

from .gallery import png_bytes

DEBOUNCE_S = 0.15
_ids = itertools.count(1)


class LiveMode:
    """The *Live* toggle and *Keep* button of one studio, and its stream of live jobs."""

    def __init__(self, studio: Any, debounce: float = DEBOUNCE_S) -> None:
        self.studio = studio
        self.debounce = debounce
        self.source = ("sdkit-widget-live", next(_ids))  # the engine's replace key
        self.toggle = w.ToggleButton(
            description="Live", icon="bolt", tooltip="regenerate on every change"
        )
        self.keep_button = w.Button(
            description="Keep", icon="download", disabled=True, tooltip="keep this frame"
        )
        studio.preview.add_class("sdkit-preview")  # a hook for styling and the browser test
        self.toggle.add_class("sdkit-live")
        self.keep_button.add_class("sdkit-keep")
        self.toggle.observe(lambda change: self.set_on(change["new"]), "value")
        self.keep_button.on_click(lambda _: self.keep())
        self.widget = w.HBox([self.toggle, self.keep_button])
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._settled = threading.Event()  # no change waits for its submission
        self._settled.set()
        self._seq: dict[str, int] = {}  # live job id -> its submission number
        self._count = 0
        self._shown = 0  # submission number of the frame on screen
        self.seed: int | None = None  # the fixed seed while the seed control says random
        self.submitted: list[Any] = []  # every live job, oldest first (tests, benchmarks)
        self.frame: Any = None  # the Result on screen
        self.frames = 0  # frames shown since Live was turned on

    # ----- switching ---------------------------------------------------------------------
    @property
    def on(self) -> bool:
        return bool(self.toggle.value)

    def set_on(self, on: bool) -> None:
        """Live on: run the current settings at once; off: drop the pending and running frame."""
        if self.toggle.value != on:
            self.toggle.value = on  # the observer calls back here
            return
        if on:
            self.seed = random.randrange(2**32)  # used while the seed control says random
            self._load_preset()
            self.studio._switch_to_image_mode(mask=True)  # the painter's mask tools show
            self.changed()
        else:
            self._cancel_timer()
            for job in self._jobs():
                job.cancel()

    def _load_preset(self) -> None:
        """Put `sdkit.live.LIVE_DEFAULTS`' few-step sampling into the controls, where the
        user sees it and may change it (strength, seed and prompt stay the user's)."""
        controls = self.studio.controls
        controls.num_inference_steps.value = LIVE_DEFAULTS["num_inference_steps"]
        controls.guidance_scale.value = LIVE_DEFAULTS["guidance_scale"]
        if LIVE_DEFAULTS["scheduler"] in controls.scheduler.options:
            controls.scheduler.value = LIVE_DEFAULTS["scheduler"]

    def engine_changed(self) -> None:
        """Another model: the stream stops (its frames were of the old one) and says so."""
        if self.on:
            self.set_on(False)
            self.studio._set_status("live stopped: the model changed; turn Live on again")

    # ----- changes -> debounced submissions ------------------------------------------------
    def changed(self, *_: Any) -> None:
        """Any change: (re)start the debounce timer. Cheap; called on the UI thread."""
        if not self.on:
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._settled.clear()
            self._timer = threading.Timer(self.debounce, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        try:
            self.submit()
        finally:
            with self._lock:
                if self._timer is threading.current_thread():  # no newer change waits
                    self._timer = None
                    self._settled.set()

    def _cancel_timer(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._settled.set()

    def wait_settled(self, timeout: float | None) -> bool:
        """Block until no change waits for its debounced submission (scripts and tests)."""
        return self._settled.wait(timeout)

    def request(self) -> Any:
        """The live request: the studio's settings as img2img, or inpaint under a painted mask."""
        studio = self.studio
        painter = studio.painter
        if painter.image is None:
            raise RequestError("image", "live mode needs an input image")
        masked = bool(np.any(painter.mask))
        controls = studio.controls
        base = studio.request()  # the mode's fields, a control scribble's unit included
        return dataclasses.replace(
            base,
            mode=Mode.INPAINT if masked else Mode.IMG2IMG,
            image=painter.image,
            mask=painter.mask_image() if masked else None,
            strength=float(controls.strength.value),
            seed=self.seed if controls.random_seed.value else int(controls.seed.value),
            num_images=1,
        )

    def submit(self) -> Any:
        """Submit the current settings with policy "replace"; the Job (None: shown why not)."""
        studio = self.studio
        if not self.on or studio.engine is None:
            return None
        try:
            request = self.request()
            with self._lock:  # registered before the follower can hand us its events
                job = studio.follower.submit(
                    studio.engine, request, preview_every=0, policy="replace", source=self.source
                )
                self._count += 1
                self._seq[job.id] = self._count
                self.submitted.append(job)
        except RequestError as err:
            studio._set_status(f"live: {err}", error=err)
            return None
        return job

    def _jobs(self) -> list[Any]:
        return [j for j in self.studio.follower.ours() if getattr(j, "source", None) == self.source]

    # ----- events (the studio's follower thread) -------------------------------------------
    def handle(self, kind: EventKind, job: Any) -> bool:
        """Show a live job's event; False for any other job (the studio shows those)."""
        if getattr(job, "source", None) != self.source:
            return False
        with self._lock:
            seq = self._seq.get(job.id, 0)
            if kind in (EventKind.DONE, EventKind.CANCELLED, EventKind.FAILED):
                self._seq.pop(job.id, None)
        panel = self.studio.panel
        if kind == EventKind.DONE and seq > self._shown:
            result = job.result(timeout=0)
            self._shown, self.frame = seq, result
            self.frames += 1
            panel.preview.value = png_bytes(result.images[0])
            self.keep_button.disabled = False
            took = result.timings.get("total", 0.0)
            panel.set_status(f"live frame {self.frames} · {job.request.mode} · {took:.2f} s")
        elif kind == EventKind.FAILED:
            err = job.error
            panel.set_status(f"live: {err}", error=err if isinstance(err, RequestError) else True)
        return True

    def keep(self) -> None:
        """Put the frame on screen into the gallery (saved like any result of ours)."""
        if self.frame is not None:
            self.studio._finished(self.frame, True)
