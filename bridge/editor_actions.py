"""One editor action, from the button to the layer: plan it, send it, follow it, place it.

Standard library only (plus the bundled modules), because it runs inside the editors'
own Pythons. Both plug-ins call `plan_action` with their canvas readers; Krita pumps the
`Connection` from a timer and feeds events to `Action.handle`, GIMP calls `run_blocking`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

try:  # as part of sdkit.bridge, or copied next to a plug-in package
    from . import editor_geometry as geo
    from . import protocol, tracker
    from .editor_connection import Connection, ModeInfo
except ImportError:  # copied next to a plug-in script (GIMP): top-level modules
    import editor_geometry as geo  # type: ignore[no-redef]
    import protocol  # type: ignore[no-redef]
    import tracker  # type: ignore[no-redef]
    from editor_connection import Connection, ModeInfo  # type: ignore[no-redef]


def with_lora(prompt: str, name: str, weight: float = 1.0) -> str:
    """``prompt`` with A1111's ``<lora:NAME:WEIGHT>`` tag appended (the server reads it and
    removes it from the text CLIP sees); a prompt that already names the LoRA is kept."""
    if f"<lora:{name}:" in prompt or f"<lora:{name}>" in prompt:
        return prompt
    tag = f"<lora:{name}:{weight:g}>"
    return f"{prompt.rstrip()} {tag}" if prompt.strip() else tag


def check_lora(conn: Connection, name: str) -> str:
    """``name`` if the server lists it in ``hello``'s ``loras``, else EditorError naming the
    ones it offers (a plug-in never sends a path: the server finds LoRAs by name)."""
    offered = conn.adapters("loras")
    if name not in offered:
        listed = ", ".join(offered) if offered else "none"
        raise geo.EditorError(f"the server has no LoRA {name!r} (it offers: {listed})")
    return name


@dataclass
class Params:
    """The fields an editor dialog offers; None leaves the choice to the model's defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.75
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None  # modes without picture inputs; the others use the region's size
    height: int | None = None

    def request(self, mode: ModeInfo, width: int | None = None, height: int | None = None) -> dict:
        """The JSON ``request`` of a generate message: only the fields ``mode`` reads."""
        values = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "strength": float(self.strength),
            "width": int(width) if width is not None else self.width,
            "height": int(height) if height is not None else self.height,
        }
        req: dict = {"mode": mode.name}
        for key, value in values.items():
            if value is not None and key in mode.fields:
                req[key] = value
        return req


LOST = (
    "lost the connection to the sdkit server while it worked on this request (did it stop?): "
    "start it again with `sdkit serve`, then retry"
)


