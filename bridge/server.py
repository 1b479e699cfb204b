"""The bridge server: a ZeroMQ ROUTER in front of an `sdkit.Engine`.

One thread owns the socket.  Engine events arrive on the engine's worker thread, so the
job callbacks only put them on a queue and write one byte to a wake-up socket pair that
the socket thread polls next to the ROUTER; only the socket thread ever touches zmq.

Clients are tracked by their ZeroMQ routing id.  ROUTER_MANDATORY turns a send to a
client that has gone (its TCP connection closed, or libzmq's heartbeat timed it out) into
an error, on which all of that client's jobs are cancelled; clients with queued jobs get a
``queued`` event every ``probe_interval`` seconds, so a vanished client is noticed before
its jobs reach the front of the queue.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import socket as pysocket
import threading
import time
from collections.abc import Mapping
from typing import Any

import zmq
from PIL import Image
from sdkit.bridge import protocol as P
from sdkit.bridge import security
from sdkit.bridge.clients import Clients, Entry
from sdkit.bridge.logs import client_label, log, log_event

DEFAULT_BIND = "tcp://127.0.0.1:5555"
SERVER_NAME = "sdkit-bridge"


def _image_from_picture(pic: P.Picture, name: str, max_pixels: int) -> Image.Image:
    data = pic.data
    if pic.format == "rgba8":
        return Image.frombytes("RGBA", (pic.width, pic.height), bytes(data))
    if pic.format == "l8":
        return Image.frombytes("L", (pic.width, pic.height), bytes(data))
    where = f"frames[{name}]"
    try:
        im = Image.open(io.BytesIO(bytes(data)))
        if im.width * im.height > max_pixels:
            raise P.ProtocolError("too_large", f"the {name} PNG is {im.width}x{im.height}", where)
        if (im.width, im.height) != (pic.width, pic.height):
            raise P.ProtocolError(
                "bad_frames",
                f"the {name} PNG is {im.width}x{im.height}, the descriptor says "
                f"{pic.width}x{pic.height}",
                where,
            )
        im.load()
    except P.ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the client's bad data
        raise P.ProtocolError(
            "bad_frames", f"the {name} frame is not a readable PNG ({e})", where
        ) from None
    if name == "mask":
        return im.convert("L")
    return im.convert("RGBA")


def picture_from_image(image: Image.Image, fmt: str = "rgba8") -> P.Picture:
    """A result image as it travels: straight RGBA8 (alpha 255 for RGB) or PNG bytes."""
    if fmt == "png":
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return P.Picture(image.width, image.height, "png", buf.getvalue())
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    return P.Picture(image.width, image.height, "rgba8", rgba.tobytes())


# ---------------------------------------------------------------------------- server


class Server:
    """Serve one engine (plus allowed models) on a ROUTER, or as a scale-out worker.

    ``connect`` instead of ``bind`` makes this a worker behind `scaleout.Broker`: a DEALER
    connected to the broker's back end, where every message still starts with the
    client's routing id.
    """

    def __init__(
        self,
        engine: Any,
        *,
        bind: str | None = DEFAULT_BIND,
        connect: str | None = None,
        keys: str | Any | None = None,
        limits: P.Limits | None = None,
        models: Mapping[str, Any] | None = None,
        heartbeat_ivl: float = 2.0,
        heartbeat_timeout: float = 30.0,
        probe_interval: float = 2.0,
        context: zmq.Context | None = None,
        client_keys: Any | None = None,
        name: str | None = None,
    ):
        self.engine = engine
        self.bind_address = None if connect else bind
        self.connect_address = connect
        self.limits = limits or P.Limits()
        self.heartbeat_ivl = heartbeat_ivl
        self.heartbeat_timeout = heartbeat_timeout
        self.probe_interval = probe_interval
        self.worker = connect is not None
        self.name = name or (f"{pysocket.gethostname()}:{os.getpid()}" if self.worker else None)
        if isinstance(keys, str | bytes) or hasattr(keys, "__fspath__"):
            keys = security.load_server_keys(keys)
        self.keys = keys
        self.client_keys = client_keys  # a worker's own CURVE keys towards a secure broker
        self._models = dict(models or {})
        self._engines: dict[str, Any] = {}
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.address: str | None = None
        self._sock: zmq.Socket | None = None
        self._auth = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._clients = Clients()
        self._seq = 0
        self._stop = threading.Event()
        self._notify_on_stop = True
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self.stats = {"messages": 0, "errors": 0, "results": 0, "clients_gone": 0}

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Server:
        """Bind (or connect) now, so errors surface here, then serve in a daemon thread."""
        self._open()
        self._thread = threading.Thread(target=self._run, name="sdkit-bridge", daemon=True)
        self._thread.start()
        return self

    def _open(self) -> None:
        ctx = self.context
        if self.worker:
            sock = ctx.socket(zmq.DEALER)
            if self.client_keys is not None:
                security.apply_client(sock, self.client_keys)
        else:
            security.check_bind(self.bind_address, self.keys)
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            if self.keys is not None:
                self._auth = security.start_authenticator(ctx, self.keys)
                security.apply_server(sock, self.keys)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_ivl * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_timeout * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(self.heartbeat_timeout * 1000))
        sock.sndhwm = sock.rcvhwm = 10_000
        try:
            if self.worker:
                sock.connect(self.connect_address)
                self.address = self.connect_address
            else:
                sock.bind(self.bind_address)
                self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            sock.close(0)
            self._close_auth()
            where = self.connect_address or self.bind_address
            raise OSError(f"cannot {'connect to' if self.worker else 'bind'} {where}: {e}") from e
        self._sock = sock
        log_event(
            logging.INFO,
            "serving",
            address=self.address,
            worker=self.worker,
            curve=self.keys is not None,
            model=getattr(self.engine, "spec", None),
        )

    def stop(self, timeout: float = 10.0, *, notify: bool = True) -> None:
        """Stop serving: unfinished requests end with a ``shutdown`` error; engines stay open.

        ``notify=False`` closes without telling clients (what a crash looks like to them).
        """
        self._notify_on_stop = notify
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _close_auth(self) -> None:
        if self._auth is not None:
            try:
                self._auth.stop()
            except Exception:  # noqa: BLE001
                pass
            self._auth = None

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or shutting down

    # ------------------------------------------------------------------ main loop

    def _run(self) -> None:
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_probe = time.monotonic() + self.probe_interval
        try:
            while not self._stop.is_set():
                timeout = max(0.0, next_probe - time.monotonic())
                if self._clients.has_deferred:
                    timeout = min(timeout, 0.01)
                ready = dict(poller.poll(int(timeout * 1000) + 1))
                if self._wake_r.fileno() in ready or self._wake_r in ready:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                if sock in ready:
                    for _ in range(1000):  # bounded, so engine events are not starved
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message([f.buffer for f in frames])
                self._drain_events()
                if self._clients.has_deferred:
                    self._clients.retry_deferred(self._send_again)
                if time.monotonic() >= next_probe:
                    self._probe()
                    next_probe = time.monotonic() + self.probe_interval
        except Exception:  # noqa: BLE001 - the loop itself must not die silently
            log_event(logging.ERROR, "server_loop_crashed", address=self.address)
            log.exception("bridge server loop crashed")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for entry in self._clients.entries():
            entry.cancel_reason = "the server is stopping"
            try:
                entry.job.cancel()
            except Exception:  # noqa: BLE001
                pass
            if not entry.gone and self._notify_on_stop:
                self._send(
                    entry.client,
                    P.error_frames(
                        entry.rid, "shutdown", "the server stopped before this finished"
                    ),
                )
        self._clients.clear()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        self._close_auth()
        self._wake_r.close()
        self._wake_w.close()
        if self._own_context:
            self.context.term()
        log_event(logging.INFO, "stopped", address=self.address, **self.stats)

    # ------------------------------------------------------------------ sending

    def _send(self, client: bytes, frames: list[Any], essential: bool = True) -> bool:
        """Send to a client; a vanished client's jobs are cancelled. False if not sent."""
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.send_multipart([client, *frames], zmq.NOBLOCK, copy=len(frames) < 2)
            return True
        except zmq.Again:
            if essential:
                self._clients.defer(client, frames)
            return False
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self._client_gone(client)
                return False
            raise

    def _send_again(self, client: bytes, frames: list[Any]) -> bool:
        return self._send(client, frames, essential=False)

    def _error(self, client: bytes, rid: str | None, code: str, message: str, field=None) -> None:
        self.stats["errors"] += 1
        self._send(client, P.error_frames(rid, code, message, field))

    def _client_gone(self, client: bytes) -> None:
        state = self._clients.pop(client)
        if state is None:
            return
        self.stats["clients_gone"] += 1
        log_event(
            logging.WARNING,
            "client_gone",
            client=client_label(client),
            cancelled=[e.rid for e in state.entries.values()],
        )
        for entry in state.entries.values():
            entry.gone = True
            entry.cancel_reason = "the client went away"
            entry.job.cancel()

    # ------------------------------------------------------------------ messages

    def _on_message(self, frames: list[Any]) -> None:
        self.stats["messages"] += 1
        if len(frames) < 2:
            return  # a ROUTER always prefixes the routing id; nothing to answer
        client, body = bytes(frames[0]), frames[1:]
        try:
            msg = P.decode_request(body, self.limits)
        except P.ProtocolError as e:
            log_event(
                logging.INFO,
                "bad_message",
                client=client_label(client),
                id=e.request_id,
                code=e.code,
                field=e.field,
                message=e.message,
            )
            self._error(client, e.request_id, e.code, e.message, e.field)
            return
        if msg.op != "bye":
            self._clients.touch(client, time.monotonic())
        try:
            getattr(self, f"_op_{msg.op}")(client, msg)
        except P.ProtocolError as e:
            log_event(
                logging.INFO,
                "bad_request",
                id=msg.id,
                code=e.code,
                field=e.field,
                message=e.message,
            )
            self._error(client, msg.id, e.code, e.message, e.field)
        except Exception as e:  # noqa: BLE001 - nothing a client sends may stop the server
            log.exception("bridge op %s failed", msg.op)
            self._error(client, msg.id, "internal", f"{type(e).__name__}: {e}")

    def _op_hello(self, client: bytes, msg: P.Message) -> None:
        info = self.engine.info()
        self._send(
            client,
            P.event_frames(
                "hello",
                msg.id,
                versions=list(P.SUPPORTED_VERSIONS),
                server=f"{SERVER_NAME}/{_version()}",
                model=info,
                models=sorted({info.get("name") or str(self.engine.spec), *self._models}),
                modes=info.get("modes", ["txt2img", "img2img", "inpaint", "unconditional"]),
                schedulers=list(self.engine.scheduler_names),
                defaults=info.get("defaults", {}),
                limits=self.limits.to_dict(),
                formats={
                    "image": list(P.REQUEST_FRAMES["image"]),
                    "mask": list(P.REQUEST_FRAMES["mask"]),
                    "result": list(P.RESULT_FORMATS),
                },
                worker=self.name,
            ),
        )

    def _op_ping(self, client: bytes, msg: P.Message) -> None:
        self._send(
            client, P.event_frames("pong", msg.id, data=msg.header.get("data"), time=time.time())
        )

    def _op_status(self, client: bytes, msg: P.Message) -> None:
        state = self._clients.get(client)
        jobs = {rid: e.job.state for rid, e in (state.entries.items() if state else [])}
        self._send(
            client,
            P.event_frames(
                "status",
                msg.id,
                queue_length=self.engine.queue_length(),
                running=getattr(self.engine, "current_job", None) is not None,
                jobs=jobs,
                clients=len(self._clients),
                uptime=round(time.time() - self._started, 3),
            ),
        )

    def _op_cancel(self, client: bytes, msg: P.Message) -> None:
        target = msg.header["target"]
        state = self._clients.get(client)
        entry = state.entries.get(target) if state else None
        if entry is None:
            if not self.worker:  # behind a broker, the worker that owns it answers
                self._send(client, P.event_frames("cancel", msg.id, target=target, found=False))
            return
        was = entry.job.state
        entry.job.cancel()
        log_event(logging.INFO, "cancel", client=client_label(client), id=target, was=was)
        self._send(client, P.event_frames("cancel", msg.id, target=target, found=True, state=was))

    def _op_bye(self, client: bytes, msg: P.Message) -> None:
        state = self._clients.pop(client)
        for entry in state.entries.values() if state else []:
            entry.gone = True
            entry.cancel_reason = "the client said bye"
            entry.job.cancel()
        self._send(client, P.event_frames("bye", msg.id), essential=False)

    def _op_generate(self, client: bytes, msg: P.Message) -> None:
        from sdkit.request import Request, RequestError

        state = self._clients.touch(client, time.monotonic())
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
        fields = dict(msg.header.get("request", {}))
        engine = self._engine_for(fields.get("model"), rid)
        try:
            request = Request.from_dict(fields)
        except RequestError as e:
            raise P.ProtocolError("bad_field", e.message, f"request.{e.field}", rid) from None
        except TypeError as e:
            raise P.ProtocolError("bad_field", str(e), "request", rid) from None
        uses = {"img2img": ("image",), "inpaint": ("image", "mask")}.get(request.mode, ())
        for name, pic in msg.pictures.items():
            if name not in uses:
                raise P.ProtocolError(
                    "bad_frames",
                    f"{request.mode} takes no {name} frame (frames: {', '.join(uses) or 'none'})",
                    "frames",
                    rid,
                )
            setattr(request, name, _image_from_picture(pic, name, self.limits.max_pixels))
        preview = int(msg.header.get("preview", 0))

        def on_event(kind: str, job: Any, event: Any) -> None:  # engine worker thread
            self._events.put((job.id, kind, event))
            self._wake()

        try:
            if _takes_callback(engine):
                job = engine.submit(request, preview_every=preview, callback=on_event)
            else:  # the documented minimum: submit, then add_callback
                job = engine.submit(request, preview_every=preview)
                job.add_callback(on_event)
        except RequestError as e:
            raise P.ProtocolError("bad_field", e.message, f"request.{e.field}", rid) from None
        self._seq += 1
        entry = Entry(
            client, rid, job, engine, preview, msg.header.get("result_format", "rgba8"), self._seq
        )
        self._clients.add(state, entry)
        position = self._position(entry)
        entry.last_position = position
        log_event(
            logging.INFO,
            "accepted",
            client=client_label(client),
            id=rid,
            job=job.id,
            mode=request.mode,
            position=position,
        )
        self._send(
            client,
            P.event_frames(
                "accepted",
                rid,
                job=job.id,
                position=position,
                request=job.request.to_dict(),
                worker=self.name,
            ),
        )

    def _engine_for(self, model: Any, rid: str) -> Any:
        """The main engine, or an allow-listed one; client model specs never reach a loader."""
        if model is None:
            return self.engine
        if not isinstance(model, str):
            raise P.ProtocolError(
                "bad_field", "request.model must be a string", "request.model", rid
            )
        info = self.engine.info()
        if model in (info.get("name"), str(self.engine.spec), "default", "embedded"):
            return self.engine
        if model not in self._models:
            raise P.ProtocolError(
                "model_not_allowed",
                f"model {model!r} is not served here; allowed: "
                f"{', '.join(sorted({info.get('name') or str(self.engine.spec), *self._models}))}",
                "request.model",
                rid,
            )
        target = self._models[model]
        if isinstance(target, str) or hasattr(target, "__fspath__"):
            if model not in self._engines:
                import sdkit

                log_event(logging.INFO, "loading_model", model=model)
                self._engines[model] = sdkit.load(target)
            return self._engines[model]
        return target

    def _position(self, entry: Entry) -> int:
        """Jobs ahead of this one that the bridge knows of (0: running or next)."""
        if entry.job.state != "queued":
            return 0
        return sum(
            1
            for e in self._clients.entries()
            if e.engine is entry.engine and e.seq < entry.seq and not e.finished
        )

    # ------------------------------------------------------------------ engine events

    def _drain_events(self) -> None:
        while True:
            try:
                job_id, kind, event = self._events.get_nowait()
            except queue.Empty:
                return
            entry = self._clients.by_job(job_id)
            if entry is None or entry.finished:
                continue
            try:
                self._on_engine_event(entry, kind, event)
            except Exception:  # noqa: BLE001
                log.exception("bridge failed to forward %s for %s", kind, entry.rid)

    def _finish(self, entry: Entry) -> None:
        self._clients.finish(entry)

    def _on_engine_event(self, entry: Entry, kind: str, event: Any) -> None:
        client, rid = entry.client, entry.rid
        if kind == "started":
            entry.started = True
            if not entry.gone:
                self._send(
                    client, P.event_frames("started", rid, job=entry.job.id), essential=False
                )
        elif kind == "progress":
            if entry.gone or event is None:
                return
            pictures = []
            if entry.preview and event.preview is not None:
                pictures = [("preview", picture_from_image(event.preview))]
            self._send(
                client,
                P.event_frames(
                    "progress",
                    rid,
                    pictures,
                    step=event.step,
                    total=event.total,
                    elapsed=round(event.elapsed, 4),
                ),
                essential=False,
            )
        elif kind == "done":
            self._finish(entry)
            if entry.gone:
                return
            result = entry.job.result(timeout=0)
            pictures = [
                ("image", picture_from_image(im, entry.result_format)) for im in result.images
            ]
            self.stats["results"] += 1
            log_event(
                logging.INFO, "result", client=client_label(client), id=rid, images=len(pictures)
            )
            self._send(
                client,
                P.event_frames(
                    "result",
                    rid,
                    pictures,
                    seeds=list(result.seeds),
                    infotexts=list(result.infotexts),
                    timings={k: round(v, 4) for k, v in result.timings.items()},
                    request=result.request.to_dict(),
                    worker=self.name,
                ),
            )
        elif kind == "cancelled":
            self._finish(entry)
            log_event(
                logging.INFO,
                "cancelled",
                client=client_label(client),
                id=rid,
                reason=entry.cancel_reason,
            )
            if not entry.gone:
                self._error(client, rid, "cancelled", entry.cancel_reason)
        elif kind == "failed":
            self._finish(entry)
            err = entry.job.error
            from sdkit.request import RequestError

            if isinstance(err, RequestError):
                code, message, fld = "bad_field", err.message, f"request.{err.field}"
            else:
                code, message, fld = "failed", f"{type(err).__name__}: {err}", None
            log_event(
                logging.WARNING, "failed", client=client_label(client), id=rid, message=message
            )
            if not entry.gone:
                self._error(client, rid, code, message, fld)

    def _probe(self) -> None:
        """``queued`` updates: tell waiting clients where they stand, and find vanished ones."""
        for entry in self._clients.entries():
            if entry.finished or entry.gone or entry.job.state != "queued":
                continue
            position = self._position(entry)
            entry.last_position = position
            self._send(
                entry.client,
                P.event_frames("queued", entry.rid, position=position),
                essential=False,
            )


