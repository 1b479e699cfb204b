"""The standard-library ZMTP client against a real libzmq ROUTER (pyzmq)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq
from sdkit.bridge import protocol as P
from sdkit.bridge import tracker
from sdkit.bridge.client import BridgeError, BridgeTimeout, Client
from sdkit.bridge.zmtp import MSG_NOSIGNAL, Dealer, ZmtpError, parse_address


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _router(ctx, port: int | None = None, **opts) -> tuple[zmq.Socket, int]:
    r = ctx.socket(zmq.ROUTER)
    r.linger = 0
    r.setsockopt(zmq.ROUTER_HANDOVER, 1)
    r.setsockopt(zmq.ROUTER_MANDATORY, 1)
    for k, v in opts.items():
        r.setsockopt(getattr(zmq, k), v)
    if port is None:
        port = r.bind_to_random_port("tcp://127.0.0.1")
    else:
        r.bind(f"tcp://127.0.0.1:{port}")
    return r, port


def _recv_while_pumping(router: zmq.Socket, dealer: Dealer, timeout: float = 10.0):
    """Receive on the router while the dealer's poll() writes (both live in this test)."""
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dealer.poll(0.005)
        if poller.poll(5):
            return router.recv_multipart()
    raise AssertionError("the router got nothing")


def _send_until_routable(router: zmq.Socket, dealer: Dealer, frames, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            router.send_multipart(frames)
            return
        except zmq.ZMQError:  # EHOSTUNREACH until the handshake finished
            if time.monotonic() > deadline:
                raise
            dealer.poll(0.02)


def test_parse_address():
    assert parse_address("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)
    assert parse_address("tcp://[::1]:7") == ("::1", 7)
    for bad in ("ipc:///tmp/x", "tcp://127.0.0.1", "tcp://*:5555", "127.0.0.1:5"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_identity_and_small_long_multipart_frames_both_ways(ctx):
    router, port = _router(ctx)
    with Dealer(f"tcp://127.0.0.1:{port}", identity=b"editor-1") as d:
        frames = [b"", b"s" * 255, b"l" * 256, b"x" * 70_000]
        d.send_multipart(frames)
        got = _recv_while_pumping(router, d)
        assert got[0] == b"editor-1"  # READY carried our Identity
        assert got[1:] == frames
        router.send_multipart([b"editor-1", b"a", b"b" * 300, b""])
        assert d.recv_multipart(timeout=5) == [b"a", b"b" * 300, b""]


def test_frames_over_16_mib_both_ways(ctx):
    router, port = _router(ctx)
    big = bytes(range(256)) * (17 * 4096)  # 17 MiB, with a pattern to catch reordering
    with Dealer(f"tcp://127.0.0.1:{port}", identity=b"big") as d:
        d.send_multipart([b"head", memoryview(big)])
        got = _recv_while_pumping(router, d, timeout=30)
        assert got[1] == b"head" and len(got[2]) == len(big) and got[2] == big
        router.send_multipart([b"big", big, b"tail"])
        back = d.recv_multipart(timeout=30)
        assert back[0] == big and back[1] == b"tail"


def test_many_messages_keep_order(ctx):
    router, port = _router(ctx)
    with Dealer(f"tcp://127.0.0.1:{port}", identity=b"order") as d:
        for i in range(500):
            d.send_multipart([str(i).encode(), b"p" * (i % 300)])
        assert d.flush(timeout=10)
        router.rcvtimeo = 5000
        got = [router.recv_multipart()[1] for _ in range(500)]
        assert got == [str(i).encode() for i in range(500)]
        for i in range(500):
            router.send_multipart([b"order", str(i).encode()])
        back = [d.recv_multipart(timeout=5)[0] for _ in range(500)]
        assert back == [str(i).encode() for i in range(500)]


def test_answers_server_heartbeats_and_stays_connected(ctx):
    # The ROUTER pings every 100 ms and drops peers silent for 500 ms: only PONGs keep us.
    router, port = _router(ctx, HEARTBEAT_IVL=100, HEARTBEAT_TIMEOUT=500)
    with Dealer(f"tcp://127.0.0.1:{port}", identity=b"hb", heartbeat_ivl=0.2) as d:
        d.send_multipart([b"hi"])
        _recv_while_pumping(router, d)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            d.poll(0.05)
        assert d.connected and d.epoch == 0
        router.send_multipart([b"hb", b"still here"])
        assert d.recv_multipart(timeout=5) == [b"still here"]


def test_reconnects_after_server_restart_and_counts_the_drop(ctx):
    router, port = _router(ctx)
    d = Dealer(f"tcp://127.0.0.1:{port}", identity=b"re", reconnect_ivl=0.05)
    try:
        d.send_multipart([b"one"])
        assert _recv_while_pumping(router, d)[1] == b"one"
        router.close(linger=0)
        end = time.monotonic() + 5
        while d.epoch == 0 and time.monotonic() < end:
            d.poll(0.05)
        assert d.epoch == 1 and not d.connected
        d.send_multipart([b"queued while down"])
        router2, _ = _router(ctx, port)
        assert _recv_while_pumping(router2, d)[1:] == [b"queued while down"]
        _send_until_routable(router2, d, [b"re", b"welcome back"])
        assert d.recv_multipart(timeout=5) == [b"welcome back"]
    finally:
        d.close()


def test_server_that_vanishes_without_closing_is_detected_by_heartbeat(ctx):
    # A plain TCP listener that completes the ZMTP greeting and then goes silent.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    conns = []

    def accept():
        c, _ = lsock.accept()
        conns.append(c)
        c.recv(64)
        c.sendall(
            b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 1]) + b"NULL".ljust(20, b"\0") + b"\0" * 32
        )
        body = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"ROUTER"
        c.sendall(bytes([0x04, len(body)]) + body)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    d = Dealer(f"tcp://127.0.0.1:{port}", heartbeat_ivl=0.1, heartbeat_timeout=0.5)
    try:
        end = time.monotonic() + 5
        while not d.connected and time.monotonic() < end:
            d.poll(0.05)
        assert d.connected
        end = time.monotonic() + 5
        while d.epoch == 0 and time.monotonic() < end:
            d.poll(0.05)
        assert d.epoch == 1 and "no traffic" in (d.last_error or "")
    finally:
        d.close()
        for c in conns:
            c.close()
        lsock.close()


def test_refuses_curve_servers_with_a_clear_reason(ctx):
    pub, sec = zmq.curve_keypair()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.curve_server = True
    router.curve_secretkey = sec
    router.curve_publickey = pub
    port = router.bind_to_random_port("tcp://127.0.0.1")
    with Dealer(f"tcp://127.0.0.1:{port}", reconnect_ivl=0.05) as d:
        d.send_multipart([b"x"])
        with pytest.raises(ZmtpError, match="CURVE.*pyzmq") as info:
            _poll_until_it_raises(d)
        assert d.error is info.value and "CURVE" in d.last_error
        assert not d.connected


def test_bad_peer_and_arguments():
    with pytest.raises(ValueError):
        Dealer("tcp://127.0.0.1:1", identity=b"\x00reserved")
    with pytest.raises(ValueError):
        Dealer("tcp://127.0.0.1:1", identity=b"x" * 256)
    d = Dealer("tcp://127.0.0.1:1")
    d.close()
    with pytest.raises(ZmtpError):
        d.send_multipart([b"x"])


def test_recv_timeout_when_nobody_listens():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a free port with no listener
    with Dealer(f"tcp://127.0.0.1:{port}", reconnect_ivl=0.05) as d:
        d.send_multipart([b"anyone?"])
        with pytest.raises(TimeoutError):
            d.recv_multipart(timeout=0.3)
        assert not d.connected and "failed" in (d.last_error or "")


# ---------------------------------------------------------------------------- hostile servers
# Plain TCP listeners in threads, each playing one scripted server to the first client.


def _greeting(mechanism: bytes = b"NULL") -> bytes:
    return b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 1]) + mechanism.ljust(20, b"\0") + b"\0" * 32


