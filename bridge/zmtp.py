"""A ZMTP 3.1 DEALER over plain sockets: the standard-library way to talk to the bridge.

Editors ship their own Python, usually without pyzmq, so the plug-ins speak the wire
protocol themselves (https://rfc.zeromq.org/spec/37/, ZMTP 3.1) to the server's libzmq
ROUTER.  Only what a DEALER client needs is here: the greeting, the NULL security
mechanism, the READY handshake (Socket-Type DEALER and an Identity), short and long
frames with the MORE flag, multipart messages, PING/PONG heartbeats, and reconnection.
(CURVE needs elliptic-curve crypto the standard library lacks: use pyzmq for remote,
encrypted servers.)

Everything is non-blocking underneath; `Dealer.poll(timeout)` does the I/O for at most
``timeout`` seconds and returns the messages that arrived, so a GUI timer can pump it.
Like libzmq, it connects lazily, reconnects by itself with a growing back-off, and queues
messages sent while disconnected until a connection is up; a message that was being
written when a connection dropped is lost, and `Dealer.epoch` counts such drops so that a
caller knows which requests can no longer be answered.

It runs inside editors and must never take them down: every write is SIGPIPE-safe (Krita's
Python leaves SIGPIPE at its default action, which kills Krita), and incoming messages are
capped in parts and bytes.  A protocol failure (not ZMTP, a mechanism we lack, an ERROR
command, a wrong socket type, a message over the caps) drops the connection and is raised
once from `poll` as a `ZmtpError` naming the cause (kept in `Dealer.error`).

One file (~480 lines) on purpose: the plug-ins copy it next to themselves
(`plugins.SHARED_MODULES`); the framing helpers above `Dealer` are the seam to split at.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence

__all__ = ["MSG_NOSIGNAL", "Dealer", "ZmtpError", "parse_address"]

MORE, LONG, COMMAND = 0x01, 0x02, 0x04
_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
_GREETING = _SIGNATURE + bytes([3, 1]) + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
_PENDING_CONNECT = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, 10035}
_CHUNK = 1 << 18
_READS_PER_IO = 16  # 4 MiB per select(): a flood cannot hold `poll` far past its timeout
_MAX_WIRE_FOR_PONG = 64  # chunks; a peer that PINGs and never reads cannot grow our queue
DEFAULT_MAX_PARTS = 1024  # per incoming message, until `set_limits` says otherwise
DEFAULT_MAX_BYTES = 256 * 2**20
# SIGPIPE-safe writes: MSG_NOSIGNAL on each send (Linux, BSD); macOS lacks it and takes
# SO_NOSIGPIPE on the socket instead (not in Python's socket module: <sys/socket.h> value);
# Windows has no SIGPIPE (flag 0, no option).
MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
SO_NOSIGPIPE = getattr(socket, "SO_NOSIGPIPE", 0x1022 if sys.platform == "darwin" else None)


class ZmtpError(OSError):
    """The peer broke the protocol (or refused us); the connection is dropped."""


def parse_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port); IPv6 hosts in brackets."""
    if not address.startswith("tcp://"):
        raise ValueError(f"only tcp:// addresses are supported, got {address!r}")
    rest = address[len("tcp://") :]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} needs a port: tcp://host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host in ("", "*"):
        raise ValueError(f"address {address!r} needs a host to connect to")
    return host, int(port)


def frame_bytes(body: bytes | bytearray | memoryview, flags: int) -> list[bytes | memoryview]:
    """A frame as the chunks to write: the flags/size header, then the body uncopied."""
    view = memoryview(body).cast("B")
    size = len(view)
    if size > 255:
        return [struct.pack(">BQ", flags | LONG, size), view]
    return [struct.pack(">BB", flags, size), view]


def command_body(name: bytes, data: bytes = b"") -> bytes:
    return bytes([len(name)]) + name + data


def ready_properties(props: dict[bytes, bytes]) -> bytes:
    out = bytearray()
    for k, v in props.items():
        out += bytes([len(k)]) + k + struct.pack(">I", len(v)) + v
    return bytes(out)


