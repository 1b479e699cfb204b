"""Following remote jobs from the client side: the `Session` and one `TrackedJob` per request.

Standard library only (plus ``protocol``): it runs inside the editors as well as under
`sdkit.bridge.Client`. `Session` sends requests over a transport, matches the events that
come back to the requests in flight, makes up the ``connection_lost`` and ``timeout``
errors nobody else can send, and checks the server's limits (learnt from ``hello``)
before anything is sent, so an oversized request fails at once instead of timing out.
Each ``generate`` gets a `TrackedJob`, the one state machine for a job's events
(accepted/queued, started, progress, result, error) that the Python client and the
plug-ins read. A session never blocks longer than the ``timeout`` it is given, so a Qt
timer can pump it from an editor's UI thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

try:  # as part of sdkit.bridge, or copied next to a plug-in package
    from . import protocol as P
except ImportError:  # copied next to a plug-in script (GIMP): a top-level module
    import protocol as P  # type: ignore[no-redef]

# A job's states, as `sdkit.jobs.JobState` spells them where they overlap.
SENT, QUEUED, RUNNING, DONE, FAILED, CANCELLED = (
    "sent",
    "queued",
    "running",
    "done",
    "failed",
    "cancelled",
)
ENDED = (DONE, FAILED, CANCELLED)


@dataclass
class TrackedJob:
    """What a client knows of one ``generate`` request, from the events it received."""

    id: str
    state: str = SENT
    position: int | None = None
    job: str | None = None  # the server's job id
    request: dict | None = None  # the request as the server will run it
    worker: str | None = None  # which scale-out worker took it
    step: int = 0
    total: int = 0
    elapsed: float = 0.0
    preview: P.Picture | None = None
    result: P.Event | None = None
    error: P.Event | None = None
    cancelling: bool = False
    superseded: bool = False  # ended because a newer "replace" of its stream took over

    @property
    def done(self) -> bool:
        return self.state in ENDED

    @property
    def fraction(self) -> float:
        """0..1 for a progress bar."""
        if self.state == DONE:
            return 1.0
        return max(0.0, min(1.0, self.step / self.total)) if self.total > 0 else 0.0

    @property
    def error_text(self) -> str | None:
        """The server's message, naming the field at fault."""
        if self.error is None:
            return None
        where = f" (field {self.error.field})" if self.error.field else ""
        return f"{self.error.message or self.error.code}{where}"

    @property
    def status(self) -> str:
        """One line for a status bar."""
        if self.state == FAILED:
            return self.error_text or "failed"
        if self.state in (DONE, CANCELLED):
            return self.state
        if self.cancelling:
            return "cancelling…"
        if self.state == QUEUED:
            return f"queued (position {self.position})" if self.position else "queued"
        if self.state == RUNNING:
            return f"step {self.step}/{self.total}" if self.total else "running"
        return "sent…"

    def apply(self, ev: P.Event) -> bool:
        """Apply one event; True when it was this job's (events after the end are ignored)."""
        if ev.id != self.id or self.done:
            return False
        h = ev.header
        if ev.event in ("accepted", "queued"):
            if self.state == SENT or self.state == QUEUED:
                self.state = QUEUED
                self.position = _int(h.get("position", h.get("queue_position")), None)
            self._note(h)
        elif ev.event == "started":
            self.state, self.position = RUNNING, 0
            self._note(h)
        elif ev.event == "progress":
            self.state, self.position = RUNNING, 0
            self.step, self.total = _int(h.get("step"), 0), _int(h.get("total"), 0)
            elapsed = h.get("elapsed")
            self.elapsed = float(elapsed) if isinstance(elapsed, (int, float)) else 0.0
            previews = ev.pictures_named("preview") or [p for _, p in ev.pictures]
            if previews:
                self.preview = previews[0]
        elif ev.event == "result":
            self.state, self.result = DONE, ev
            self._note(h)
        elif ev.event == "error":
            self.state = CANCELLED if ev.code == "cancelled" else FAILED
            self.superseded = ev.header.get("superseded") is True  # a newer "replace" took over
            self.error = ev
        return True

    def _note(self, h: Mapping[str, Any]) -> None:
        """What the server says about the job, where it is well-typed."""
        if isinstance(h.get("job"), str):
            self.job = h["job"]
        if isinstance(h.get("request"), dict):
            self.request = h["request"]
        if isinstance(h.get("worker"), str):
            self.worker = h["worker"]


