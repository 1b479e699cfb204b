"""`sdkit.bridge.Client`: generate on a bridge server from Python, as PIL images.

It uses pyzmq when importable and the standard-library `zmtp.Dealer` otherwise (or when
asked with ``transport="zmtp"``); both sit under the same `tracker.Session`, so both
behave the same: progress callbacks, cancel, timeouts, and a clear `BridgeError` (code
``connection_lost``) for a request that was in flight when the server went away, after
which the client reconnects by itself.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sdkit.bridge import pictures, tracker, transports, zmtp
from sdkit.bridge import protocol as P

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


class BridgeError(P.CodedError, RuntimeError):
    """An ``error`` event from the server, or a client-side one (timeout, connection_lost)."""


class BridgeTimeout(BridgeError, TimeoutError):
    """No answer within the timeout (the request was cancelled on the server)."""


@dataclass(frozen=True)
class RemoteProgress:
    """Like `sdkit.ProgressEvent`, for a job on a server."""

    job_id: str
    step: int
    total: int
    elapsed: float
    preview: Image.Image | None = None


def _error(ev: P.Event) -> BridgeError:
    cls = BridgeTimeout if ev.code == "timeout" else BridgeError
    return cls(ev.code or "error", ev.message or "", ev.field, ev.id)


def _unit_header(unit: Any) -> Any:
    """A control unit as the header carries it: without its image (that is a frame)."""
    return {k: v for k, v in unit.items() if k != "image"} if isinstance(unit, dict) else unit


def image_to_picture(value: Any, name: str) -> P.Picture:
    """An image argument (PIL, array, path) as a frame: ``l8`` for the mask, else ``rgba8``."""
    from sdkit.request import load_image

    return pictures.from_image(load_image(value, name), "l8" if name == "mask" else "rgba8")


# ---------------------------------------------------------------------------- jobs


class RemoteJob:
    """A request on the server: ``state``, ``position``, ``progress``, `cancel`, `result`.

    Its state is the session's `tracker.TrackedJob` for the request; this adds PIL
    images, the progress callback and waiting.
    """

    def __init__(
        self,
        client: Client,
        track: tracker.TrackedJob,
        progress: Callable | None,
        timeout: float | None,
    ):
        self.client = client
        self.track = track
        self.id = track.id
        self.progress: RemoteProgress | None = None
        self.timeout = timeout
        self._callback = progress
        self._result: Any = None
        self._error: BridgeError | None = None
        self._done = threading.Event()

    state = property(lambda self: self.track.state, doc="sent | queued | running | done | ...")
    position = property(lambda self: self.track.position)
    request = property(lambda self: self.track.request)
    job_id = property(lambda self: self.track.job)
    worker = property(lambda self: self.track.worker, doc="which scale-out worker took it")

    def __repr__(self) -> str:
        return f"<RemoteJob {self.id} {self.state}>"

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.client.cancel(self)

    def result(self, timeout: float | None = None) -> Any:
        """Pump the connection until this job ends; raises `BridgeError` for errors."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                raise BridgeTimeout(
                    "timeout", f"job {self.id} not done after {timeout} s", None, self.id
                )
            self.client.pump(0.05)
        if self._error is not None:
            raise self._error
        return self._result

    # -- driven by Client.pump, after the session applied the event to ``track``
    def _on_event(self, ev: P.Event) -> None:
        if ev.event == "progress":
            # this event's own step, not ``track``'s: one poll may apply several events first
            now = tracker.TrackedJob(self.id)
            now.apply(ev)
            self.progress = RemoteProgress(
                self.track.job or self.id,
                now.step,
                now.total,
                now.elapsed,
                pictures.to_image(now.preview) if now.preview is not None else None,
            )
            if self._callback is not None:
                self._callback(self.progress)
        elif ev.event == "result":
            self._result = _make_result(ev)
            self._done.set()
        elif ev.event == "error":
            self._error = _error(ev)
            self._done.set()


