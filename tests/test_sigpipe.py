"""The standard-library client survives its server being SIGKILLed at any moment (issue 12.9).

Krita's embedded Python leaves SIGPIPE at its default action, so one plain ``send`` to a
peer that has reset the connection kills the whole editor (and its unsaved work). Each test
runs the client as the plug-ins do (``tracker.Session`` over ``zmtp.Dealer``, the modules
imported from ``bridge/`` by path) in a subprocess whose SIGPIPE is at its default action,
kills the server with SIGKILL at one point of the conversation, and then lets the client
take its next step: the process must exit 0 (not -SIGPIPE) and say what happened.

The client is "busy" (not pumping its socket, as a UI thread drawing a preview is) from
the kill until the parent says "go", so its next write meets a connection the peer has
already closed: that is the moment that used to raise SIGPIPE.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

zmq = pytest.importorskip("zmq")

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGPIPE") or not os.path.exists("/proc/net/tcp"),
    reason="SIGPIPE and /proc/net/tcp are POSIX/Linux",
)

BRIDGE = Path(__file__).resolve().parent.parent / "bridge"

# The plug-ins' client: standard library + the bridge's protocol, tracker and zmtp modules.
CLIENT = r"""
import signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as in Krita: a broken pipe kills the process
sys.path.insert(0, sys.argv[1])
import tracker, zmtp

address, point = sys.argv[2], sys.argv[3]
HB = 30.0 if point == "heartbeat" else 0.2  # after a heartbeat only the PONG can write
dealer = zmtp.Dealer(address, identity=b"sigpipe-client", heartbeat_ivl=HB,
                     heartbeat_timeout=30, reconnect_ivl=0.05)
session = tracker.Session(dealer, client="sigpipe-test")


def wait_for(name, rid):
    end = time.monotonic() + 300
    while time.monotonic() < end:
        for ev in session.poll(0.05):
            if ev.id == rid and ev.event == name:
                return ev
            if ev.id == rid and ev.event == "error":
                sys.exit(f"unexpected error before the kill: {ev.code}: {ev.message}")
    sys.exit(f"no {name} event")


wait_for("hello", session.hello())
request = {"mode": "txt2img", "prompt": "a red circle", "num_inference_steps": 1000,
           "width": 64, "height": 64}
if point == "request":
    rid = session.generate(request)
    wait_for("progress", rid)
elif point == "result":
    rid = session.generate(request)
    wait_for("started", rid)
elif point == "heartbeat":
    end = time.monotonic() + 0.5  # the server PINGs every 100 ms; we answer PONG
    while time.monotonic() < end:
        session.poll(0.05)
busy_since = time.monotonic()
print("at", point, flush=True)
sys.stdin.readline()  # busy until the server is dead
if point != "heartbeat":
    time.sleep(max(0.0, busy_since + 2 * HB - time.monotonic()))  # our PING timer is now due
epoch = dealer.epoch
if point == "connect":
    rid = session.generate(request)  # the user's next click
elif point == "request":
    session.cancel(rid)  # the user cancels the job the dead server was running
end = time.monotonic() + 20
while time.monotonic() < end:
    for ev in session.poll(0.05):
        if ev.event == "error":
            print("error", ev.code, ev.message, flush=True)
    if dealer.epoch > epoch and not session.pending:
        print("lost:", dealer.last_error, flush=True)
        sys.exit(0)
sys.exit("the client never noticed that the server was gone")
"""

# A real libzmq ROUTER (pyzmq) in its own process, playing a bridge server that answers
# hello, runs a generate (accepted, started, progress) and, for "result", sends a 64 MiB
# result: far more than the socket buffers hold, so the kill lands in the middle of it.
FAKE_SERVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import protocol as P
import zmq

point = sys.argv[2]
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
router.linger = 0
router.setsockopt(zmq.HEARTBEAT_IVL, 100)  # PINGs every 100 ms, as the bridge does (2 s)
router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 60_000)  # never drop the busy client first
port = router.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    ident, *frames = router.recv_multipart()
    head = json.loads(frames[0])
    rid, op = head["id"], head["op"]
    if op == "hello":
        router.send_multipart([ident, *P.event_frames("hello", rid, versions=[1])])
    elif op == "generate":
        router.send_multipart([ident, *P.event_frames("accepted", rid, job="j1", position=0)])
        router.send_multipart([ident, *P.event_frames("started", rid, job="j1")])
        if point == "result":
            pic = P.Picture(4096, 4096, "rgba8", bytes(4096 * 4096 * 4))
            router.send_multipart([ident, *P.event_frames("result", rid, [("image", pic)])])
        else:
            router.send_multipart([ident, *P.event_frames("progress", rid, step=1, total=1000)])
"""


SERVE = "import sys; from sdkit.cli import main; sys.exit(main())"  # `sdkit serve`


def _line(stream, timeout: float, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no {what} within {timeout} s"
    return stream.readline().strip()


def _unread_bytes(server_port: int) -> int:
    """Bytes waiting, unread, in the client's socket(s) to ``server_port`` (/proc/net/tcp)."""
    total = 0
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split()
            if int(cols[2].split(":")[1], 16) == server_port:  # rem_address is the server
                total += int(cols[4].split(":")[1], 16)  # tx_queue:rx_queue
    return total


def _wait_until(cond, timeout: float, what: str) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"{what} did not happen within {timeout} s"
        time.sleep(0.01)


def _kill_and_resume(server: subprocess.Popen, port: int, point: str) -> tuple[int, str]:
    """Run the client to ``point``, SIGKILL the server, let the client go on; (rc, output)."""
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(BRIDGE), f"tcp://127.0.0.1:{port}", point],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _line(client.stdout, 600, "client at its kill point") == f"at {point}"
        if point in ("heartbeat", "result"):
            # Kill only once a heartbeat PING (or part of the result) sits unread at the client.
            _wait_until(lambda: _unread_bytes(port) > 0, 10, "bytes in flight to the client")
        server.kill()
        server.wait(30)
        client.stdin.write("go\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=60)
        return client.returncode, out
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.mark.parametrize("point", ["connect", "heartbeat", "request", "result"])
def test_client_survives_a_libzmq_server_killed_at(point):
    server = subprocess.Popen(
        [sys.executable, "-c", FAKE_SERVER, str(BRIDGE), point],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(_line(server.stdout, 60, "the fake server's port"))
        rc, out = _kill_and_resume(server, port, point)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert rc != -signal.SIGPIPE, f"the client was killed by SIGPIPE after a {point} kill:\n{out}"
    assert rc == 0, out
    lost = [line for line in out.splitlines() if line.startswith("lost:")]
    assert lost and str(port) in lost[0], out  # the reason names the server it lost
    if point in ("connect", "request", "result"):  # a request was in flight: it says so
        assert "error connection_lost" in out, out


@pytest.mark.slow
def test_client_survives_the_real_bridge_server_killed_mid_request():
    """``sdkit serve`` itself, SIGKILLed while it runs the client's job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--bind", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = _line(server.stdout, 600, "the server's address")
        port = int(line.split()[2].rsplit(":", 1)[1])
        rc, out = _kill_and_resume(server, port, "request")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert rc != -signal.SIGPIPE, f"the client was killed by SIGPIPE:\n{out}"
    assert rc == 0, out
    assert "error connection_lost" in out and "lost:" in out, out
