"""Issue 13 finding 8: `sdkit serve` stops cleanly on SIGTERM/SIGINT and can be restarted."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

zmq = pytest.importorskip("zmq")

from sdkit.bridge import Client  # noqa: E402
from sdkit.bridge.client import BridgeError  # noqa: E402

FAST = {"num_inference_steps": 1, "width": 64, "height": 64}


def _free_address() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"tcp://127.0.0.1:{port}"


def _start(address: str) -> subprocess.Popen:
    sdkit_cmd = Path(sys.executable).with_name("sdkit")
    proc = subprocess.Popen(
        [str(sdkit_cmd), "serve", "--bind", address, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 600)
    line = proc.stdout.readline() if ready else ""
    assert line.startswith("sdkit bridge:"), (line, proc.poll())
    return proc


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, proc.stderr.read()


def _running(client: Client):
    job = client.submit(prompt="a red circle", num_inference_steps=1000, width=256, height=256)
    deadline = time.monotonic() + 600
    while job.progress is None:
        assert time.monotonic() < deadline and not job.done(), job.state
        client.pump(0.05)
    return job


def test_sigterm_and_sigint_exit_0_and_clients_reach_the_restarted_server():
    address = _free_address()
    proc = _start(address)
    clients = [Client(address, transport=t, timeout=600) for t in ("zmq", "zmtp")]
    try:
        for c in clients:
            assert c.hello()["versions"] == [1]
        job = _running(clients[0])  # a job mid-step when the signal lands
        rc, err = _stop(proc, signal.SIGTERM)
        assert rc == 0, err[-2000:]
        with pytest.raises(BridgeError) as e:
            job.result(120)
        assert e.value.code in ("shutdown", "connection_lost")
        proc = _start(address)
        for c in clients:  # the first request after the restart succeeds
            assert c.txt2img("a blue square", **FAST)[0].size == (64, 64)
        _running(clients[1])
        rc, err = _stop(proc, signal.SIGINT)
        assert rc == 0, err[-2000:]
        proc = _start(address)
        for c in clients:
            assert c.hello(timeout=60)["versions"] == [1]
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            _stop(proc, signal.SIGTERM)