def _make_result(ev: P.Event) -> Any:
    from sdkit.request import Request
    from sdkit.result import Result

    h = ev.header
    images = [pictures.to_image(p) for p in ev.pictures_named("image")]
    req_fields = dict(h.get("request") or {})
    try:
        request = Request.from_dict(req_fields)
    except Exception:  # noqa: BLE001 - a newer server may know more fields; keep the images
        request = Request(mode=req_fields.get("mode", "txt2img"))
    result = Result(images, list(h.get("seeds", [])), request, h.get("timings") or {})
    if isinstance(h.get("infotexts"), list) and len(h["infotexts"]) == len(images):
        result.infotexts = list(h["infotexts"])
    return result


# ---------------------------------------------------------------------------- client


class Client:
    """Generate on a bridge server; the four mode methods return an `sdkit.Result`.

    ``transport``: "auto" (pyzmq if importable, else the standard-library ZMTP client),
    "zmq" or "zmtp".  ``keys``: a folder from `sdkit keys` (CURVE; pyzmq only) and
    ``client_name`` the key pair in it.  ``timeout``: default seconds per request.
    Thread-safe: `cancel` may be called from another thread or a progress callback.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 300.0,
        transport: str = "auto",
        keys: str | Path | None = None,
        client_name: str = "client",
        heartbeat_ivl: float = 1.0,
        heartbeat_timeout: float = 10.0,
    ):
        self.address = address
        self.timeout = timeout
        identity = b"sdkit-" + uuid.uuid4().hex.encode()
        self.transport, self._transport = transports.open_transport(
            address,
            identity,
            transport,
            keys=keys,
            client_name=client_name,
            heartbeat_ivl=heartbeat_ivl,
            heartbeat_timeout=heartbeat_timeout,
        )
        self._session = tracker.Session(self._transport, client="sdkit.bridge.Client")
        self._lock = threading.RLock()
        self._jobs: dict[str, RemoteJob] = {}
        self._replies: dict[str, P.Event] = {}
        self._closed = False

    # ------------------------------------------------------------------ plumbing

    def pump(self, timeout: float = 0.0) -> None:
        """Receive for up to ``timeout`` s and dispatch events to jobs and waiting calls."""
        with self._lock:
            try:
                events = self._session.poll(timeout)
            except zmtp.ZmtpError as e:  # the server broke the protocol: say how, at once
                raise BridgeError("connection_lost", f"{self.address}: {e}") from e
            for ev in events:
                if ev.id is None:  # the session only returns events for its own requests
                    continue
                job = self._jobs.get(ev.id)
                if job is not None:
                    job._on_event(ev)
                    if job.done():
                        self._jobs.pop(ev.id, None)
                else:
                    self._replies[ev.id] = ev

    def _call(self, send: Callable[[], str], timeout: float | None) -> P.Event:
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            rid = send()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                ev = self._replies.pop(rid, None)
            if ev is not None:
                if ev.event == "error":
                    err = _error(ev)
                    # A drop the stdlib client saw a protocol failure in: chain its cause.
                    cause = getattr(self._transport, "error", None)
                    if ev.code == "connection_lost" and isinstance(cause, Exception):
                        raise err from cause
                    raise err
                return ev
            if deadline is not None and time.monotonic() >= deadline:
                with self._lock:
                    self._session.pending.pop(rid, None)
                raise BridgeTimeout("timeout", f"no answer from {self.address} within {timeout} s")
            self.pump(0.05)

    # ------------------------------------------------------------------ simple ops

    def hello(self, timeout: float | None = 10.0) -> dict:
        """Server, model, limits, schedulers and modes (the ``hello`` event's header)."""
        return self._call(self._session.hello, timeout).header

    def ping(self, timeout: float | None = 10.0) -> float:
        """Round-trip time in seconds."""
        t = time.perf_counter()
        self._call(self._session.ping, timeout)
        return time.perf_counter() - t

    def status(self, timeout: float | None = 10.0) -> dict:
        return self._call(self._session.status, timeout).header

    # ------------------------------------------------------------------ generation

    def submit(
        self,
        request: Any = None,
        *,
        image: Any = None,
        mask: Any = None,
        progress: Callable[[RemoteProgress], None] | None = None,
        preview: int = 0,
        result_format: str = "rgba8",
        timeout: float | None = None,
        policy: str = "back",
        stream: str | None = None,
        **fields: Any,
    ) -> RemoteJob:
        """Send a request (an `sdkit.Request`, a dict of its fields, or keyword fields);
        ``policy``/``stream``: where it waits (see `protocol.QUEUE_POLICIES`)."""
        if self._closed:
            raise BridgeError("closed", "this client is closed")
        if request is None:
            request = {}
        units = fields.get("control")
        if hasattr(request, "to_dict"):
            req_obj = request
            request = request.to_dict()
            image = req_obj.image if image is None else image
            mask = req_obj.mask if mask is None else mask
            units = req_obj.control if units is None else units
        request = {
            k: v for k, v in {**dict(request), **fields}.items() if k not in ("image", "mask")
        }
        units = request.get("control") if units is None else units
        control = {}  # each unit's image travels as a `control` frame with its index
        if isinstance(units, list):
            request["control"] = [_unit_header(u) for u in units]
            for i, u in enumerate(units):
                if isinstance(u, dict) and u.get("image") is not None:
                    control[i] = image_to_picture(u["image"], f"control[{i}].image")
        if not request.get("model"):
            request.pop("model", None)
        if not request.get("extra"):
            request.pop("extra", None)
        img = image_to_picture(image, "image") if image is not None else None
        msk = image_to_picture(mask, "mask") if mask is not None else None
        timeout = self.timeout if timeout is None else timeout
        if self._session.limits is None:
            self.hello(timeout=timeout)  # the server's limits, checked before every send
        with self._lock:
            try:
                rid = self._session.generate(
                    request,
                    image=img,
                    mask=msk,
                    control=control,
                    preview=1 if preview is True else int(preview or 0),
                    result_format=result_format,
                    timeout=timeout,
                    policy=policy,
                    stream=stream,
                )
            except P.ProtocolError as e:  # over a limit from hello: no need to ask
                raise BridgeError(e.code, e.message, e.field, e.request_id) from None
            job = RemoteJob(self, self._session.jobs[rid], progress, timeout)
            self._jobs[rid] = job
        return job

    def generate(self, request: Any = None, **kwargs: Any) -> Any:
        return self.submit(request, **kwargs).result()

    def txt2img(self, prompt: str, **fields: Any) -> Any:
        return self.generate(mode="txt2img", prompt=prompt, **fields)

    def img2img(self, image: Any, prompt: str = "", **fields: Any) -> Any:
        return self.generate(mode="img2img", image=image, prompt=prompt, **fields)

    def inpaint(self, image: Any, mask: Any, prompt: str = "", **fields: Any) -> Any:
        return self.generate(mode="inpaint", image=image, mask=mask, prompt=prompt, **fields)

    def unconditional(self, **fields: Any) -> Any:
        return self.generate(mode="unconditional", **fields)

    def cancel(self, job: RemoteJob | str) -> None:
        """Ask the server to cancel; the job then ends with a ``cancelled`` `BridgeError`."""
        rid = job.id if isinstance(job, RemoteJob) else str(job)
        with self._lock:
            cid = self._session.cancel(rid)
            self._session.pending.pop(cid, None)  # the ack is informational

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._session.bye()
            if isinstance(self._transport, zmtp.Dealer):
                self._transport.flush(timeout=0.5)
            self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sdkit.bridge.Client {self.address} via {self.transport}>"


def connect(address: str = DEFAULT_ADDRESS, **kwargs: Any) -> Client:
    return Client(address, **kwargs)
