"""Which bridge request runs next: round-robin between clients, one job waiting per engine.

An engine runs its own queue first in, first out, so a client that sends eight jobs would
make everyone else's single job wait behind all eight.  The bridge therefore keeps its
requests itself, in a `FairQueue` per engine, and hands each engine one job at a time
(plus one waiting behind the running one, so the engine never idles between jobs).

`FairQueue` orders requests by a tag (round, arrival): a client's k-th waiting request
goes into round current + k, a newcomer joins the current round, so every client gets one
job per round.  Tags live in a sorted list: a position is one `bisect` (O(log n)).
Only the server's socket thread uses these objects.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from sdkit.bridge.clients import Entry


class FairQueue:
    """Entries waiting for one engine, round-robin between clients."""

    def __init__(self) -> None:
        self._tags: list[tuple[int, int]] = []  # sorted: the order entries will run in
        self._entries: dict[tuple[int, int], Entry] = {}
        self._round = 0  # the round of the entry taken last
        self._newest: dict[bytes, int] = {}  # client -> round of its newest waiting entry
        self._waiting: dict[bytes, int] = {}  # client -> how many it has waiting

    def __len__(self) -> int:
        return len(self._tags)

    def __iter__(self) -> Iterator[Entry]:
        """Entries in the order they will run."""
        return (self._entries[t] for t in list(self._tags))

    def push(self, entry: Entry, *, front: bool = False) -> None:
        """Queue ``entry`` in its client's next round; ``front``: it takes the client's
        first waiting place and the client's other entries move one place back (so other
        clients wait exactly as long as after a plain push)."""
        newest = self._newest.get(entry.client)
        rnd = self._round if newest is None else max(self._round, newest + 1)
        entry.tag = (rnd, entry.seq)
        bisect.insort(self._tags, entry.tag)
        self._entries[entry.tag] = entry
        self._newest[entry.client] = rnd
        self._waiting[entry.client] = self._waiting.get(entry.client, 0) + 1
        if front:
            mine = [self._entries[t] for t in self._tags if self._entries[t].client == entry.client]
            tags = [e.tag for e in mine]
            for e, tag in zip([entry, *mine[:-1]], tags, strict=True):
                e.tag = tag
                self._entries[tag] = e

    def take_place(self, old: Entry, new: Entry) -> bool:
        """``new`` takes waiting ``old``'s place (a ``replace``); False if ``old`` is not here."""
        if self._entries.get(old.tag) is not old:
            return False
        new.tag = old.tag
        self._entries[new.tag] = new
        return True

    def pop(self) -> Entry | None:
        """The next entry to run (None if none waits)."""
        if not self._tags:
            return None
        tag = self._tags.pop(0)
        self._round = tag[0]
        return self._forget(self._entries.pop(tag))

    def remove(self, entry: Entry) -> bool:
        """Take ``entry`` out (cancelled); False if it is not waiting here."""
        i = bisect.bisect_left(self._tags, entry.tag)
        if (
            i == len(self._tags)
            or self._tags[i] != entry.tag
            or self._entries[entry.tag] is not entry
        ):
            return False
        del self._tags[i]
        self._forget(self._entries.pop(entry.tag))
        return True

    def position(self, entry: Entry) -> int:
        """How many entries of this queue run before ``entry``."""
        return bisect.bisect_left(self._tags, entry.tag)

    def _forget(self, entry: Entry) -> Entry:
        left = self._waiting[entry.client] - 1
        if left:
            self._waiting[entry.client] = left
        else:
            del self._waiting[entry.client], self._newest[entry.client]
        return entry


class _Lane:
    """One engine: its fair queue, the job handed to it and waiting, the job it runs."""

    def __init__(self) -> None:
        self.queue = FairQueue()
        self.waiting: Entry | None = None
        self.running: Entry | None = None

    def busy(self) -> int:
        return (self.waiting is not None) + (self.running is not None)


class Dispatcher:
    """Feeds each engine from its fair queue; ``submit(entry)`` hands one to its engine.

    The server calls `started` and `ended` from the engine's events; each may free the
    engine's waiting slot, and `feed` then submits the next entry.
    """

    def __init__(self, submit: Callable[[Entry], None]):
        self._submit = submit
        self._lanes: dict[int, _Lane] = {}
        self._queued = 0

    def __len__(self) -> int:
        """Entries waiting in the bridge (not yet handed to an engine)."""
        return self._queued

    def waiting(self, engine: Any) -> int:
        """Entries for ``engine`` still in the bridge's queue."""
        lane = self._lanes.get(id(engine))
        return 0 if lane is None else len(lane.queue)

    def _lane(self, engine: Any) -> _Lane:
        lane = self._lanes.get(id(engine))
        if lane is None:
            lane = self._lanes[id(engine)] = _Lane()
        return lane

    def enqueue(self, entry: Entry, *, front: bool = False) -> None:
        self._lane(entry.engine).queue.push(entry, front=front)
        self._queued += 1

    def take_place(self, old: Entry, new: Entry) -> bool:
        """``new`` replaces ``old`` where ``old`` waits in the bridge; False once handed on."""
        return old.engine is new.engine and self._lane(new.engine).queue.take_place(old, new)

    def remove(self, entry: Entry) -> bool:
        """Take a waiting entry out; False once it was handed to its engine."""
        if entry.engine is None or not self._lane(entry.engine).queue.remove(entry):
            return False
        self._queued -= 1
        return True

    def feed(self) -> None:
        """Hand each idle-slot engine its next entry (``submit`` may end it at once)."""
        for lane in list(self._lanes.values()):
            while lane.waiting is None and len(lane.queue):
                entry = lane.queue.pop()
                assert entry is not None  # the queue was not empty
                self._queued -= 1
                lane.waiting = entry
                self._submit(entry)

    def started(self, entry: Entry) -> None:
        lane = self._lane(entry.engine)
        if lane.waiting is entry:
            lane.waiting = None
        lane.running = entry
        self.feed()

    def ended(self, entry: Entry) -> None:
        lane = self._lane(entry.engine)
        if lane.waiting is entry:
            lane.waiting = None
        if lane.running is entry:
            lane.running = None
        self.feed()

    def position(self, entry: Entry) -> int:
        """Requests ahead of ``entry`` that the bridge knows of (0: running or next)."""
        if entry.engine is None:
            return 0
        lane = self._lane(entry.engine)
        if entry is lane.running:
            return 0
        if entry is lane.waiting:
            return int(lane.running is not None)
        return lane.busy() + lane.queue.position(entry)

    def positions(self) -> Iterator[tuple[Entry, int]]:
        """Every entry waiting in the bridge or its engine, with its position (O(n) in all)."""
        for lane in list(self._lanes.values()):
            if lane.waiting is not None:
                yield lane.waiting, int(lane.running is not None)
            for i, entry in enumerate(lane.queue):
                yield entry, lane.busy() + i