def _takes_callback(engine: Any) -> bool:
    import inspect

    try:
        return "callback" in inspect.signature(engine.submit).parameters
    except (TypeError, ValueError):
        return False


def _version() -> str:
    try:
        import sdkit

        return sdkit.__version__
    except Exception:  # noqa: BLE001
        return "0"


# ---------------------------------------------------------------------------- serve()


class ServerHandle:
    """What `serve` returns: ``.address`` to connect to, ``.stop()`` to end it."""

    def __init__(self, server: Server):
        self.server = server

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def running(self) -> bool:
        return self.server.running

    def stop(self, timeout: float = 10.0, *, notify: bool = True) -> None:
        self.server.stop(timeout, notify=notify)

    def join(self, timeout: float | None = None) -> None:
        if self.server._thread is not None:
            self.server._thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<sdkit.bridge.ServerHandle {self.address} {state}>"


def serve(
    engine: Any = None,
    bind: str = DEFAULT_BIND,
    *,
    keys: str | Any | None = None,
    limits: P.Limits | None = None,
    models: Mapping[str, Any] | None = None,
    **options: Any,
) -> ServerHandle:
    """Serve ``engine`` (default: `sdkit.load()`) in a background thread; returns a handle.

    In a notebook this shares the widget's engine with Krita/GIMP: bridge jobs queue on the
    same worker.  ``bind`` defaults to loopback; any other address needs ``keys`` (a folder
    made by `sdkit keys`), else `security.SecurityError`.  Use port ``*`` or ``0`` for a
    free port and read ``handle.address``.
    """
    if engine is None:
        import sdkit

        engine = sdkit.load()
    if bind.endswith(":0"):
        bind = bind[:-2] + ":*"
    server = Server(engine, bind=bind, keys=keys, limits=limits, models=models, **options)
    server.start()
    return ServerHandle(server)
