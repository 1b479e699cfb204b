"""Several engines behind one endpoint: ZeroMQ's proxy pattern, ROUTER front, DEALER back.

Clients connect to the front ROUTER exactly as to a single server.  Workers (`sdkit
worker --connect BACK`, each a `Server` in worker mode with its own engine, in other
processes or on other machines) connect DEALER sockets to the back DEALER, which spreads
requests round-robin; replies keep the client's routing id as their first frame, so the
front ROUTER delivers every result to the client that asked.

Two things a plain `zmq.proxy` cannot do are added in the forwarding loop: ``cancel`` and
``bye`` go to every worker (only the one running the request acts), and a client that
has vanished (the front send fails with EHOSTUNREACH) makes the broker send a ``bye`` in
that client's name, so its queued jobs do not hold any worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket as pysocket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

import zmq
from sdkit.bridge import protocol as P
from sdkit.bridge import security
from sdkit.bridge.logs import client_label as _client_label
from sdkit.bridge.logs import log_event as _log
from sdkit.bridge.server import DEFAULT_BIND

log = logging.getLogger("sdkit.bridge")

_BROADCAST_OPS = ("cancel", "bye")


class Broker:
    """The proxy in front of the workers; `start` binds both ends and forwards in a thread."""

    def __init__(
        self,
        front: str = DEFAULT_BIND,
        back: str = "tcp://127.0.0.1:*",
        *,
        keys: str | Any | None = None,
        limits: P.Limits | None = None,
        heartbeat_ivl: float = 2.0,
        heartbeat_timeout: float = 30.0,
    ):
        if keys is not None and not isinstance(keys, security.ServerKeys):
            keys = security.load_server_keys(keys)
        self.keys = keys
        self.front_bind, self.back_bind = front, back
        self.limits = limits or P.Limits()
        self.heartbeat_ivl, self.heartbeat_timeout = heartbeat_ivl, heartbeat_timeout
        self.context = zmq.Context()
        self.front_address: str | None = None
        self.back_address: str | None = None
        self.workers = 0
        self.forwarded = 0
        self._auth: security.Authenticator | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = pysocket.socketpair()

    @property
    def address(self) -> str | None:
        return self.front_address

    def start(self) -> Broker:
        security.check_bind(self.front_bind, self.keys)
        security.check_bind(self.back_bind, self.keys)
        ctx = self.context
        if self.keys is not None:
            self._auth = security.start_authenticator(ctx, self.keys)
        front = ctx.socket(zmq.ROUTER)
        front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # issue 13.6/13.9 (guard): no takeover of a connected client's routing id,
        # handshake timeout, fd limit (identities are not forwarded to the workers)
        front.setsockopt(zmq.ROUTER_HANDOVER, 0)
        security.raise_fd_limit()
        back = ctx.socket(zmq.DEALER)
        for s in (front, back):
            s.linger = 0
            s.sndhwm = s.rcvhwm = 10_000
            s.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
            s.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_ivl * 1000))
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_timeout * 1000))
            s.setsockopt(zmq.HANDSHAKE_IVL, 5000)
            if self.keys is not None:
                security.apply_server(s, self.keys)
        self._monitor = back.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        front.bind(self.front_bind)
        back.bind(self.back_bind)
        self.front_address = front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back_address = back.getsockopt_string(zmq.LAST_ENDPOINT)
        self._front, self._back = front, back
        self._thread = threading.Thread(target=self._run, name="sdkit-broker", daemon=True)
        self._thread.start()
        _log(logging.INFO, "broker", front=self.front_address, back=self.back_address)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        front, back, mon = self._front, self._back, self._monitor
        poller = zmq.Poller()
        for s in (front, back, mon, self._wake_r):
            poller.register(s, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(1000))
                if mon in ready:
                    while True:
                        try:
                            ev = recv_monitor_message(mon, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                            self.workers += 1
                        elif ev["event"] == zmq.EVENT_DISCONNECTED:
                            self.workers = max(0, self.workers - 1)
                if front in ready:
                    for _ in range(1000):
                        try:
                            frames = front.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._from_client(frames)
                if back in ready:
                    for _ in range(1000):
                        try:
                            frames = back.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._from_worker(frames)
        except Exception:  # noqa: BLE001
            log.exception("broker loop crashed")
        finally:
            for s in (front, back, mon):
                s.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._wake_r.close()
            self._wake_w.close()
            self.context.term()

    def _op(self, header: Any) -> str | None:
        raw = header.bytes if hasattr(header, "bytes") else bytes(header)
        if len(raw) > 4096 or not any(f'"{op}"'.encode() in raw for op in _BROADCAST_OPS):
            return None
        try:
            op = json.loads(raw).get("op")
        except (ValueError, AttributeError, RecursionError):
            return None
        return op if op in _BROADCAST_OPS else None

    def _from_client(self, frames: Sequence[Any]) -> None:
        if len(frames) < 2:
            return
        if self._op(frames[1]) is not None:
            self._broadcast(frames)
            return
        try:
            self._back.send_multipart(frames, zmq.NOBLOCK, copy=False)
            self.forwarded += 1
        except zmq.Again:
            self._reply_unavailable(frames)

    def _broadcast(self, frames: Sequence[Any]) -> None:
        """DEALER round-robins, so n consecutive copies reach each of n workers once."""
        data = [f.bytes if hasattr(f, "bytes") else bytes(f) for f in frames]
        for _ in range(max(1, self.workers)):
            try:
                self._back.send_multipart(data, zmq.NOBLOCK)
            except zmq.Again:
                break

    def _reply_unavailable(self, frames: Sequence[Any]) -> None:
        try:
            rid = json.loads(
                bytes(frames[1].buffer if hasattr(frames[1], "buffer") else frames[1])
            ).get("id")
        except Exception:  # noqa: BLE001
            rid = None
        rid = rid if isinstance(rid, str) else None
        self._to_client([frames[0], *P.error_frames(rid, "unavailable", "no worker is connected")])

    def _from_worker(self, frames: Sequence[Any]) -> None:
        if len(frames) >= 2:
            self._to_client(frames)

    def _to_client(self, frames: Sequence[Any]) -> None:
        client = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
        try:
            self._front.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # a client that does not read loses events rather than stalling everyone
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            _log(logging.WARNING, "client_gone", client=_client_label(client))
            bye = P.request_frames("bye", "broker-client-gone")
            self._broadcast([client, *bye])


# ---------------------------------------------------------------------------- workers


def worker_command(connect: str, model: str | None = None, keys: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "sdkit.bridge.cli", "worker", "--connect", connect]
    if model:
        cmd += ["--model", str(model)]
    if keys:
        cmd += ["--keys", str(keys)]
    return cmd


def spawn_workers(
    n: int, connect: str, model: str | None = None, keys: str | None = None, **popen: Any
) -> list[subprocess.Popen]:
    """Start ``n`` worker processes (``sdkit worker --connect ...``) on this machine."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return [
        subprocess.Popen(worker_command(connect, model, keys), env=env, **popen) for _ in range(n)
    ]


def stop_workers(procs: Sequence[subprocess.Popen], timeout: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