def parse_properties(data: bytes) -> dict[str, bytes]:
    props, i = {}, 0
    while i < len(data):
        n = data[i]
        name = data[i + 1 : i + 1 + n]
        i += 1 + n
        if i + 4 > len(data):
            raise ZmtpError("truncated READY property")
        (vlen,) = struct.unpack(">I", data[i : i + 4])
        i += 4
        if i + vlen > len(data):
            raise ZmtpError("truncated READY property value")
        props[name.decode("ascii", "replace").lower()] = data[i : i + vlen]
        i += vlen
    return props


class Dealer:
    """One ZMTP DEALER connection to a ROUTER, with reconnects; not thread-safe."""

    def __init__(
        self,
        address: str,
        *,
        identity: bytes | None = None,
        reconnect_ivl: float = 0.1,
        reconnect_ivl_max: float = 2.0,
        heartbeat_ivl: float = 1.0,
        heartbeat_timeout: float = 5.0,
        max_parts: int = DEFAULT_MAX_PARTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.address = address
        self.host, self.port = parse_address(address)
        if identity is not None and not 0 < len(identity) <= 255:
            raise ValueError("identity must be 1..255 bytes")
        if identity is not None and identity[:1] == b"\x00":
            raise ValueError("identity must not start with a zero byte (reserved by libzmq)")
        self.identity = identity or b""
        self.reconnect_ivl = reconnect_ivl
        self.reconnect_ivl_max = reconnect_ivl_max
        self.heartbeat_ivl = heartbeat_ivl
        self.heartbeat_timeout = heartbeat_timeout
        self.max_parts = self.max_bytes = 0
        self.set_limits(max_parts, max_bytes)
        self.epoch = 0  # +1 each time an established (READY) connection is lost
        self.state = "disconnected"  # connecting | greeting | ready | closed
        self.last_error: str | None = None  # why the last connection (attempt) ended
        self.error: ZmtpError | None = None  # the last protocol failure, until READY again
        self._unreported: ZmtpError | None = None  # raised by the next poll
        self._sock: socket.socket | None = None
        self._next_attempt = 0.0
        self._backoff = reconnect_ivl
        self._rbuf = bytearray()
        self._wire: deque[bytes | memoryview] = deque()  # chunks for the current connection
        self._queue: deque[list[bytes | bytearray | memoryview]] = (
            deque()
        )  # messages waiting for a READY connection
        self._inbox: deque[list[bytes]] = deque()
        self._parts: list[bytes] = []
        self._part_bytes = 0
        self._last_recv = self._last_send = self._last_ping = 0.0

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        return self.state == "ready"

    def set_limits(self, max_parts: int | None = None, max_bytes: int | None = None) -> None:
        """Cap incoming messages (e.g. from the server's ``hello``); None keeps a cap."""
        for name, value in (("max_parts", max_parts), ("max_bytes", max_bytes)):
            if value is not None:
                if int(value) < 1:
                    raise ValueError(f"{name} must be at least 1, got {value!r}")
                setattr(self, name, int(value))

    def send_multipart(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        """Queue one message; it is written during `poll` (or now, as far as it fits)."""
        if self.state == "closed":
            raise ZmtpError("the dealer is closed")
        if not frames:
            raise ValueError("a message needs at least one frame")
        self._queue.append(list(frames))
        if self.state == "ready":
            self._move_queue()
            self._flush()
        else:
            self._pump(0.0, stop_on_message=False)  # start connecting now

    def poll(self, timeout: float = 0.0) -> list[list[bytes]]:
        """Do I/O for up to ``timeout`` s, returning early once messages arrived (see above)."""
        self._pump(timeout)
        out = list(self._inbox)
        self._inbox.clear()
        if not out:
            self._raise_failure()
        return out

    def recv_multipart(self, timeout: float | None = None) -> list[bytes]:
        """Block (up to ``timeout``) for one message; `TimeoutError` if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message from {self.address} within {timeout} s")
            self._pump(min(left, 1.0))
            if not self._inbox:
                self._raise_failure()
        return self._inbox.popleft()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued is written; False if that took longer than allowed."""
        deadline = time.monotonic() + timeout
        while (self._queue or self._wire) and time.monotonic() < deadline and not self._unreported:
            self._pump(min(0.05, max(0.0, deadline - time.monotonic())), stop_on_message=False)
        return not (self._queue or self._wire)

    def close(self) -> None:
        self._drop(reason="closed", lost=False)
        self.state = "closed"

    def _raise_failure(self) -> None:
        err, self._unreported = self._unreported, None
        if err is not None:
            raise err

    def __enter__(self) -> Dealer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ connection

    def _connect(self) -> None:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as e:
            self._fail(f"cannot resolve {self.host!r}: {e}")
            return
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if SO_NOSIGPIPE is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_NOSIGPIPE, 1)
        err = sock.connect_ex(addr)
        if err not in (0, *_PENDING_CONNECT):
            sock.close()
            self._fail(f"connect to {self.address} failed: {os.strerror(err)}")
            return
        self._sock = sock
        self.state = "connecting"
        self._rbuf.clear()
        self._wire.clear()
        self._parts, self._part_bytes = [], 0
        self._last_recv = self._last_send = self._last_ping = time.monotonic()

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.reconnect_ivl_max)

    def _drop(self, reason: str, lost: bool = True) -> None:
        was_ready = self.state == "ready"
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._rbuf.clear()
        self._wire.clear()
        self._parts, self._part_bytes = [], 0
        if self.state != "closed":
            self.state = "disconnected"
        if was_ready and lost:
            self.epoch += 1
            self._backoff = self.reconnect_ivl
        self._fail(reason)

    def _start_handshake(self) -> None:
        # Signature and major version first: libzmq then sends its whole greeting, so we
        # learn its mechanism (and can say "needs CURVE") before it hangs up on ours.
        self.state = "greeting"
        self._wire.append(memoryview(_GREETING)[:11])

    def _ready_command(self) -> list[memoryview | bytes]:
        props = {b"Socket-Type": b"DEALER", b"Identity": self.identity}
        return frame_bytes(command_body(b"READY", ready_properties(props)), COMMAND)

    def _move_queue(self) -> None:
        while self._queue:
            frames = self._queue.popleft()
            last = len(frames) - 1
            for i, f in enumerate(frames):
                self._wire.extend(frame_bytes(f, MORE if i < last else 0))

    # ------------------------------------------------------------------ I/O

    def _pump(self, timeout: float, stop_on_message: bool = True) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            now = time.monotonic()
            if self.state == "closed" or self._unreported is not None:
                return
            if self._sock is None and now >= self._next_attempt:
                self._connect()
            self._timers(now)
            if stop_on_message and self._inbox:
                return
            wait = deadline - now
            if self._sock is None:
                wait = min(wait, max(0.0, self._next_attempt - now))
            elif self.state == "ready" and self.heartbeat_ivl:
                wait = min(wait, self.heartbeat_ivl / 2)
            wait = max(0.0, wait)
            if self._sock is not None:
                self._io(wait)
            elif wait > 0:
                time.sleep(wait)
            if (stop_on_message and self._inbox) or time.monotonic() >= deadline:
                return

    def _io(self, wait: float) -> None:
        sock = self._sock
        if sock is None:
            return
        want_write = self.state == "connecting" or bool(self._wire)
        try:
            r, w, x = select.select([sock], [sock] if want_write else [], [sock], wait)
        except (OSError, ValueError) as e:
            self._drop(f"select failed: {e}")
            return
        try:
            if self.state == "connecting" and (w or x):
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._drop(f"connect to {self.address} failed: {os.strerror(err)}")
                    return
                self._start_handshake()
                w = [sock]
            if w and self._wire:
                self._flush()
            if r and self._sock is sock:
                self._read()
        except ZmtpError as e:
            self._drop(str(e))
            self.error = self._unreported = e
        except OSError as e:
            self._drop(f"connection to {self.address} lost: {e}")

    def _flush(self) -> None:
        sock = self._sock
        while self._wire and sock is not None:
            chunk = self._wire[0]
            try:
                n = sock.send(chunk, MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop(f"send to {self.address} failed: {e}")
                return
            self._last_send = time.monotonic()
            if n < len(chunk):
                self._wire[0] = chunk[n:]
                return
            self._wire.popleft()

    def _read(self) -> None:
        for _ in range(_READS_PER_IO):
            if self._sock is None:
                return
            try:
                data = self._sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self._drop(f"the server at {self.address} closed the connection")
                return
            self._rbuf += data
            self._last_recv = time.monotonic()
            self._parse()
            if len(data) < _CHUNK:
                return

    def _parse(self) -> None:
        buf = self._rbuf
        if self.state == "greeting":
            if len(buf) >= 1 and buf[0] != 0xFF:
                raise ZmtpError("the peer is not a ZMTP 3 endpoint (bad signature)")
            if len(buf) < 64:
                return
            if buf[9] != 0x7F or buf[10] < 3:
                raise ZmtpError(f"the peer speaks ZMTP {buf[10]}.x; 3.x is needed")
            mechanism = bytes(buf[12:32]).rstrip(b"\x00")
            if mechanism != b"NULL":
                raise ZmtpError(
                    f"the server wants the {mechanism.decode(errors='replace')} security "
                    "mechanism; this standard-library client speaks NULL only (use pyzmq)"
                )
            del buf[:64]
            self.state = "handshake"
            self._wire.append(memoryview(_GREETING)[11:])
            self._wire.extend(self._ready_command())
            self._flush()
        while True:
            if len(buf) < 2:
                return
            flags = buf[0]
            if flags & LONG:
                if len(buf) < 9:
                    return
                (size,) = struct.unpack_from(">Q", buf, 1)
                start = 9
            else:
                size, start = buf[1], 2
            self._check_caps(flags, size)
            if len(buf) < start + size:
                return
            body = bytes(buf[start : start + size])
            del buf[: start + size]
            if flags & COMMAND:
                self._command(body)
            elif self.state != "ready":
                raise ZmtpError("message frame before the READY handshake finished")
            else:
                self._parts.append(body)
                self._part_bytes += size
                if not flags & MORE:
                    self._inbox.append(self._parts)
                    self._parts, self._part_bytes = [], 0

    def _check_caps(self, flags: int, size: int) -> None:
        """Refuse a frame before its body is buffered if it would break the caps."""
        total = size if flags & COMMAND else self._part_bytes + size
        if total > self.max_bytes:
            over = f"a message over {self.max_bytes} bytes"
        elif not flags & COMMAND and len(self._parts) >= self.max_parts:
            over = f"a message of more than {self.max_parts} parts"
        else:
            return
        raise ZmtpError(f"the server at {self.address} sent {over}; connection dropped")

    def _command(self, body: bytes) -> None:
        if not body:
            raise ZmtpError("empty command frame")
        n = body[0]
        name, data = body[1 : 1 + n], body[1 + n :]
        if name == b"READY":
            props = parse_properties(data)
            kind = props.get("socket-type", b"")
            if kind not in (b"ROUTER", b"DEALER"):
                raise ZmtpError(f"a DEALER cannot talk to a {kind.decode(errors='replace')} socket")
            self.state = "ready"
            self._backoff = self.reconnect_ivl
            self.last_error = self.error = None
            self._move_queue()
            self._flush()
        elif name == b"ERROR":
            reason = data[1 : 1 + data[0]].decode(errors="replace") if data else ""
            raise ZmtpError(f"the server refused the handshake: {reason}")
        elif name == b"PING" and len(self._wire) < _MAX_WIRE_FOR_PONG:
            context = data[2:18]
            self._wire.extend(frame_bytes(command_body(b"PONG", context), COMMAND))
            self._flush()
        # PONG and unknown commands only prove the peer is alive (_last_recv was updated).

    def _timers(self, now: float) -> None:
        if self.state != "ready" or self._sock is None:
            if self._sock is not None and now - self._last_recv > max(self.heartbeat_timeout, 5):
                self._drop(f"handshake with {self.address} timed out")
            return
        # Writing a large message counts as progress: the PONG waits behind it.
        alive = max(self._last_recv, self._last_send) if self._wire else self._last_recv
        if self.heartbeat_timeout and now - alive > self.heartbeat_timeout:
            self._drop(f"no traffic from {self.address} for {self.heartbeat_timeout} s")
            return
        if (
            self.heartbeat_ivl
            and now - self._last_recv > self.heartbeat_ivl
            and now - self._last_ping > self.heartbeat_ivl
        ):
            # TTL 0: the server applies its own timeout; we only want a PONG back.
            self._last_ping = now
            self._wire.extend(frame_bytes(command_body(b"PING", b"\x00\x00"), COMMAND))
            self._flush()
