"""The bridge server: a ZeroMQ ROUTER in front of one or more `sdkit.Engine`s.

One thread owns the socket.  Engine events arrive on engine threads and model loads end on
a loader thread, so those only queue a note and write one byte to a wake-up socket pair
that the socket thread polls next to the ROUTER; only the socket thread ever touches zmq.
The ``generate`` op lives in `generate` (with `dispatch`, the fair queue, and `engines`,
the loader); clients in `clients`; logging in `logs`; pictures in `pictures`.

Clients are tracked by their ZeroMQ routing id.  ROUTER_MANDATORY turns a send to a
client that has gone (its TCP connection closed, or libzmq's heartbeat timed it out) into
an error, on which all of that client's jobs are cancelled; clients with queued jobs get a
``queued`` event every ``probe_interval`` seconds, so a vanished client is noticed before
its jobs reach the front of the queue.
"""

from __future__ import annotations

import logging
import socket as pysocket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq
from sdkit.bridge import protocol as P
from sdkit.bridge import security
from sdkit.bridge.clients import Clients
from sdkit.bridge.engines import Engines
from sdkit.bridge.generate import Jobs
from sdkit.bridge.inbound import decode_request
from sdkit.bridge.logs import client_label, log, log_event
from sdkit.bridge.ops import Ops

DEFAULT_BIND = "tcp://127.0.0.1:5555"


