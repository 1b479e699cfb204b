"""The ``generate`` op, from the decoded message to its terminal event.

A request is parsed into an `sdkit.Request` (its picture frames per the mode's registered
inputs), checked by its engine's `Engine.check` (the one validation rule: the request as it
will run, defaults and image size filled in), held to the server's limits, queued fairly
(`dispatch`), handed to the engine, and followed through the engine's events.  A request
for a model that is still loading waits, parked, until the loader thread reports.

Engine events arrive on an engine thread: `on_event` only queues them and wakes the
socket thread, which alone calls everything else here.
"""

from __future__ import annotations

import logging
import queue
import uuid
from collections.abc import Callable
from typing import Any

from sdkit.bridge import pictures
from sdkit.bridge import protocol as P
from sdkit.bridge.clients import Client, Clients, Entry
from sdkit.bridge.dispatch import Dispatcher
from sdkit.bridge.engines import Engines
from sdkit.bridge.logs import client_label, log, log_event
from sdkit.bridge.ops import public_message

Send = Callable[..., bool]
SUPERSEDED = "superseded by a newer 'replace' request of the same stream"


class Jobs:
    """Generate requests of every client, for the server's socket thread."""

    def __init__(
        self,
        engines: Engines,
        clients: Clients,
        limits: P.Limits,
        send: Send,
        wake: Callable[[], None],
        stats: dict[str, int],
        worker: str | None,
    ):
        self.engines = engines
        self.clients = clients
        self.limits = limits
        self._send = send
        self._wake = wake
        self.stats = stats
        self.worker = worker
        self.dispatcher = Dispatcher(self._submit)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._parked: dict[str, list[Entry]] = {}
        self._streams: dict[tuple[bytes, str], Entry] = {}  # newest "replace" per stream
        self._seq = 0

    # ------------------------------------------------------------------ accepting

    def generate(self, client: bytes, state: Client, msg: P.Message) -> None:
        """Take a decoded ``generate``; raises `ProtocolError` for the reply to name."""
        rid = msg.id
        if rid in state.entries:
            raise P.ProtocolError(
                "duplicate_id", f"request {rid!r} is still in flight; use a new id", "id", rid
            )
        if len(state.entries) >= self.limits.max_queued_per_client:
            raise P.ProtocolError(
                "queue_full",
                f"this client already has {len(state.entries)} unfinished requests; the limit "
                f"is {self.limits.max_queued_per_client}",
                None,
                rid,
            )
        if self.clients.in_flight >= self.limits.max_queued:
            raise P.ProtocolError(
                "queue_full",
                f"the server already holds {self.clients.in_flight} unfinished requests; the "
                f"limit is {self.limits.max_queued}; try again later",
                None,
                rid,
            )
        request = self._request(msg)
        engine = self.engines.resolve(request.model, rid)
        self._seq += 1
        entry = Entry(
            client,
            rid,
            uuid.uuid4().hex[:12],
            request,
            engine,
            int(msg.header.get("preview", 0)),
            msg.header.get("result_format", "rgba8"),
            self._seq,
            model=request.model,
            policy=msg.header.get("policy", "back"),
            stream=msg.header.get("stream"),
        )
        if engine is None:
            self.clients.add(state, entry)
            self._parked.setdefault(request.model, []).append(entry)
            log_event(logging.INFO, "waiting_for_model", id=rid, model=request.model)
            return
        self._admit(entry, state)

    def _request(self, msg: P.Message) -> Any:
        """The message's Request, its pictures attached (inputs as the mode registers them)."""
        from sdkit import modes
        from sdkit.request import Request, RequestError

        rid = msg.id
        try:
            request = Request.from_dict(dict(msg.header.get("request", {})))
            spec = modes.get(request.mode)
        except RequestError as e:
            raise P.ProtocolError("bad_field", e.message, f"request.{e.field}", rid) from None
        except TypeError as e:
            raise P.ProtocolError("bad_field", str(e), "request", rid) from None
        for name, pic in msg.pictures.items():
            unit = name.startswith("control[")  # control[i]: request.control[i]'s image
            if not (unit and "control" in spec.fields) and name not in spec.inputs:
                raise P.ProtocolError(
                    "bad_frames",
                    f"{request.mode} takes no {'control' if unit else name} frame "
                    f"(frames: {', '.join(_frame_names(spec)) or 'none'})",
                    "frames",
                    rid,
                )
            image = pictures.to_image(
                pic,
                mode="L" if name == "mask" else "RGBA",
                max_pixels=self.limits.max_pixels,
                where=f"frames[{name}]",
                request_id=rid,
            )
            if not unit:
                setattr(request, name, image)
            elif isinstance(request.control[i := int(name[8:-1])], dict):
                request.control[i] = {**request.control[i], "image": image}
        return request

    def _admit(self, entry: Entry, state: Client | None = None) -> None:
        """Check the request on its engine, hold it to the limits, queue it, say ``accepted``."""
        from sdkit.request import RequestError

        rid = entry.rid
        # a remote engine (Ray replicas) may start the job as it checks it: one round trip
        admit = getattr(entry.engine, "admit", None)
        try:
            if admit is not None:
                entry.request = admit(entry.request, preview_every=entry.preview)
            else:
                entry.request = entry.engine.check(entry.request)
        except RequestError as e:
            message = public_message(e.message, entry.engine)
            raise P.ProtocolError("bad_field", message, f"request.{e.field}", rid) from None
        _check_limits(entry.request, self.limits, rid, entry.engine)
        if state is not None:
            self.clients.add(state, entry)
        old = None
        if entry.policy == "replace":
            old = self._streams.get(_stream(entry))
            self._streams[_stream(entry)] = entry
        placed = old is not None and self.dispatcher.take_place(old, entry)
        if not placed:
            self.dispatcher.enqueue(entry, front=entry.policy == "front")
        position = entry.last_position = self.dispatcher.position(entry)
        log_event(
            logging.INFO,
            "accepted",
            client=client_label(entry.client),
            id=rid,
            job=entry.job_id,
            mode=str(entry.request.mode),
            position=position,
        )
        self._send(
            entry.client,
            P.event_frames(
                "accepted",
                rid,
                job=entry.job_id,
                position=position,
                request=entry.request.to_dict(),
                worker=self.worker,
            ),
        )
        if placed:  # it never reached its engine: it ends here, after its successor's accepted
            assert old is not None
            old.cancel_reason = SUPERSEDED
            self.clients.finish(old)
            log_event(logging.INFO, "cancelled", client=client_label(old.client), id=old.rid)
            if not old.gone:
                self._error(old, "cancelled", SUPERSEDED, superseded=True)
        elif old is not None and not old.finished:
            self.cancel(old, SUPERSEDED)  # running (or handed on): stops at its next step
        self.dispatcher.feed()

    def model_loaded(self, name: str) -> None:
        """Loader thread: a load ended; the socket thread resumes the parked requests."""
        self._events.put((None, "loaded", name))
        self._wake()

    def _resume(self, name: str) -> None:
        engine, error = self.engines.take(name)
        for entry in self._parked.pop(name, []):
            if entry.finished:
                continue
            if error is not None:
                self._end(entry)
                self._error(entry, "failed", f"model {name!r} could not be loaded: {error}")
                continue
            entry.engine = engine
            try:
                self._admit(entry)
            except P.ProtocolError as e:
                self._end(entry)
                self._error(entry, e.code, e.message, e.field)
            except Exception as e:  # noqa: BLE001 - one request, never the loop
                log.exception("bridge could not admit %s", entry.rid)
                self._end(entry)
                self._error(entry, "internal", f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------ running

    def _submit(self, entry: Entry) -> None:
        """Dispatcher: hand ``entry`` to its engine now."""

        def on_event(kind: str, job: Any, event: Any) -> None:  # an engine thread
            self._events.put((entry, str(kind), event))
            self._wake()

        try:
            entry.job = entry.engine.submit(
                entry.request,
                checked=True,  # `_admit` checked it on this engine
                preview_every=entry.preview,
                callback=on_event,
                policy=entry.policy,
                source=_stream(entry) if entry.policy == "replace" else None,
            )
        except Exception as e:  # noqa: BLE001 - e.g. the engine was closed meanwhile
            from sdkit.request import RequestError

            self._end(entry)
            if isinstance(e, RequestError):
                message = public_message(e.message, entry.engine)
                self._error(entry, "bad_field", message, f"request.{e.field}")
            else:
                self._error(
                    entry, "failed", public_message(f"{type(e).__name__}: {e}", entry.engine)
                )

    def cancel(self, entry: Entry, reason: str) -> None:
        """Cancel a request wherever it is; its terminal event follows (unless it is gone)."""
        entry.cancel_reason = reason
        if entry.job is not None:
            entry.job.cancel()
        elif not entry.finished:  # parked or waiting in the bridge: it ends here and now
            self.dispatcher.remove(entry)
            self._end(entry)
            log_event(logging.INFO, "cancelled", client=client_label(entry.client), id=entry.rid)
            if not entry.gone:
                self._error(entry, "cancelled", reason, superseded=reason == SUPERSEDED)

    def _end(self, entry: Entry) -> None:
        self.clients.finish(entry)
        if entry.engine is not None:
            self.dispatcher.ended(entry)
        if entry.policy == "replace" and self._streams.get(_stream(entry)) is entry:
            del self._streams[_stream(entry)]

    def _error(
        self, entry: Entry, code: str, message: str, field: str | None = None, **extra: Any
    ) -> None:
        """An ``error`` event; ``superseded=True`` marks a request a newer one replaced."""
        self.stats["errors"] += 1
        extra = {k: v for k, v in extra.items() if v}
        frames = P.event_frames(
            "error", entry.rid, code=code, message=message, field=field, **extra
        )
        self._send(entry.client, frames)

    def drain(self) -> None:
        """Forward the engine events that arrived since the last turn of the loop."""
        while True:
            try:
                entry, kind, event = self._events.get_nowait()
            except queue.Empty:
                return
            try:
                if entry is None:
                    self._resume(event)
                elif not entry.finished:
                    self._on_engine_event(entry, kind, event)
            except Exception:  # noqa: BLE001
                log.exception("bridge failed to forward %s", kind)

    def _on_engine_event(self, entry: Entry, kind: str, event: Any) -> None:
        client, rid = entry.client, entry.rid
        if kind == "started":
            entry.started = True
            self.dispatcher.started(entry)
            if not entry.gone:
                self._send(
                    client, P.event_frames("started", rid, job=entry.job_id), essential=False
                )
        elif kind == "progress":
            if entry.gone or event is None:
                return
            frames = []
            if entry.preview and event.preview is not None:
                frames = [("preview", pictures.from_image(event.preview))]
            self._send(
                client,
                P.event_frames(
                    "progress",
                    rid,
                    frames,
                    step=event.step,
                    total=event.total,
                    elapsed=round(event.elapsed, 4),
                ),
                essential=False,
            )
        elif kind == "done":
            self._end(entry)
            if not entry.gone:
                self._result(entry)
        elif kind == "cancelled":
            self._end(entry)
            log_event(
                logging.INFO,
                "cancelled",
                client=client_label(client),
                id=rid,
                reason=entry.cancel_reason,
            )
            if not entry.gone:
                superseded = entry.cancel_reason == SUPERSEDED
                self._error(entry, "cancelled", entry.cancel_reason, superseded=superseded)
        elif kind == "failed":
            self._end(entry)
            from sdkit.request import RequestError

            err = entry.job.error
            if isinstance(err, RequestError):
                code, message, fld = "bad_field", err.message, f"request.{err.field}"
            else:
                code, message, fld = "failed", f"{type(err).__name__}: {err}", None
            message = public_message(message, entry.engine)
            log_event(
                logging.WARNING, "failed", client=client_label(client), id=rid, message=message
            )
            if not entry.gone:
                self._error(entry, code, message, fld)

    def _result(self, entry: Entry) -> None:
        result = entry.job.result(timeout=0)
        frames = [("image", pictures.from_image(im, entry.result_format)) for im in result.images]
        self.stats["results"] += 1
        log_event(
            logging.INFO,
            "result",
            client=client_label(entry.client),
            id=entry.rid,
            images=len(frames),
        )
        self._send(
            entry.client,
            P.event_frames(
                "result",
                entry.rid,
                frames,
                seeds=list(result.seeds),
                infotexts=list(result.infotexts),
                timings={k: round(v, 4) for k, v in result.timings.items()},
                request=result.request.to_dict(),
                worker=getattr(result, "worker", None) or self.worker,  # a Ray replica's name
            ),
        )

    def probe(self) -> None:
        """``queued`` updates: tell waiting clients where they stand, and find vanished ones."""
        for entry, position in list(self.dispatcher.positions()):
            if entry.finished or entry.gone:
                continue
            entry.last_position = position
            self._send(
                entry.client,
                P.event_frames("queued", entry.rid, position=position),
                essential=False,
            )

    def queue_length(self, engine: Any) -> int:
        """Jobs waiting for ``engine``: in the engine's queue and in the bridge's."""
        return engine.queue_length() + self.dispatcher.waiting(engine)


def _check_limits(request: Any, limits: P.Limits, rid: str, engine: Any = None) -> None:
    """The server's limits on the request as it will run (sizes, images and steps filled;
    the size its images come out at, e.g. a hires fix's target)."""
    from sdkit.hires import enabled, output_size

    n = request.num_images
    multiple = getattr(engine, "size_multiple", 8)
    width, height = output_size(request, multiple)
    pixels = width * height * n
    if pixels > limits.max_pixels:
        hires = request.mode == "txt2img" and enabled(request)
        target = "hires_width" if request.hires_width or request.hires_height else "hires_scale"
        field = f"request.{target}" if hires else "request.width"
        raise P.ProtocolError(
            "too_large",
            f"this request makes {n} x {width}x{height} = {pixels} pixels; "
            f"the limit is {limits.max_pixels} per request",
            "request.num_images" if n > 1 else field,
            rid,
        )
    if n > limits.max_images:
        raise P.ProtocolError(
            "too_large",
            f"num_images={n}; the limit is {limits.max_images} per request",
            "request.num_images",
            rid,
        )
    if request.num_inference_steps > limits.max_steps:
        raise P.ProtocolError(
            "too_large",
            f"num_inference_steps={request.num_inference_steps}; the limit is "
            f"{limits.max_steps} per request",
            "request.num_inference_steps",
            rid,
        )


def _stream(entry: Entry) -> tuple[bytes, str]:
    """The source a ``replace`` supersedes within: the client and its chosen stream."""
    return entry.client, entry.stream or ""


def _frame_names(spec: Any) -> list[str]:
    """The frames a mode takes: its picture inputs, and `control` when it takes units."""
    return [*spec.inputs, *(["control"] if "control" in spec.fields else [])]