def _command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes([len(name)]) + name + data
    return bytes([0x04, len(body)]) + body


def _ready(socket_type: bytes) -> bytes:
    prop = b"\x0bSocket-Type" + len(socket_type).to_bytes(4, "big") + socket_type
    return _command(b"READY", prop)


class FakeServer:
    """Accepts one client and runs ``script(conn, server)``; ``hung_up`` once it is over."""

    def __init__(self, script):
        self.script = script
        self.sent = 0
        self.hung_up = threading.Event()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen()
        self.address = f"tcp://127.0.0.1:{self.lsock.getsockname()[1]}"
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except OSError:  # closed before any client came
            return
        try:
            self.script(conn, self)
            while conn.recv(1 << 16):  # until the client hangs up
                pass
        except OSError:  # reset by the client: what an endless message ends with
            pass
        finally:
            conn.close()
            self.hung_up.set()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data, MSG_NOSIGNAL)
        self.sent += len(data)

    def close(self) -> None:
        self.lsock.close()


def _not_zmtp(conn, srv):
    srv.send(conn, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def _curve(conn, srv):
    srv.send(conn, _greeting(b"CURVE"))


def _error_command(conn, srv):
    srv.send(conn, _greeting() + _command(b"ERROR", bytes([13]) + b"Access denied"))


def _pub(conn, srv):
    srv.send(conn, _greeting() + _ready(b"PUB"))


def _endless(frame: bytes):
    """A server whose message never ends: ``frame`` after ``frame``, each with MORE set."""
    if len(frame) > 255:
        head = bytes([0x01 | 0x02]) + len(frame).to_bytes(8, "big")
    else:
        head = bytes([0x01, len(frame)])
    burst = (head + frame) * max(1, 65536 // (len(head) + len(frame)))

    def script(conn, srv):
        srv.send(conn, _greeting() + _ready(b"ROUTER"))
        while True:
            srv.send(conn, burst)

    return script


def _poll_until_it_raises(d: Dealer, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        d.poll(0.05)
    raise AssertionError(f"no ZmtpError within {timeout} s (last_error: {d.last_error})")


FAILURES = {
    "bad signature": (_not_zmtp, "bad signature"),
    "mechanism mismatch": (_curve, "CURVE security mechanism.*NULL only"),
    "ERROR command": (_error_command, "refused the handshake: Access denied"),
    "PUB peer": (_pub, "cannot talk to a PUB socket"),
    "endless message": (_endless(b"x"), "more than 1024 parts"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_protocol_failures_reach_the_caller_with_their_cause(case):
    script, reason = FAILURES[case]
    srv = FakeServer(script)
    try:
        with Dealer(srv.address, reconnect_ivl=0.05) as d:
            d.send_multipart([b"hello?"])
            with pytest.raises(ZmtpError, match=reason) as info:
                _poll_until_it_raises(d)
            assert d.error is info.value and not d.connected
            assert srv.hung_up.wait(10)  # we dropped the connection ourselves
    finally:
        srv.close()


@pytest.mark.parametrize("case", FAILURES)
def test_the_client_raises_the_cause_not_a_timeout(case):
    script, reason = FAILURES[case]
    srv = FakeServer(script)
    try:
        with Client(srv.address, transport="zmtp") as c:
            with pytest.raises(BridgeError, match=reason) as info:
                c.hello(timeout=20)
        assert not isinstance(info.value, BridgeTimeout)
        assert info.value.code == "connection_lost"
        assert isinstance(info.value.__cause__, ZmtpError)
    finally:
        srv.close()


def test_an_endless_message_of_big_frames_stops_at_the_byte_cap():
    srv = FakeServer(_endless(b"b" * (1 << 20)))
    try:
        with Dealer(srv.address, max_bytes=8 << 20) as d:
            with pytest.raises(ZmtpError, match=f"over {8 << 20} bytes"):
                _poll_until_it_raises(d)
            assert srv.hung_up.wait(10)
            assert srv.sent < 64 << 20  # what the socket buffers took, not an endless rest
    finally:
        srv.close()


def test_set_limits_validates_and_applies():
    d = Dealer("tcp://127.0.0.1:1")
    assert (d.max_parts, d.max_bytes) == (1024, 256 << 20)  # safe defaults before hello
    d.set_limits(max_parts=3)
    assert (d.max_parts, d.max_bytes) == (3, 256 << 20)
    for bad in ({"max_parts": 0}, {"max_bytes": -1}):
        with pytest.raises(ValueError):
            d.set_limits(**bad)
    d.close()


def test_hello_limits_cap_what_the_server_may_send(ctx):
    # The session applies hello's limits: at most max_pixels rgba8 pixels and a header.
    router, port = _router(ctx)
    d = Dealer(f"tcp://127.0.0.1:{port}", identity=b"capped")
    session = tracker.Session(d)
    try:
        rid = session.hello()
        ident = _recv_while_pumping(router, d)[0]
        limits = {**P.Limits().to_dict(), "max_pixels": 1024}
        router.send_multipart([ident, *P.event_frames("hello", rid, versions=[1], limits=limits)])
        end = time.monotonic() + 10
        while session.limits is None and time.monotonic() < end:
            session.poll(0.05)
        assert d.max_bytes == 4 * 1024 + (16 << 20)
        router.send_multipart([ident, b"{}", bytes(17 << 20)])
        with pytest.raises(ZmtpError, match=f"over {d.max_bytes} bytes"):
            _poll_until_it_raises(d)
    finally:
        d.close()
