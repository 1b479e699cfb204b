"""Who the bridge is talking to: clients by routing id, their requests, and replies in waiting.

Only the server's socket thread uses these objects (no locks).  A `Client` holds its
unfinished requests (`Entry`, by request id); `Clients` also indexes entries by engine
job id (engine events name jobs, not clients) and keeps the replies that found a full send
buffer, to be sent again on the next turn of the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Entry:
    """One generate request in flight: which client, which id, which job."""

    client: bytes
    rid: str
    job: Any
    engine: Any
    preview: int
    result_format: str
    seq: int
    started: bool = False
    finished: bool = False
    gone: bool = False
    cancel_reason: str = "cancelled by the client"
    last_position: int | None = None


@dataclass
class Client:
    """One routing id: its unfinished requests and when it last sent anything."""

    entries: dict[str, Entry] = field(default_factory=dict)
    last_seen: float = 0.0


SendFn = Callable[[bytes, list[Any]], bool]


class Clients:
    """The server's client table, its job index and its deferred replies."""

    def __init__(self) -> None:
        self._clients: dict[bytes, Client] = {}
        self._by_job: dict[str, Entry] = {}
        self._deferred: list[tuple[bytes, list[Any]]] = []

    # -- clients
    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client: bytes) -> bool:
        return client in self._clients

    def get(self, client: bytes) -> Client | None:
        return self._clients.get(client)

    def touch(self, client: bytes, now: float) -> Client:
        """The client's state (created on first contact), marked as seen ``now``."""
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = Client()
        state.last_seen = now
        return state

    def pop(self, client: bytes) -> Client | None:
        """Forget a client; its entries stay indexed until their jobs end."""
        return self._clients.pop(client, None)

    # -- entries
    def add(self, state: Client, entry: Entry) -> None:
        state.entries[entry.rid] = entry
        self._by_job[entry.job.id] = entry

    def by_job(self, job_id: str) -> Entry | None:
        return self._by_job.get(job_id)

    def entries(self) -> Iterator[Entry]:
        """Every unfinished entry (a snapshot: safe to finish entries while iterating)."""
        return iter(list(self._by_job.values()))

    def finish(self, entry: Entry) -> None:
        """The entry's job has ended: drop it from the index and from its client."""
        entry.finished = True
        self._by_job.pop(entry.job.id, None)
        state = self._clients.get(entry.client)
        if state is not None and state.entries.get(entry.rid) is entry:
            del state.entries[entry.rid]

    def clear(self) -> None:
        self._clients.clear()
        self._by_job.clear()
        self._deferred.clear()

    # -- replies that met a full send buffer
    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def defer(self, client: bytes, frames: list[Any]) -> None:
        self._deferred.append((client, frames))

    def retry_deferred(self, send: SendFn) -> None:
        """Send waiting replies in order; stop at the first that still does not fit."""
        pending, self._deferred = self._deferred, []
        for i, (client, frames) in enumerate(pending):
            if not send(client, frames) and client in self._clients:
                self._deferred.extend(pending[i:])
                return
