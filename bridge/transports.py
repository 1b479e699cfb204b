"""The two transports under `sdkit.bridge.Client`: pyzmq's DEALER, or the stdlib `zmtp.Dealer`.

Both give `tracker.Session` what it needs: ``send_multipart``, ``poll`` and an ``epoch``
that counts lost connections (pyzmq's from a monitor socket).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sdkit.bridge import zmtp


def open_transport(
    address: str,
    identity: bytes,
    kind: str = "auto",
    *,
    keys: str | Path | None = None,
    client_name: str = "client",
    heartbeat_ivl: float = 1.0,
    heartbeat_timeout: float = 10.0,
) -> tuple[str, Any]:
    """(the kind chosen, a connected transport): "auto" takes pyzmq when importable.

    ``keys`` is a folder from `sdkit keys` (CURVE, pyzmq only), ``client_name`` the key
    pair in it.
    """
    if kind == "auto":
        try:
            import zmq  # noqa: F401

            kind = "zmq"
        except ImportError:
            kind = "zmtp"
    if kind == "zmq":
        client_keys = None
        if keys is not None:
            from sdkit.bridge import security

            client_keys = security.load_client_keys(keys, client_name)
        transport: Any = ZmqTransport(
            address,
            identity,
            keys=client_keys,
            heartbeat_ivl=heartbeat_ivl,
            heartbeat_timeout=heartbeat_timeout,
        )
    elif kind == "zmtp":
        if keys is not None:
            raise ValueError("CURVE keys need pyzmq: the standard-library client speaks NULL only")
        transport = ZmtpTransport(
            address,
            identity=identity,
            heartbeat_ivl=heartbeat_ivl,
            heartbeat_timeout=heartbeat_timeout,
        )
    else:
        raise ValueError(f"transport must be 'auto', 'zmq' or 'zmtp', got {kind!r}")
    return kind, transport


class ZmqTransport:
    """pyzmq DEALER with a monitor socket, so dropped connections bump ``epoch``.

    A dropped connection is replaced by a new socket under a fresh routing id: the server's
    ROUTER refuses handover (`security.secure_router`), so libzmq's own reconnect, which
    presents the old id, would be ignored until the server noticed the old connection gone.
    """

    name = "zmq"

    def __init__(
        self,
        address: str,
        identity: bytes,
        *,
        keys: Any | None = None,
        heartbeat_ivl: float = 1.0,
        heartbeat_timeout: float = 10.0,
    ):
        import zmq

        self._zmq = zmq
        self.context = zmq.Context()
        self.address = address
        self._keys = keys
        self._heartbeat = (heartbeat_ivl, heartbeat_timeout)
        self._epoch = 0
        self._open(identity)

    def _open(self, identity: bytes) -> None:
        zmq = self._zmq
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.routing_id = identity
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self._heartbeat[0] * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self._heartbeat[1] * 1000))
        sock.sndtimeo = 10_000
        if self._keys is not None:
            from sdkit.bridge import security

            security.apply_client(sock, self._keys)
        events = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
        self._monitor = sock.get_monitor_socket(events)
        sock.connect(self.address)
        self.sock = sock
        self.routing_id = identity
        self.connected = False
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _reopen(self) -> None:
        """The connection dropped: a new socket under a fresh id (what the old one still
        holds was sent in the lost connection's epoch, so its requests fail anyway)."""
        self._close_socket(linger=0)
        self._open(b"sdkit-" + uuid.uuid4().hex.encode())

    def send_multipart(self, frames) -> None:
        try:
            self.sock.send_multipart(frames, copy=len(frames) < 2)
        except self._zmq.Again:
            from sdkit.bridge.client import BridgeError  # (client.py imports this module)

            raise BridgeError("connection_lost", "the server is not accepting messages") from None

    def _monitor_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                ev = recv_monitor_message(self._monitor, self._zmq.NOBLOCK)
            except self._zmq.Again:
                return
            if ev["event"] == self._zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif ev["event"] == self._zmq.EVENT_DISCONNECTED and self.connected:
                self._epoch += 1
                self._reopen()  # the old monitor's later events are the old socket's
                return

    @property
    def epoch(self) -> int:
        """Connections lost so far; reads the monitor first, so a drop noticed while nobody
        polled (e.g. after a server's ``shutdown`` reply) never marks a later request lost."""
        self._monitor_events()
        return self._epoch

    def poll(self, timeout: float = 0.0) -> list[list[bytes]]:
        zmq = self._zmq
        out: list[list[bytes]] = []
        ready = dict(self._poller.poll(int(timeout * 1000)))
        if self.sock in ready:
            while True:
                try:
                    out.append(self.sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        if self._monitor in ready:  # after the messages: a result that arrived counts
            self._monitor_events()
        return out

    def _close_socket(self, linger: int) -> None:
        try:
            self.sock.disable_monitor()
        except Exception:  # noqa: BLE001
            pass
        self._monitor.close(0)
        self.sock.close(linger=linger)

    def close(self) -> None:
        self._close_socket(linger=500)  # let a last "bye" leave
        self.context.term()


class ZmtpTransport(zmtp.Dealer):
    """The stdlib `zmtp.Dealer`; like `ZmqTransport`, each new connection after a lost one
    presents a fresh routing id (the server ignores one it still holds)."""

    name = "zmtp"

    @property  # type: ignore[override]
    def epoch(self) -> int:
        """Connections lost so far; does the pending I/O first, so a drop that happened while
        nobody polled (e.g. after a server's ``shutdown`` reply) never marks a later request
        lost (the `Session` stamps each request with the epoch it was sent in)."""
        if self.state == "ready":
            self._pump(0.0, stop_on_message=False)
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if value != getattr(self, "_epoch", value):  # a connection was lost
            self.identity = b"sdkit-" + uuid.uuid4().hex.encode()
        self._epoch = value
