"""What the Krita and GIMP tests share: a live server, a dead address, judging the dumps."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from sdkit.bridge import editor_geometry as geo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_address() -> str:
    """A loopback address where nothing listens (connections are refused)."""
    return f"tcp://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def live_server() -> Iterator[str]:
    """A real bridge server with the embedded model, in this process; yields its address.

    SDKIT_TEST_BRIDGE=tcp://host:port uses an already running `sdkit serve` instead.
    """
    external = os.environ.get("SDKIT_TEST_BRIDGE")
    if external:
        yield external
        return
    from sdkit.bridge import serve

    import sdkit

    handle = serve(sdkit.load(), bind="tcp://127.0.0.1:0")
    try:
        yield handle.address
    finally:
        handle.stop()


SERVE = """
import sys, sdkit
from sdkit.bridge import serve
engine = sdkit.load()
handles = [serve(engine, bind="tcp://127.0.0.1:0") for _ in range(int(sys.argv[1]))]
print(",".join(h.address for h in handles), flush=True)
sys.stdin.read()  # until the test closes it (or kills this process)
"""


@contextlib.contextmanager
def doomed_server(count: int = 1) -> Iterator[tuple[str, int]]:
    """Real bridge servers (``count`` addresses, one engine) in a process of their own, for
    an editor to kill: ("address,address,...", pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        address = ""
        for line in proc.stdout:  # sdkit.load() may print before the address
            if line.startswith("tcp://"):
                address = line.strip()
                break
        assert address, f"the server did not start (exit {proc.poll()})"
        yield address, proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=60)


def load_report(out: Path) -> dict:
    path = out / "report.json"
    assert path.exists(), f"the editor wrote no report to {out}"
    report = json.loads(path.read_text())
    assert "exception" not in report, report["exception"]
    return report


def judge_inpaint(out: Path, width: int, height: int) -> geo.Rect:
    """Outside the selection the merged image is unchanged; inside it changed.

    Returns the tight bounds of the selection mask, for the layer-bounds checks.
    """
    mask = (out / "mask.bin").read_bytes()
    before = (out / "before.bin").read_bytes()
    after = (out / "after.bin").read_bytes()
    assert len(mask) == width * height
    assert len(before) == len(after) == width * height * 4
    outside_changed = inside = inside_changed = soft = 0
    for i, m in enumerate(mask):
        a, b = before[4 * i : 4 * i + 4], after[4 * i : 4 * i + 4]
        if m == 0:
            outside_changed += a != b
        elif m == 255:
            inside += 1
            inside_changed += max(abs(p - q) for p, q in zip(a, b, strict=True)) > 8
        else:
            soft += 1
    assert soft > 0, "the selection should have an anti-aliased (soft) edge"
    assert outside_changed == 0, f"{outside_changed} pixels outside the selection changed"
    assert inside > 100
    assert inside_changed > 0.5 * inside, f"only {inside_changed}/{inside} selected pixels changed"
    bounds = geo.mask_bounds(mask, width, height)
    assert bounds is not None
    return bounds
