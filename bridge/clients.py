"""Who the bridge is talking to: clients by routing id, their requests, and replies in waiting.

Only the server's socket thread uses these objects (no locks).  A `Client` holds its
unfinished requests (`Entry`, by request id); `Clients` also indexes entries by engine
job id (engine events name jobs, not clients) and keeps the replies that found a full send
buffer, to be sent again on the next turn of the loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Entry:
    """One generate request in flight: which client, which id, which job.

    ``job_id`` is the bridge's own id (sent in ``accepted``); ``job`` is the engine's job,
    None until the dispatcher hands the request to its engine.  ``engine`` is None while
    the model it names is loading.
    """

    client: bytes
    rid: str
    job_id: str
    request: Any
    engine: Any
    preview: int
    result_format: str
    seq: int
    model: str | None = None
    policy: str = "back"  # protocol.QUEUE_POLICIES
    stream: str | None = None  # with the client: the source a "replace" supersedes within
    job: Any = None
    tag: tuple[int, int] = (0, 0)
    started: bool = False
    finished: bool = False
    gone: bool = False
    cancel_reason: str = "cancelled by the client"
    last_position: int | None = None

    @property
    def state(self) -> str:
        """loading | queued (in the bridge or the engine) | running | ..."""
        if self.job is not None:
            return str(self.job.state)
        return "loading" if self.engine is None else "queued"


@dataclass
class Client:
    """One routing id: its unfinished requests, who it is, when it last sent anything.

    ``identity`` is the connection's ZAP ``User-Id`` (see `security.Authenticator`): the
    CURVE key, or a per-connection token for NULL; None where no ZAP handler runs.
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    last_seen: float = 0.0
    identity: str | None = None


SendFn = Callable[[bytes, list[Any]], bool]


class Clients:
    """The server's client table, its job index and its deferred replies."""

    def __init__(
        self,
        *,
        expiry: float = 60.0,
        max_deferred: int = 1000,
        max_deferred_bytes: int = 256 * 2**20,
    ) -> None:
        self._clients: dict[bytes, Client] = {}
        self._by_job: dict[str, Entry] = {}
        # replies that met a full send buffer, per client, in order (bounded: see `defer`)
        self._deferred: dict[bytes, deque[list[Any]]] = {}
        self._deferred_bytes: dict[bytes, int] = {}
        self.expiry = expiry  # s without a message before a client with no jobs is forgotten
        self.max_deferred = max_deferred
        self.max_deferred_bytes = max_deferred_bytes
        self.dropped = 0  # clients dropped for not reading their replies
        self.expired = 0

    # -- clients
    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client: bytes) -> bool:
        return client in self._clients

    def get(self, client: bytes) -> Client | None:
        return self._clients.get(client)

    def touch(self, client: bytes, now: float, identity: str | None = None) -> Client:
        """The client's state (created on first contact), marked as seen ``now``."""
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = Client(identity=identity)
        state.last_seen = now
        return state

    def identity(self, client: bytes) -> str | None:
        """Who owns this routing id's requests (None: nobody yet, or no ZAP handler)."""
        state = self._clients.get(client)
        return None if state is None else state.identity

    def expire(self, now: float) -> int:
        """Forget clients without unfinished requests, silent for ``expiry`` s; how many."""
        stale = [
            c
            for c, state in self._clients.items()
            if not state.entries and now - state.last_seen > self.expiry
        ]
        for client in stale:
            self.pop(client)
        self.expired += len(stale)
        return len(stale)

    def pop(self, client: bytes) -> Client | None:
        """Forget a client and its waiting replies; its entries stay indexed until their jobs end."""
        self._deferred.pop(client, None)
        self._deferred_bytes.pop(client, None)
        return self._clients.pop(client, None)

    # -- entries
    @property
    def in_flight(self) -> int:
        """Unfinished requests of all clients together."""
        return len(self._by_job)

    def add(self, state: Client, entry: Entry) -> None:
        state.entries[entry.rid] = entry
        self._by_job[entry.job_id] = entry

    def by_job(self, job_id: str) -> Entry | None:
        return self._by_job.get(job_id)

    def entries(self) -> Iterator[Entry]:
        """Every unfinished entry, oldest first (a snapshot: safe to finish entries meanwhile)."""
        return iter(list(self._by_job.values()))

    def finish(self, entry: Entry) -> None:
        """The entry's job has ended: drop it from the index and from its client."""
        entry.finished = True
        self._by_job.pop(entry.job_id, None)
        state = self._clients.get(entry.client)
        if state is not None and state.entries.get(entry.rid) is entry:
            del state.entries[entry.rid]

    def clear(self) -> None:
        self._clients.clear()
        self._by_job.clear()
        self._deferred.clear()
        self._deferred_bytes.clear()

    # -- replies that met a full send buffer
    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def deferred_count(self, client: bytes | None = None) -> int:
        """Replies waiting for a send buffer (one client's, or everyone's)."""
        if client is not None:
            return len(self._deferred.get(client, ()))
        return sum(len(q) for q in self._deferred.values())

    def defer(self, client: bytes, frames: list[Any]) -> bool:
        """Keep a reply for later; False if the client is over its bound and must be dropped.

        A client that sends but never reads would otherwise grow this without limit (issue
        13.5): at ``max_deferred`` replies or ``max_deferred_bytes`` its waiting replies
        are discarded and the caller drops the client (its jobs are cancelled).
        """
        size = sum(len(f) for f in frames)
        queue = self._deferred.setdefault(client, deque())
        total = self._deferred_bytes.get(client, 0) + size
        if len(queue) >= self.max_deferred or (queue and total > self.max_deferred_bytes):
            self._deferred.pop(client, None)
            self._deferred_bytes.pop(client, None)
            self.dropped += 1
            return False
        queue.append(frames)
        self._deferred_bytes[client] = total
        return True

    def retry_deferred(self, send: SendFn) -> None:
        """Send each client's waiting replies in order, up to the first that does not fit.

        One client that does not read holds back only its own replies.
        """
        for client in list(self._deferred):
            queue = self._deferred[client]
            while queue and send(client, queue[0]):
                frames = queue.popleft()
                if client in self._deferred_bytes:
                    self._deferred_bytes[client] -= sum(len(f) for f in frames)
            if not queue or client not in self._clients:  # sent, or nobody to wait for
                self._deferred.pop(client, None)
                self._deferred_bytes.pop(client, None)