def _int(value: Any, default: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# ---------------------------------------------------------------------------- limits


def check_request(
    frames: Sequence[Any],
    limits: P.Limits,
    rid: str,
    request: Mapping[str, Any] | None = None,
    pictures: Mapping[str, P.Picture] | None = None,
) -> None:
    """Raise the ``too_large`` `ProtocolError` the server would answer, before sending."""
    header = len(frames[0])
    if header > limits.max_header_bytes:
        field, detail = None, ""
        if request:
            key = max(request, key=lambda k: len(P.dumps({k: request[k]})))
            field = f"request.{key}"
            detail = f" ({field} alone takes {len(P.dumps({key: request[key]}))} bytes)"
        raise P.ProtocolError(
            "too_large",
            f"the request's header is {header} bytes but the server takes at most "
            f"{limits.max_header_bytes}{detail}",
            field,
            rid,
        )
    if len(frames) > limits.max_frames:
        raise P.ProtocolError(
            "too_large", f"{len(frames)} frames; the server takes {limits.max_frames}", None, rid
        )
    total = sum(len(f) for f in frames)
    if total > limits.max_message_bytes:
        raise P.ProtocolError(
            "too_large",
            f"the message is {total} bytes; the server takes at most {limits.max_message_bytes}",
            None,
            rid,
        )
    for name, pic in (pictures or {}).items():
        if pic.width * pic.height > limits.max_pixels:
            raise P.ProtocolError(
                "too_large",
                f"the {name} is {pic.width}x{pic.height} = {pic.width * pic.height} pixels; "
                f"the server takes at most {limits.max_pixels}",
                name,
                rid,
            )
    for key, limit in (("num_images", "max_images"), ("num_inference_steps", "max_steps")):
        value, most = _int((request or {}).get(key), 0), getattr(limits, limit, None)
        if most is not None and value > most:
            raise P.ProtocolError(
                "too_large",
                f"{key}={value}; the server takes at most {most}",
                f"request.{key}",
                rid,
            )
    w, h = _int((request or {}).get("width"), 0), _int((request or {}).get("height"), 0)
    n = _int((request or {}).get("num_images"), 1)
    if w > 0 and h > 0 and w * h * max(n, 1) > limits.max_pixels:
        raise P.ProtocolError(
            "too_large",
            f"{max(n, 1)} x {w}x{h} = {w * h * max(n, 1)} pixels; the server takes at most "
            f"{limits.max_pixels} per request",
            "request.width",
            rid,
        )


# ---------------------------------------------------------------------------- Session


class Transport(Protocol):
    """What a `Session` needs: pyzmq's DEALER (wrapped) or `zmtp.Dealer`."""

    epoch: int  # +1 every time an established connection is lost

    def send_multipart(self, frames: Sequence[Any]) -> None: ...

    def poll(self, timeout: float = 0.0) -> list[list[bytes]]: ...

    def close(self) -> None: ...


@dataclass
class Pending:
    id: str
    op: str
    epoch: int
    sent: float
    target: str | None = None


class Session:
    """Client-side bookkeeping for one connection; never blocks longer than asked.

    Editor plug-ins call `generate`/`cancel` from UI handlers and `poll(0)` from a timer;
    each returned `Event` belongs to a request id this session sent, and has already been
    applied to its `TrackedJob` (``jobs[id]``, kept until the job ends).  A request that was
    in flight when the connection dropped ends with an ``error`` event, code
    ``connection_lost`` (the server that would answer it is gone); a request that gets no
    answer within ``timeout`` seconds (if given) ends with code ``timeout``.  ``info`` and
    ``limits`` come from the last ``hello`` reply (``limits`` is None before one).
    """

    def __init__(self, transport: Transport, *, client: str = "sdkit-session"):
        self.transport = transport
        self.client = client
        self.pending: dict[str, Pending] = {}
        self.jobs: dict[str, TrackedJob] = {}
        self.info: dict[str, Any] = {}
        self.limits: P.Limits | None = None
        self._epoch = transport.epoch
        self._deadlines: dict[str, float] = {}
        self._backlog: list[P.Event] = []
        self.on_event: Callable[[P.Event], None] | None = None

    # -- sending
    def _send(self, op: str, frames: list[Any], rid: str, target: str | None = None) -> str:
        if rid in self.pending:
            raise ValueError(f"request id {rid!r} is already in flight")
        self._check_epoch()
        epoch = self.transport.epoch  # read first: a drop while writing this loses it too
        self.transport.send_multipart(frames)
        self.pending[rid] = Pending(rid, op, epoch, time.monotonic(), target)
        return rid

    def hello(self, *, request_id: str | None = None) -> str:
        rid = request_id or P.new_request_id()
        frames = P.request_frames(
            "hello", rid, client=self.client, versions=list(P.SUPPORTED_VERSIONS)
        )
        return self._send("hello", frames, rid)

    def ping(self, *, request_id: str | None = None) -> str:
        rid = request_id or P.new_request_id()
        return self._send("ping", P.request_frames("ping", rid), rid)

    def status(self, *, request_id: str | None = None) -> str:
        rid = request_id or P.new_request_id()
        return self._send("status", P.request_frames("status", rid), rid)

    def generate(
        self,
        request: Mapping[str, Any],
        *,
        image: P.Picture | None = None,
        mask: P.Picture | None = None,
        control: Mapping[int, P.Picture] | None = None,
        preview: int = 0,
        result_format: str = "rgba8",
        request_id: str | None = None,
        timeout: float | None = None,
        policy: str = "back",
        stream: str | None = None,
    ) -> str:
        """Send a request; raises ``too_large`` `ProtocolError` at once if it breaks a limit.
        ``control``: control unit index -> its image (``request["control"]`` holds the units).
        ``policy``: "back", "front" (ahead of this client's waiting requests) or "replace"
        (supersedes this client's waiting/running request of the same ``stream``)."""
        if policy not in P.QUEUE_POLICIES:
            allowed = ", ".join(P.QUEUE_POLICIES)
            raise P.ProtocolError(
                "bad_field", f"unknown policy {policy!r}; allowed: {allowed}", "policy"
            )
        rid = request_id or P.new_request_id()
        frames = P.generate_frames(
            rid,
            request,
            image=image,
            mask=mask,
            control=control,
            preview=preview,
            result_format=result_format,
            policy=policy,
            stream=stream,
        )
        if self.limits is not None:
            pictures = {k: v for k, v in (("image", image), ("mask", mask)) if v is not None}
            pictures.update({f"control[{i}]": v for i, v in (control or {}).items()})
            check_request(frames, self.limits, rid, request, pictures)
        self._send("generate", frames, rid)
        self.jobs[rid] = TrackedJob(rid)
        if timeout is not None:
            self._deadlines[rid] = time.monotonic() + timeout
        return rid

    def cancel(self, target: str, *, request_id: str | None = None) -> str:
        """Ask the server to cancel ``target``; its own terminal event follows later."""
        rid = request_id or P.new_request_id()
        self._send("cancel", P.request_frames("cancel", rid, target=target), rid, target)
        if target in self.jobs:
            self.jobs[target].cancelling = True
        return rid

    def bye(self) -> None:
        """Tell the server this client is leaving (its unfinished requests are cancelled)."""
        try:
            self.transport.send_multipart(P.request_frames("bye", P.new_request_id()))
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    # -- receiving
    def _check_epoch(self) -> None:
        """Requests sent over a connection that has since dropped will never be answered."""
        epoch = self.transport.epoch
        if epoch == self._epoch:
            return
        self._epoch = epoch
        # The transport may know why it dropped (the stdlib client keeps its protocol error).
        cause = getattr(self.transport, "error", None)
        why = f" ({cause})" if cause is not None else "; the server may have restarted"
        for p in [p for p in self.pending.values() if p.epoch < epoch]:
            self._backlog.append(
                self._synthetic(
                    p.id,
                    "connection_lost",
                    f"the connection to the server dropped while {p.op} {p.id!r} was in "
                    f"flight{why}, send it again",
                )
            )

    def _synthetic(self, rid: str, code: str, message: str) -> P.Event:
        self.pending.pop(rid, None)
        self._deadlines.pop(rid, None)
        header = {"v": P.VERSION, "event": "error", "id": rid, "code": code, "message": message}
        header["field"] = None
        return P.Event("error", rid, header)

    def _accept(self, frames: list[bytes]) -> P.Event | None:
        try:
            ev = P.decode_event(frames)
        except P.ProtocolError:
            return None  # not ours to answer; a well-behaved server never sends this
        p = self.pending.get(ev.id) if ev.id is not None else None
        if p is None:
            return None
        if ev.terminal or p.op != "generate":
            self.pending.pop(p.id, None)
            self._deadlines.pop(p.id, None)
        if p.op == "hello" and ev.event == "hello":
            self._on_hello(ev)
        return ev

    def _on_hello(self, ev: P.Event) -> None:
        self.info = dict(ev.header)
        try:
            self.limits = P.Limits.from_dict(ev.header.get("limits") or {})
        except (AttributeError, TypeError, ValueError):  # no usable limits: its defaults
            self.limits = P.Limits()
        set_limits = getattr(self.transport, "set_limits", None)
        if set_limits is not None:  # zmtp.Dealer: a reply is at most rgba8 pixels + a header
            set_limits(max_bytes=4 * max(0, self.limits.max_pixels) + 16 * 2**20)

    def poll(self, timeout: float = 0.0) -> list[P.Event]:
        """Pump the transport for up to ``timeout`` seconds; return the events that arrived."""
        self._check_epoch()
        events, self._backlog = self._backlog, []
        if not events:
            for frames in self.transport.poll(timeout):
                ev = self._accept(frames)
                if ev is not None:
                    events.append(ev)
            self._check_epoch()
            events.extend(self._backlog)
            self._backlog = []
        now = time.monotonic()
        for rid, deadline in list(self._deadlines.items()):
            if now >= deadline and rid in self.pending:
                try:
                    self.cancel(rid)
                except Exception:  # noqa: BLE001 - the timeout error is what matters
                    pass
                events.append(
                    self._synthetic(rid, "timeout", f"no result for {rid!r} within the timeout")
                )
        for ev in events:
            job = self.jobs.get(ev.id) if ev.id is not None else None
            if job is not None and job.apply(ev) and job.done:
                del self.jobs[job.id]
        if self.on_event is not None:
            for ev in events:
                self.on_event(ev)
        return events

    def close(self) -> None:
        self.bye()
        self.transport.close()
