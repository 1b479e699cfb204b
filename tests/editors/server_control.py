"""A bridge server that an editor scenario stops and starts again on the same address.

The editor runs in a process of its own (kritarunner), the server in the test's: the
scenario writes ``server_cmd.json`` (``{"n": k, "cmd": ...}``) into $SDKIT_OUT and waits
for ``server_ack.json`` with the same ``n``. Commands: ``stop``; ``start`` (the same engine
again); ``switch`` (stop, then serve ``other`` on the same address: another model).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def restartable_server(
    out: Path, engine: Any, other: Callable[[], Any] | None = None
) -> Iterator[str]:
    """Serve ``engine`` on a free loopback port; obey the scenario's commands until the
    block ends. ``other()`` makes the engine ``switch`` serves. Yields the address."""
    from sdkit.bridge import serve

    handle = serve(engine, bind="tcp://127.0.0.1:0")
    address = handle.address
    state: dict[str, Any] = {"handle": handle, "done": 0}
    stop = threading.Event()

    def obey(cmd: str) -> None:
        current = state["handle"]
        if cmd in ("stop", "switch") and current is not None:
            current.stop()
            state["handle"] = None
        if cmd == "start":
            state["handle"] = serve(engine, bind=address)
        elif cmd == "switch":
            assert other is not None, "no other engine to switch to"
            state["handle"] = serve(other(), bind=address)

    def watch() -> None:
        cmd_file, ack_file = out / "server_cmd.json", out / "server_ack.json"
        while not stop.wait(0.05):
            try:
                cmd = json.loads(cmd_file.read_text())
            except (OSError, ValueError):  # not there yet, or half written
                continue
            if cmd["n"] <= state["done"]:
                continue
            error = None
            try:
                obey(cmd["cmd"])
            except Exception as e:  # noqa: BLE001 - told to the scenario, which reports it
                error = repr(e)
            state["done"] = cmd["n"]
            tmp = ack_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"n": cmd["n"], "error": error}))
            tmp.replace(ack_file)

    thread = threading.Thread(target=watch, name="server-control", daemon=True)
    thread.start()
    try:
        yield address
    finally:
        stop.set()
        thread.join(10)
        if state["handle"] is not None:
            state["handle"].stop()
