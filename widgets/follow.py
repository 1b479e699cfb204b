"""Follow an engine's jobs for the widget without ever holding up the engine.

The engine calls `JobFollower.listener` on its own thread; the listener only appends the
event to an inbox and returns. A thread owned by the widget drains the inbox and runs the
widget's handler (PNG encoding, gallery, saving), so a slow notebook front end never
delays a denoising step, and a burst of progress events collapses to the newest per job.
Job states and event kinds are `sdkit.jobs`' own enums; this module keeps no state
machine of its own, only which jobs are unfinished and which of them are ours.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sdkit.jobs import EventKind

log = logging.getLogger("sdkit.widgets")

TERMINAL = frozenset({EventKind.DONE, EventKind.CANCELLED, EventKind.FAILED})

# handler(kind, job, event, ours)
Handler = Callable[[EventKind, Any, Any, bool], None]


class JobFollower:
    """Events of every job on one engine, handed to `handler` on the follower's thread.

    `ours` tells the handler whether the job was submitted through `submit` here (its
    own callback marks it before any listener of the engine hears of it).
    """

    def __init__(self, handler: Handler, name: str = "sdkit-widget-events") -> None:
        self._handler = handler
        self._cond = threading.Condition()
        self._inbox: deque[tuple[EventKind, Any, Any]] = deque()
        self._busy = False  # the thread is handling a batch
        self._closed = False
        # Ids of jobs submitted here, and of jobs whose last event was handled: a few bytes
        # per job, kept so that late or reordered deliveries never revive a finished job.
        self._ours: set[str] = set()
        self._over: set[str] = set()
        self.jobs: dict[str, Any] = {}  # our unfinished jobs by id
        self.active: set[str] = set()  # unfinished jobs of the engine, whoever submitted them
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ----- the engine's side: cheap, never blocks on the widget ----------------------
    def listener(self, kind: str, job: Any, event: Any) -> None:
        """Subscribe this to the engine (`engine.subscribe(follower.listener)`)."""
        with self._cond:
            if self._closed:
                return
            kind = EventKind(kind)
            if kind not in TERMINAL and job.id not in self._over:
                self.active.add(job.id)
            self._inbox.append((kind, job, event))
            self._cond.notify_all()

    def _mark(self, kind: str, job: Any, event: Any) -> None:
        """The job's own callback: runs before the engine's subscribers hear of the job."""
        with self._cond:
            self._track(job)

    # ----- the widget's side ----------------------------------------------------------
    def submit(self, engine: Any, request: Any, **options: Any) -> Any:
        """`engine.submit(request, **options)`, the job marked as ours; `RequestError` passes
        through."""
        job = engine.submit(request, callback=self._mark, **options)
        with self._cond:
            self._track(job)
        return job

    def _track(self, job: Any) -> None:
        self._ours.add(job.id)
        if job.id not in self._over:
            self.jobs.setdefault(job.id, job)
            self.active.add(job.id)

    def ours(self) -> list[Any]:
        """Our unfinished jobs."""
        with self._cond:
            return list(self.jobs.values())

    def busy(self) -> bool:
        """Unfinished jobs, or events not yet handled."""
        with self._cond:
            return bool(self.active or self._inbox or self._busy)

    def wait_idle(self, deadline: float | None) -> bool:
        """Block until `busy()` is false or `deadline` (time.monotonic) passes."""
        with self._cond:
            while self.active or self._inbox or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Stop the thread (events still in the inbox are dropped)."""
        with self._cond:
            self._closed = True
            self._inbox.clear()
            self.active.clear()
            self._cond.notify_all()

    # ----- the follower's thread ------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = _newest_progress_only(list(self._inbox))
                self._inbox.clear()
                self._busy = True
            try:
                for kind, job, event in batch:
                    self._handle(kind, job, event)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _handle(self, kind: EventKind, job: Any, event: Any) -> None:
        with self._cond:
            ours = job.id in self._ours
        try:
            self._handler(kind, job, event, ours)
        except Exception:  # the widget shows its own errors; this one is a bug: log it
            log.exception("SDWidget: handling %s of job %s failed", kind, job.id)
        finally:
            if kind in TERMINAL:
                with self._cond:
                    self._over.add(job.id)
                    self.jobs.pop(job.id, None)
                    self.active.discard(job.id)


def _newest_progress_only(batch: list[tuple[EventKind, Any, Any]]) -> list:
    """Drop progress events that a later progress event of the same job supersedes."""
    last: dict[str, int] = {}
    for i, (kind, job, _) in enumerate(batch):
        if kind == EventKind.PROGRESS:
            last[job.id] = i
    return [
        item
        for i, item in enumerate(batch)
        if item[0] != EventKind.PROGRESS or last[item[1].id] == i
    ]