class Server(Ops):
    """Serve one engine (plus allowed models) on a ROUTER.

    The engine may be `ray_engines.RayEngines`, replicas on a Ray cluster with the same
    shape: the server cannot tell the difference.
    """

    def __init__(
        self,
        engine: Any,
        *,
        bind: str = DEFAULT_BIND,
        keys: str | Any | None = None,
        limits: P.Limits | None = None,
        models: Mapping[str, Any] | None = None,
        heartbeat_ivl: float = 2.0,
        heartbeat_timeout: float = 30.0,
        probe_interval: float = 2.0,
        context: zmq.Context | None = None,
        name: str | None = None,
        loader: Callable[[Any], Any] | None = None,
        handshake_ivl: float = 5.0,
        client_expiry: float = 60.0,
    ):
        self.engine = engine
        self.bind_address = bind
        self.limits = limits or P.Limits()
        self.heartbeat_ivl = heartbeat_ivl
        self.heartbeat_timeout = heartbeat_timeout
        self.probe_interval = probe_interval
        self.handshake_ivl = handshake_ivl  # s a connection may take to authenticate
        self.name = name  # hello's and accepted's ``worker``
        if isinstance(keys, str) or hasattr(keys, "__fspath__"):
            keys = security.load_server_keys(keys)  # type: ignore[arg-type]  # a PathLike
        self.keys = keys
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.address: str | None = None
        self._sock: zmq.Socket | None = None
        self._auth: Any = None
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._clients = Clients(expiry=client_expiry)
        self._stop = threading.Event()
        self._notify_on_stop = True
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self.stats = {"messages": 0, "errors": 0, "results": 0, "clients_gone": 0}
        self._jobs = Jobs(
            Engines(engine, models, lambda name: self._jobs.model_loaded(name), loader),
            self._clients,
            self.limits,
            self._send,
            self._wake,
            self.stats,
            self.name,
        )

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Server:
        """Bind now, so errors surface here, then serve in a daemon thread."""
        self._open()
        self._thread = threading.Thread(target=self._run, name="sdkit-bridge", daemon=True)
        self._thread.start()
        return self

    def _open(self) -> None:
        ctx = self.context
        security.check_bind(self.bind_address, self.keys)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # no handover, ZAP identities, handshake timeout, fd limit (issue 13.6, 13.9)
        self._auth = security.secure_router(sock, ctx, self.keys, self.handshake_ivl)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_ivl * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_timeout * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(self.heartbeat_timeout * 1000))
        sock.sndhwm = sock.rcvhwm = 10_000
        try:
            sock.bind(self.bind_address)
            self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            sock.close(0)
            self._close_auth()
            raise OSError(f"cannot bind {self.bind_address}: {e}") from e
        self._sock = sock
        log_event(
            logging.INFO,
            "serving",
            address=self.address,
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
        assert sock is not None  # opened by start()
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
                        try:
                            who = security.identity_of(frames[-1])
                            self._on_message([f.buffer for f in frames], who)
                        except Exception:  # noqa: BLE001 - one message, never the loop
                            log.exception("bridge failed on a message")
                self._jobs.drain()
                if self._clients.has_deferred:
                    self._clients.retry_deferred(self._send_again)
                if time.monotonic() >= next_probe:
                    self._jobs.probe()
                    self._clients.expire(time.monotonic())
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
                if entry.job is not None:
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
            if essential and not self._clients.defer(client, frames):
                self._client_gone(client)  # it does not read its replies (issue 13.5)
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
        for entry in list(state.entries.values()):
            entry.gone = True
            self._jobs.cancel(entry, "the client went away")

    # ------------------------------------------------------------------ messages

    def _on_message(self, frames: list[Any], identity: str | None = None) -> None:
        self.stats["messages"] += 1
        if len(frames) < 2:
            return  # a ROUTER always prefixes the routing id; nothing to answer
        client, body = bytes(frames[0]), frames[1:]
        try:
            msg = decode_request(body, self.limits)
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
        except Exception as e:  # noqa: BLE001 - a decoder bug must not stop the server
            log.exception("bridge could not decode a message")
            self._error(client, P.peek_id(body), "internal", f"{type(e).__name__}: {e}")
            return
        if self._clients.identity(client) not in (None, identity):
            # Another connection's routing id: the owner's has closed (no handover), so its
            # requests are cancelled and never reach this one (issue 13.6).
            self._client_gone(client)
        if msg.op != "bye":
            self._clients.touch(client, time.monotonic(), identity)
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


# ---------------------------------------------------------------------------- serve()


class ServerHandle:
    """What `serve` returns: ``.address`` to connect to, ``.stop()`` to end it."""

    def __init__(self, server: Server, owned: Any = None):
        self.server = server
        self._owned = owned  # engines serve() made itself (Ray replicas), closed by stop()

    @property
    def address(self) -> str:
        assert self.server.address is not None  # set by start(), before serve() returns
        return self.server.address

    @property
    def running(self) -> bool:
        return self.server.running

    def stop(self, timeout: float = 10.0, *, notify: bool = True) -> None:
        self.server.stop(timeout, notify=notify)
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()

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
    ray: str | None = None,
    replicas: int = 1,
    **options: Any,
) -> ServerHandle:
    """Serve ``engine`` (default: `sdkit.load()`) in a background thread; returns a handle.

    In a notebook this shares the widget's engine with Krita/GIMP: bridge jobs queue on the
    same worker.  ``bind`` defaults to loopback; any other address needs ``keys`` (a folder
    made by `sdkit keys`), else `security.SecurityError`.  Use port ``*`` or ``0`` for a
    free port and read ``handle.address``.

    ``ray`` ("auto": the running Ray cluster, else a new local one; or a cluster address)
    serves ``replicas`` copies of the model ``engine`` names (a spec; None: the embedded
    one) as Ray actors instead (`ray_engines`, ``pip install sdkit-studio[cluster]``);
    ``handle.stop()`` ends them.
    """
    owned = None
    if ray is not None:
        from sdkit.bridge.ray_engines import RayEngines

        engine = owned = RayEngines(engine, replicas, address=ray)
    elif engine is None:
        import sdkit

        engine = sdkit.load()
    if bind.endswith(":0"):
        bind = bind[:-2] + ":*"
    server = Server(engine, bind=bind, keys=keys, limits=limits, models=models, **options)
    try:
        server.start()
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    return ServerHandle(server, owned)
