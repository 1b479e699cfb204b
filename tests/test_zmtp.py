"""The standard-library ZMTP client against a real libzmq ROUTER (pyzmq)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq
from sdkit.bridge.zmtp import Dealer, ZmtpError, parse_address


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
        end = time.monotonic() + 5
        while "CURVE" not in (d.last_error or "") and time.monotonic() < end:
            d.poll(0.05)
        assert "CURVE" in d.last_error and "pyzmq" in d.last_error
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
