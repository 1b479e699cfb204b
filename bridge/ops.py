"""What the bridge server answers to each op (the socket, loop and life cycle: `server`).

`Ops` is mixed into `server.Server`; each ``_op_<name>`` gets the client's routing id and
the decoded message, and raises `protocol.ProtocolError` for an error reply.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from sdkit.bridge import protocol as P
from sdkit.bridge.logs import client_label, log_event

SERVER_NAME = "sdkit-bridge"
log = logging.getLogger(__name__)


class Ops:
    """The op handlers; they use the server's engine, clients, jobs, limits and `_send`."""

    engine: Any
    limits: P.Limits
    name: str | None
    _clients: Any
    _jobs: Any
    _started: float

    def _send(self, client: bytes, frames: list[Any], essential: bool = True) -> bool:
        raise NotImplementedError

    def _op_hello(self, client: bytes, msg: P.Message) -> None:
        info = self.engine.info()
        self._send(
            client,
            P.event_frames(
                "hello",
                msg.id,
                versions=list(P.SUPPORTED_VERSIONS),
                server=f"{SERVER_NAME}/{_version()}",
                model=info,
                models=self._jobs.engines.names(),
                modes=info["modes"],
                size_multiple=info["size_multiple"],
                ranges=info["ranges"],
                schedulers=list(info["scheduler_names"]),
                defaults=info["defaults"],
                limits=self.limits.to_dict(),
                formats={
                    "image": list(P.REQUEST_FRAMES["image"]),
                    "mask": list(P.REQUEST_FRAMES["mask"]),
                    "control": list(P.REQUEST_FRAMES["control"]),
                    "result": list(P.RESULT_FORMATS),
                },
                worker=self.name,
                **adapter_names(info),
            ),
        )

    def _op_ping(self, client: bytes, msg: P.Message) -> None:
        self._send(
            client, P.event_frames("pong", msg.id, data=msg.header.get("data"), time=time.time())
        )

    def _op_status(self, client: bytes, msg: P.Message) -> None:
        state = self._clients.get(client)
        jobs = {rid: e.state for rid, e in (state.entries.items() if state else [])}
        self._send(
            client,
            P.event_frames(
                "status",
                msg.id,
                queue_length=self._jobs.queue_length(self.engine),
                running=getattr(self.engine, "current_job", None) is not None,
                jobs=jobs,
                clients=len(self._clients),
                uptime=round(time.time() - self._started, 3),
            ),
        )

    def _op_cancel(self, client: bytes, msg: P.Message) -> None:
        target = msg.header["target"]
        state = self._clients.get(client)
        entry = state.entries.get(target) if state else None
        if entry is None:
            self._send(client, P.event_frames("cancel", msg.id, target=target, found=False))
            return
        was = entry.state
        log_event(logging.INFO, "cancel", client=client_label(client), id=target, was=was)
        self._send(client, P.event_frames("cancel", msg.id, target=target, found=True, state=was))
        self._jobs.cancel(entry, "cancelled by the client")

    def _op_bye(self, client: bytes, msg: P.Message) -> None:
        state = self._clients.pop(client)
        for entry in list(state.entries.values()) if state else []:
            entry.gone = True
            self._jobs.cancel(entry, "the client said bye")
        self._send(client, P.event_frames("bye", msg.id), essential=False)

    def _op_generate(self, client: bytes, msg: P.Message) -> None:
        self._jobs.generate(client, self._clients.touch(client, time.monotonic()), msg)


ADAPTER_KINDS = ("loras", "embeddings", "controls")  # Engine.info() keys, names only


def adapter_names(info: dict) -> dict[str, Any]:
    """The adapters a request may name (LoRAs, embeddings, control models), as `hello` lists
    them: names only, never the folders or paths they were found in; [] when the engine
    has none (or predates adapters)."""
    return {k: [n for n in info.get(k) or [] if isinstance(n, str)] for k in ADAPTER_KINDS}


_NOT_FOUND = re.compile(r"(LoRA|embedding|ControlNet model) ('.*') not found; searched: .*", re.S)
_KINDS = {"LoRA": "lora", "embedding": "embedding", "ControlNet model": "control"}
SERVER_FOLDER = "<server folder>"


def public_message(message: str, engine: Any) -> str:
    """An engine's error message as a client may read it. At a terminal the engine names the
    folders it searched for a missing adapter; a client gets the names the server offers
    instead (as `hello` lists them), and any adapter folder left in a message (a corrupt
    file's path, say) reads as <server folder>: a client never learns the server's disk."""
    folders = getattr(engine, "adapters", None)
    if folders is None:
        return message
    try:
        found = _NOT_FOUND.fullmatch(message)
        if found:
            what, name = found.groups()
            offered = ", ".join(folders.names(_KINDS[what])) or "none"
            return f"{what} {name} not found; the server offers: {offered}"
        for kind in _KINDS.values():
            for folder in folders.folders(kind):
                message = message.replace(str(folder), SERVER_FOLDER)
    except Exception:  # noqa: BLE001 - an engine of another shape: say less, never fail
        log.debug("public_message: could not read the engine's adapter folders", exc_info=True)
    return message


def _version() -> str:
    try:
        import sdkit

        return sdkit.__version__
    except Exception:  # noqa: BLE001
        return "0"
