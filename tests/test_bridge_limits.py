"""Issue 13, findings 5 and 9: what a client can make the server hold is bounded.

5: clients that came once and left are forgotten; a client that sends but never reads
   cannot grow the server's queue of replies waiting for its send buffer.
9: idle TCP connections that never finish a handshake cannot use up the server's file
   descriptors and lock out an authorized client.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

zmq = pytest.importorskip("zmq")

from sdkit.bridge import Client, protocol, serve  # noqa: E402
from sdkit.bridge.security import create_keys, load_client_keys  # noqa: E402


@pytest.fixture(scope="module")
def bridge_engine():
    import sdkit

    return sdkit.load(os.environ.get("SDKIT_TEST_MODEL") or None)


def rss_mb(pid: int | None = None) -> float:
    """Resident set size in MiB (Linux /proc)."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _wait(cond, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


# ---------------------------------------------------------------------------- finding 5


def test_clients_that_pinged_once_and_left_are_forgotten(bridge_engine):
    handle = serve(bridge_engine, "tcp://127.0.0.1:0", client_expiry=1.0, probe_interval=0.2)
    try:
        with Client(handle.address, timeout=60) as watcher:
            baseline = watcher.status()["clients"]
            ctx = zmq.Context()
            try:
                for i in range(300):
                    s = ctx.socket(zmq.DEALER)
                    s.linger = 0
                    s.routing_id = f"once-{i}".encode()
                    s.connect(handle.address)
                    s.send_multipart(protocol.request_frames("ping", "p"))
                    assert s.poll(30_000), "no pong"
                    s.recv_multipart()
                    s.close(0)
            finally:
                ctx.term()
            peak = watcher.status()["clients"]
            assert peak >= baseline + 100  # they were counted while fresh
            waited = _wait(
                lambda: watcher.status()["clients"] <= baseline,
                30,
                f"status.clients to fall from {peak} back to {baseline}",
            )
            print(f"clients {baseline} -> {peak} -> {baseline} after {waited:.1f} s")
    finally:
        handle.stop()


def test_a_client_that_never_reads_cannot_grow_the_server(bridge_engine):
    handle = serve(bridge_engine, "tcp://127.0.0.1:0")
    server = handle.server
    ctx = zmq.Context()
    flooder = ctx.socket(zmq.DEALER)
    flooder.linger = 0
    flooder.rcvhwm = 1
    flooder.sndhwm = 0
    flooder.routing_id = b"flooder"
    flooder.connect(handle.address)
    try:
        before = rss_mb()
        n = 60_000
        sent, peak_deferred = 0, 0
        ping = protocol.request_frames("ping", "p", data="x" * 200)
        while sent < n:
            for _ in range(2000):
                flooder.send_multipart(ping)
            sent += 2000
            time.sleep(0.01)
            peak_deferred = max(peak_deferred, server._clients.deferred_count())
        _wait(lambda: server.stats["messages"] >= n, 120, "the server to read the flood")
        peak_deferred = max(peak_deferred, server._clients.deferred_count())
        grown = rss_mb() - before
        print(f"flood of {n} pings: deferred peak {peak_deferred}, RSS +{grown:.0f} MiB")
        assert peak_deferred <= server._clients.max_deferred
        assert server._clients.dropped >= 1  # the flooder was dropped, its replies discarded
        assert grown < 100
        with Client(handle.address, timeout=60) as other:  # everyone else is still served
            assert other.ping() > 0
    finally:
        flooder.close(0)
        ctx.term()
        handle.stop()


# ---------------------------------------------------------------------------- finding 9

_SERVER = r"""
import resource, sys
soft, hard = (int(x) for x in sys.argv[3:5])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
import sdkit
from sdkit.bridge import serve
kw = {} if sys.argv[2] == "default" else {"handshake_ivl": float(sys.argv[2])}
h = serve(sdkit.load(), "tcp://127.0.0.1:0", keys=sys.argv[1], **kw)
print(h.address, resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
sys.stdin.read()
h.stop()
"""


def _idle_connections(port: int, n: int) -> list[socket.socket]:
    """``n`` TCP connections that never send a byte (non-blocking: some stay in SYN)."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        out.append(s)
    return out


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _ping_time(address: str, keys, limit: float) -> float:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    from sdkit.bridge import security

    security.apply_client(s, keys)
    start = time.monotonic()
    s.connect(address)
    s.send_multipart(protocol.request_frames("ping", "p"))
    try:
        if not s.poll(int(limit * 1000)):
            return float("inf")
        ev = protocol.decode_event(s.recv_multipart())
        assert ev.event == "pong"
        return time.monotonic() - start
    finally:
        s.close(0)
        ctx.term()


@pytest.mark.parametrize(
    "handshake,soft,hard,bound",
    [
        ("1.0", 1024, 1024, 15.0),  # fd limit cannot rise: the handshake timeout frees them
        ("default", 1024, 8192, 5.0),  # the server raises its soft fd limit to the hard one
    ],
)
def test_idle_connections_do_not_lock_out_an_authorized_client(
    tmp_path, handshake, soft, hard, bound
):
    keys = tmp_path / "keys"
    create_keys(keys, "alice")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(keys), handshake, str(soft), str(hard)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    idle: list[socket.socket] = []
    try:
        address, nofile = proc.stdout.readline().split()
        port = int(address.rsplit(":", 1)[1])
        # Keep opening idle connections (at most 3000) until the server holds (nearly) all
        # the descriptors it may, or 15 s have passed (a short handshake timeout keeps it
        # below that).
        idle = _idle_connections(port, 1000)
        peak, deadline = 0, time.monotonic() + 15
        while peak < min(int(nofile), 1500) - 8 and time.monotonic() < deadline:
            if len(idle) < 3000:
                idle += _idle_connections(port, 100)
            time.sleep(0.2)
            peak = max(peak, _open_fds(proc.pid))
        took = _ping_time(address, load_client_keys(keys, "alice"), 60)
        print(
            f"{len(idle)} idle connections, fd limit {nofile}, server fds {peak}: ping {took:.2f} s"
        )
        assert took < bound
    finally:
        for s in idle:
            s.close()
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
