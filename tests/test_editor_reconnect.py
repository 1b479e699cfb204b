"""The plug-ins' Connection (bridge/editor_connection.py, used by Krita and GIMP) across a
server restart on the same address: it says the server is gone, and a reopened connection
greets the new server and sends requests again (issue 16: live mode resumes by itself).
The Krita face of this is tests/test_krita.py -k restarts."""

from __future__ import annotations

import time

import pytest
from sdkit.bridge import editor_actions as ea
from sdkit.bridge import serve
from sdkit.bridge.editor_connection import Connection


@pytest.fixture(scope="module")
def engine():
    import sdkit

    return sdkit.load()


def _pump(conn: Connection, until, seconds: float, *, reopen: bool = False) -> bool:
    """Poll as the plug-ins' timers do; ``reopen`` reopens a failed connection (Krita live)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.poll(0.05)
        if until():
            return True
        if reopen and conn.state == "failed":
            conn.open()
    return until()


def test_connection_greets_a_restarted_server_and_runs_requests_again(engine):
    handle = serve(engine, bind="tcp://127.0.0.1:0")
    address = handle.address
    conn = Connection(address, hello_timeout=1.0)
    try:
        conn.wait_ready(10)
        handle.stop()
        assert _pump(conn, lambda: conn.state != "connected", 10), "the drop went unnoticed"
        assert _pump(conn, lambda: conn.state == "failed", 10)
        assert "no sdkit server answers" in (conn.error or "")
        handle = serve(engine, bind=address)
        assert _pump(conn, lambda: conn.state == "connected", 30, reopen=True), conn.error
        assert conn.session is not None
        params = ea.Params("a red circle", num_inference_steps=2, seed=3, width=64, height=64)
        action = ea.Action(conn.mode("txt2img"), params)
        action.start(conn, preview=0)
        assert _pump(conn, lambda: action.job is not None and action.job.done, 120)
        assert action.job is not None and action.job.result is not None, action.error
    finally:
        conn.close()
        handle.stop()