class Action:
    """One editor action from request to layer; its job's state is the session's tracker."""

    def __init__(
        self,
        mode: ModeInfo,
        params: Params,
        *,
        prepared: geo.Prepared | None = None,
        selection_mask: bytes | None = None,
        origin: tuple[int, int] = (0, 0),
    ):
        if mode.inputs and prepared is None:
            raise geo.SelectionError(f"{mode.title} needs a selected region")
        self.mode = mode
        self.params = params
        self.prepared = prepared
        self.selection_mask = selection_mask
        self.origin = origin
        self.job: tracker.TrackedJob | None = None
        self.placement: geo.Placement | None = None
        self._failure: str | None = None

    @property
    def id(self) -> str | None:
        return self.job.id if self.job is not None else None

    @property
    def state(self) -> str:
        if self._failure is not None:
            return tracker.FAILED
        if self.job is None:
            return "new"
        if self.job.state == tracker.DONE and self.placement is None:
            return tracker.RUNNING  # the result is in, the layer not made yet
        return self.job.state

    @property
    def done(self) -> bool:
        return self.state in tracker.ENDED

    @property
    def error(self) -> str | None:
        if self._failure is not None or self.job is None or self.job.error is None:
            return self._failure
        if self.job.error.code == "connection_lost":
            return LOST
        return self.job.error_text

    @property
    def status(self) -> str:
        if self.state == tracker.FAILED:
            return self.error or "failed"
        if self.job is None:
            return ""
        if self.placement is not None and self.job.result is not None:
            seeds = self.job.result.header.get("seeds") or [None]
            return f"done (seed {seeds[0]})"
        return self.job.status

    @property
    def fraction(self) -> float:
        return self.job.fraction if self.job is not None and self.state != tracker.FAILED else 0.0

    @property
    def preview(self) -> protocol.Picture | None:
        return self.job.preview if self.job is not None else None

    def fail(self, message: str) -> None:
        """End the action with ``message`` (connection lost, no result in time, ...)."""
        if not self.done:
            self._failure = message

    def request_kwargs(self) -> dict:
        """Keyword arguments for `tracker.Session.generate`: the request and its pictures."""
        prepared = self.prepared
        if prepared is None:  # a mode without picture inputs (the constructor checks that)
            return {"request": self.params.request(self.mode)}
        region = prepared.region
        kwargs: dict = {
            "request": self.params.request(self.mode, region.width, region.height),
            "image": protocol.Picture(region.width, region.height, "rgba8", prepared.image),
        }
        if "mask" in self.mode.inputs:
            kwargs["mask"] = protocol.Picture(region.width, region.height, "l8", prepared.mask)
        return kwargs

    def start(self, conn: Connection, *, preview: int = 1) -> str:
        if conn.state != "connected" or conn.session is None:
            raise geo.EditorError(conn.error or f"not connected to {conn.address}")
        if self.prepared is not None:
            geo.check_size(self.prepared.region, conn.limits.max_pixels)
        try:
            rid = conn.session.generate(**self.request_kwargs(), preview=preview)
        except protocol.ProtocolError as e:  # over a limit from hello: refused before sending
            raise geo.EditorError(f"cannot send this request: {e.message}") from None
        except OSError as e:
            raise geo.EditorError(f"could not send the request to {conn.address}: {e}") from e
        self.job = conn.session.jobs[rid]
        return rid

    def cancel(self, conn: Connection) -> None:
        if self.job is not None and not self.done and conn.session is not None:
            try:
                conn.session.cancel(self.job.id)
            except OSError:
                pass

    def handle(self, ev: protocol.Event) -> bool:
        """React to one event the session already applied to ``job``; True if it was ours."""
        if self.job is None or ev.id != self.job.id or self._failure or self.placement:
            return False
        if ev.event == "result":
            try:
                self.placement = self._place(ev)
            except geo.EditorError as e:
                self._failure = str(e)
        return True

    def _place(self, ev: protocol.Event) -> geo.Placement:
        images = ev.pictures_named("image") or [p for _, p in ev.pictures]
        if not images:
            raise geo.EditorError("the server's result carried no image")
        pic = images[0]
        if pic.format != "rgba8":
            raise geo.EditorError(f"the server sent a {pic.format} image, not rgba8")
        seed = (ev.header.get("seeds") or [None])[0]
        data, prompt = bytes(pic.data), self.params.prompt
        if self.prepared is None:
            x, y = self.origin
            return geo.place_generated(
                data, pic.width, pic.height, x=x, y=y, prompt=prompt, seed=seed
            )
        return geo.place_result(
            self.prepared.region,
            data,
            pic.width,
            pic.height,
            self.selection_mask,
            prompt=prompt,
            seed=seed,
        )


def plan_action(
    mode: ModeInfo,
    params: Params,
    canvas_size: tuple[int, int],
    selection: geo.Rect | None,
    read_rgba: Callable[[geo.Rect], bytes],
    read_mask: Callable[[geo.Rect], bytes | None],
    *,
    margin: int = geo.DEFAULT_MARGIN,
    multiple: int = geo.DEFAULT_MULTIPLE,
) -> Action:
    """Everything between the editor's button and the request, for both plug-ins.

    ``read_rgba(rect)`` returns the merged image under ``rect`` as RGBA8 and
    ``read_mask(rect)`` the selection's 8-bit mask there (None without a selection).
    A mode without picture inputs puts its layer at the selection's corner (or the
    canvas origin); one that takes the image works on the whole canvas without a
    selection; one that takes a mask needs a selection.
    """
    width, height = canvas_size
    if not mode.inputs:
        origin = (selection.x, selection.y) if selection and not selection.is_empty() else (0, 0)
        return Action(mode, params, origin=origin)
    if selection is None:
        if mode.needs_selection:
            raise geo.SelectionError(
                f"{mode.title} needs a selection: select the region to repaint first"
            )
        selection = geo.Rect(0, 0, width, height)
    region = geo.context_region(selection, width, height, margin=margin, multiple=multiple)
    mask = read_mask(region.rect)
    if mask is not None and geo.mask_is_empty(mask):
        raise geo.SelectionError("the selection is empty: select the region to change first")
    prepared = geo.prepare(region, read_rgba(region.rect), mask)
    return Action(mode, params, prepared=prepared, selection_mask=mask)


def run_blocking(
    conn: Connection,
    action: Action,
    *,
    on_progress: Callable[[Action], None] | None = None,
    timeout: float | None = None,
) -> geo.Placement:
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
            action.fail(conn.error or "lost the connection")
        if not action.done and end is not None and time.monotonic() > end:
            action.cancel(conn)
            action.fail(f"no result within {timeout} s")
    if action.state != tracker.DONE or action.placement is None:
        raise geo.EditorError(action.error or action.status or action.state)
    return action.placement
