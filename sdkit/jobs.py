"""Jobs and their events: `Job`, the typed states and event kinds, the queue, the dispatcher.

Listeners (a job's callbacks and an engine's subscribers) run on one dispatcher thread per
engine, never on the worker that runs the model: a slow listener (a widget encoding PNGs, a
socket send) delays other listeners, never generation. Events of one job reach listeners
in the order they happened (queued, started, progress..., done | failed | cancelled) and
only after `Engine.submit` has handed the job to its caller.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sdkit.errors import RequestError

if TYPE_CHECKING:
    from PIL import Image

    from sdkit.request import Request
    from sdkit.result import Result

log = logging.getLogger("sdkit.engine")  # listener errors are logged under the engine's name


class JobState(StrEnum):
    """Where a job is; compares equal to the plain strings used before ("queued", ...)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EventKind(StrEnum):
    """What a listener is told; compares equal to the plain strings ("progress", ...)."""

    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class QueuePolicy(StrEnum):
    """Where `Engine.submit` puts a job: why a live stream never waits behind its own past.

    back: behind every waiting job (first in, first out). front: ahead of the waiting
    jobs submitted with back/replace (behind earlier front jobs). replace: supersedes the
    job of the same `source` that waits (it never runs: cancelled, `superseded`) and the one
    that runs (cancelled at its next cancel point); the new job takes the waiting one's
    place in line, or the back. So a source has at most one job waiting, and its results
    never arrive older after newer (one worker, the older one always ends first).
    """

    BACK = "back"
    FRONT = "front"
    REPLACE = "replace"

    @classmethod
    def parse(cls, value: Any, field: str = "policy") -> QueuePolicy:
        """`value` as a policy, or a `RequestError` naming `field` and the allowed ones."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(p.value for p in cls)
            raise RequestError(
                field, f"unknown queue policy {value!r}; allowed: {allowed}"
            ) from None


TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
TERMINAL_EVENTS = frozenset({EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED})

EventFn = Callable[[EventKind, "Job", "ProgressEvent | None"], None]


@dataclass(frozen=True)
class ProgressEvent:
    """One finished denoising step (counted the way diffusers' own progress bar counts)."""

    job_id: str
    step: int
    total: int
    elapsed: float
    preview: Image.Image | None = None


class JobCancelled(RuntimeError):
    """The job was cancelled; it produced no images."""


class Interrupted(Exception):
    """Raised inside a runner to stop a cancelled job at once (never leaves the engine)."""


class Job:
    """A request on its way through an engine; `result()` waits for it."""

    def __init__(
        self,
        request: Request,
        post: Callable[..., None],
        preview_every: int = 1,
        *,
        policy: QueuePolicy = QueuePolicy.BACK,
        source: Hashable | None = None,
    ):
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.policy = policy
        self.source = source
        self.superseded = False  # set when a newer `replace` job of its source took over
        self.state = JobState.QUEUED
        self.progress: ProgressEvent | None = None
        self.error: BaseException | None = None
        self.preview_every = preview_every
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._post = post
        self._result: Result | None = None
        self._callbacks: list[EventFn] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._handed_out = threading.Event()  # set when submit returns; events wait for it
        self._delivered = threading.Event()  # set once listeners have seen the terminal event

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.request.mode} {self.state}>"

    def cancel(self) -> None:
        """A queued job never runs; a running one stops at its next check: the end of a
        denoising step, before every resnet, attention, feed-forward or sampler call of the
        UNet and the VAE decoder, after the decode, and between batch items. So the bound
        is one such call, whatever the image size (in a compiled region: one step)."""
        with self._lock:
            if self.state in TERMINAL_STATES:
                return
            self._cancel.set()
            if self.state != JobState.QUEUED:
                return
            self.state = JobState.CANCELLED
            self.finished_at = time.perf_counter()
        self._finished.set()
        self._post(EventKind.CANCELLED, self, None)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> Result:
        """The `Result`; raises `JobCancelled`, the job's own error, or `TimeoutError`."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.id} still {self.state} after {timeout} s")
        if self.state == JobState.CANCELLED:
            raise JobCancelled(f"job {self.id} was cancelled")
        if self.state == JobState.FAILED:
            assert self.error is not None
            raise self.error
        assert self._result is not None
        return self._result

    def wait_delivered(self, timeout: float | None = None) -> bool:
        """True once every listener has been given this job's terminal event."""
        return self._delivered.wait(timeout)

    def add_callback(self, fn: EventFn) -> None:
        """`fn(kind, job, event)` for this job's events, on the engine's dispatcher thread."""
        with self._lock:
            self._callbacks.append(fn)

    # -- used by the engine's worker ------------------------------------------------

    def _try_start(self) -> bool:
        with self._lock:
            if self.state != JobState.QUEUED:
                return False
            self.state = JobState.RUNNING
            self.started_at = time.perf_counter()
            return True

    def _finish(
        self, state: JobState, result: Result | None = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            self.state = state
            self._result = result
            self.error = error
            self.finished_at = time.perf_counter()
        self._finished.set()


class JobQueue:
    """Jobs waiting for the worker, ordered by their `QueuePolicy`; `take()` blocks and
    returns None once closed.  Knows each source's newest job (waiting or running) so that
    `replace` supersedes it even while the worker is just picking it up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._newest: dict[Hashable, Job] = {}  # source -> its newest unfinished job
        self.closed = False

    def put(self, job: Job) -> bool:
        """Queue `job` by its policy; False when the queue is closed."""
        with self._cond:
            if self.closed:
                return False
            at = len(self._pending)
            if job.policy == QueuePolicy.FRONT:
                at = next(
                    (i for i, j in enumerate(self._pending) if j.policy != QueuePolicy.FRONT), at
                )
            elif job.policy == QueuePolicy.REPLACE:
                old = self._newest.get(job.source)
                if old is not None and old in self._pending:
                    at = self._pending.index(old)
                    del self._pending[at]
                if old is not None:
                    old.superseded = not old.done()
                    old.cancel()  # queued: cancelled now; running: stops at its next check
            if job.source is not None:
                self._newest[job.source] = job
            self._pending.insert(at, job)
            self._cond.notify()
            return True

    def take(self) -> Job | None:
        with self._cond:
            while not self._pending and not self.closed:
                self._cond.wait()
            return self._pending.popleft() if self._pending else None

    def finished(self, job: Job) -> None:
        """The worker is done with `job`: forget it as its source's newest."""
        with self._cond:
            if job.source is not None and self._newest.get(job.source) is job:
                del self._newest[job.source]

    def close(self) -> list[Job]:
        """Stop taking jobs; returns those still waiting (the caller cancels them)."""
        with self._cond:
            self.closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._newest.clear()
            self._cond.notify_all()
            return pending

    def waiting(self) -> int:
        with self._cond:
            return sum(1 for j in self._pending if j.state == JobState.QUEUED)


class Dispatcher:
    """Delivers events to listeners on its own thread, in the order they were posted."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._subscribers: list[EventFn] = []
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def post(self, kind: EventKind, job: Job, event: ProgressEvent | None) -> None:
        self._queue.put((kind, job, event))

    def subscribe(self, fn: EventFn) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def close(self, timeout: float = 30) -> None:
        """Deliver what was posted, then end the thread (not waited for from a listener)."""
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, job, event = item
            job._handed_out.wait()  # submit returns the job before anyone hears of it
            with job._lock:
                fns = list(job._callbacks)
            with self._lock:
                fns += self._subscribers
            for fn in fns:
                try:
                    fn(kind, job, event)
                except Exception:  # a broken listener must never break the job or others
                    log.exception("sdkit event listener %r failed on %s", fn, kind)
            if kind in TERMINAL_EVENTS:
                job._delivered.set()
