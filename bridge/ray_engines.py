"""Engine replicas as Ray actors, behind the bridge server as if they were one engine.

`RayEngines` has the shape of `sdkit.Engine` that the bridge uses (``info``, ``check``,
``submit`` returning a job whose events reach a callback, ``queue_length``, ``close``), so
the server, its fair queue and the protocol are unchanged: clients cannot tell the
difference, except that ``result.worker`` names the replica.

Design (why it is this simple): one pump thread per replica takes the next job from a
shared pending list and runs it on its actor as a Ray streaming generator (`ray_replica`);
the events come back in order on that one stream and go to the job's callback exactly as
a local engine's do.  So a replica holds at most one job, the bridge's dispatcher holds one
more waiting (it hands on the next job when one starts): back-pressure without counting.
The bridge admits a request with `RayEngines.admit`: when a replica is idle, one call
checks the request there and starts it at once (the replica's first event is its check),
and the bridge's `submit` of the filled request takes that job over, its events held until
then; otherwise, and for any other caller (a batch checks rows it may skip), `check` is a
round trip of its own.  An admitted job nobody submits within ``CLAIM_WAIT`` (the bridge
refused it on its own limits, or its client left) is cancelled.
A replica whose process dies raises out of its stream: Ray restarts the actor
(``max_restarts``) while its job goes back to the front of the pending list for another
pump (retried once: the request carries its seed, so the same image), or fails with an
error naming the replica; the pump waits for its actor to come back and serves on.

Placement: each replica reserves ``cpus_per_replica`` CPUs and ``gpus_per_replica`` GPUs
(default 1 when the cluster has GPUs, else 0; fractions pack several replicas on one GPU).
Ray hands the actor its GPU ids and sets ``CUDA_VISIBLE_DEVICES`` to them, so the engine's
``cuda`` is that GPU; without CUDA the engine runs on the CPU.  A request for more than the
cluster has fails at once instead of waiting for resources that never come.

Allow-listed models (``--allow-model``) load on the replicas, not in the server:
`load_model` is the bridge's loader (`engines.Engines`) and returns a `RayModel`, a view
whose jobs carry the model's spec through the same pending list and pumps.

Ray is imported here only, lazily by the server (``serve(..., ray=...)``); never by sdkit.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sdkit.bridge.logs import log_event
from sdkit.bridge.ray_start import start_ray  # noqa: F401 - where callers have found it

log = logging.getLogger("sdkit.bridge")
EventFn = Callable[[str, Any, Any], None]
RESTART_WAIT = 600.0  # s a pump waits for its restarted actor (a model load) before giving up
CLAIM_WAIT = 1.0  # s an admitted, started job waits for its `submit` before it is cancelled


class RayJob:
    """A request on its way through a replica; the subset of `sdkit.jobs.Job` the bridge uses."""

    def __init__(
        self, request: Any, preview_every: int, callback: EventFn | None, model: str | None = None
    ):
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.model = model  # an allow-listed spec the replica loads, None: its own model
        self.preview_every = preview_every
        self.error: BaseException | None = None
        self.replica: str | None = None  # the name of the replica that runs (ran) it
        self.retried = False
        self.started = False
        self.state = "queued"  # running | done | failed | cancelled, as `Job.state` reads
        self._callback = callback
        self._result: Any = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._actor: Any = None  # set while a replica runs it
        self._held: list[tuple[str, Any]] | None = None  # admitted: events until claimed
        self.claim_by = 0.0  # admitted: when it is cancelled unless submitted
        self._deliver = threading.Lock()  # held events go out before any later one

    def cancel(self) -> None:
        """Waiting: it ends at once; running: the replica stops it at its next step."""
        self._cancel.set()
        actor = self._actor
        if actor is not None:
            actor.cancel.remote(self.id)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        if self._result is None:
            from sdkit.jobs import JobCancelled

            raise JobCancelled(f"job {self.id} was cancelled")
        return self._result

    def _event(self, kind: str, event: Any = None) -> None:
        if kind == "started":
            self.state = "running"
        elif kind in ("done", "failed", "cancelled"):
            self.state = kind
            self._done.set()
        with self._deliver:
            if self._held is not None:
                self._held.append((kind, event))
            else:
                self._call(kind, event)

    def _claim(self, callback: EventFn | None) -> None:
        """The bridge submitted this admitted job: its held events, then the live ones."""
        with self._deliver:
            held, self._held = self._held or [], None
            self._callback = callback
            for kind, event in held:
                self._call(kind, event)

    def _call(self, kind: str, event: Any) -> None:
        if self._callback is not None:
            try:
                self._callback(kind, self, event)
            except Exception:  # noqa: BLE001 - a listener's bug never stops a pump
                log.exception("ray job listener failed on %s", kind)


class RayEngines:
    """N replicas of one model as Ray actors; `submit` hands a job to the next free one."""

    def __init__(
        self,
        spec: Any = None,
        replicas: int = 1,
        *,
        address: str | None = "auto",
        num_cpus: int | None = None,
        gpus_per_replica: float | None = None,
        cpus_per_replica: float = 1.0,
        max_restarts: int = 3,
    ):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        ray = self._ray = start_ray(address, num_cpus)
        from sdkit.bridge import ray_replica

        have = ray.cluster_resources()
        if gpus_per_replica is None:
            gpus_per_replica = 1.0 if have.get("GPU", 0) > 0 else 0.0
        _check_fits(replicas, {"CPU": cpus_per_replica, "GPU": gpus_per_replica}, have)
        threads = max(1, int(cpus_per_replica))  # torch's CPU threads: what Ray reserved
        self.gpus_per_replica = gpus_per_replica
        actor_class = ray.remote(ray_replica.Replica).options(
            num_cpus=cpus_per_replica,
            num_gpus=gpus_per_replica,
            max_restarts=max_restarts,
            max_task_retries=0,  # the pump retries a job itself, on another replica
            max_concurrency=4,  # cancel and check while a job streams
        )
        self.spec = spec
        self._actors = [actor_class.remote(spec, i, threads) for i in range(replicas)]
        hellos = ray.get([a.hello.remote() for a in self._actors])
        self.names = [name for name, _, _ in hellos]
        self.placements = ray.get([a.placement.remote() for a in self._actors])
        self._info = hellos[0][2]
        self._pending: collections.deque[RayJob] = collections.deque()
        self._running: dict[int, RayJob] = {}
        self._idle: list[int] = []  # pumps waiting for a job
        self._reserved: set[int] = set()  # idle pumps whose replica `admit` is asking
        self._admitted: dict[int, RayJob] = {}  # id(filled request) -> its started job
        self._handed: dict[int, tuple[RayJob, Any]] = {}  # pump -> (job, its started stream)
        self._lock = threading.Condition()
        self._closed = False
        self._next_check = 0
        self._pumps = [
            threading.Thread(target=self._pump, args=(i,), name=f"sdkit-ray-{i}", daemon=True)
            for i in range(replicas)
        ]
        for t in self._pumps:
            t.start()
        log_event(
            logging.INFO,
            "ray_replicas",
            replicas=self.names,
            gpus=gpus_per_replica,
            placements=self.placements,
        )

    # ------------------------------------------------------------ the Engine shape

    def info(self) -> dict:
        return dict(self._info)

    def check(self, request: Any, model: str | None = None) -> Any:
        """The request as it will run (`Engine.check` on a replica), or its `RequestError`."""
        from sdkit.request import RequestError

        last: BaseException | None = None
        for _ in range(len(self._actors)):
            self._next_check = (self._next_check + 1) % len(self._actors)
            try:
                filled, error = self._ray.get(
                    self._actors[self._next_check].check.remote(request, model), timeout=60
                )
            except Exception as e:  # noqa: BLE001 - that replica is down: ask the next
                last = e
                continue
            if error is not None:
                raise RequestError(*error)
            # the pictures it left as they came are sent back as None: ours are the same
            kept = {n: getattr(request, n) for n in ("image", "mask") if getattr(filled, n) is None}
            return dataclasses.replace(filled, **kept) if kept else filled
        from sdkit.bridge.protocol import ProtocolError

        raise ProtocolError("unavailable", f"no engine replica answered ({type(last).__name__})")

    def admit(self, request: Any, model: str | None = None, *, preview_every: int = 1) -> Any:
        """`check`, and on an idle replica start the job in the same round trip: the
        bridge's `submit` of the returned request takes it over (events held till then)."""
        from sdkit.request import RequestError

        with self._lock:
            self._drop_unclaimed()
            if not self._idle or self._pending or self._closed:
                i = None
            else:
                i = self._idle.pop()
                self._reserved.add(i)
        if i is None:
            return self.check(request, model)
        job = RayJob(request, preview_every, None, model)
        job._held = []
        try:
            stream = self._start(i, job, check_first=True)
            kind, (filled, error) = self._ray.get(next(stream), timeout=60)
        except Exception:  # noqa: BLE001 - that replica is down: the others check it
            filled, error = None, None
        with self._lock:
            self._reserved.discard(i)
            handed = filled is not None and not self._closed
            if handed:
                kept = {
                    n: getattr(request, n) for n in ("image", "mask") if getattr(filled, n) is None
                }
                job.request = dataclasses.replace(filled, **kept) if kept else filled
                job.claim_by = time.monotonic() + CLAIM_WAIT
                self._handed[i] = (job, stream)
                self._admitted[id(job.request)] = job
            else:
                self._idle.append(i)  # its pump still waits in `_take`
            self._lock.notify_all()
        if error is not None:
            raise RequestError(*error)
        if filled is not None and not handed:  # closed meanwhile
            job.cancel()
            raise RuntimeError("the engine replicas are closed")
        return job.request if handed else self.check(request, model)

    def submit(
        self,
        request: Any,
        *,
        preview_every: int = 1,
        callback: EventFn | None = None,
        policy: str = "back",
        source: Any = None,
        model: str | None = None,
        checked: bool = False,
    ) -> RayJob:
        """Start on a free replica now, else queue for the next (``front`` goes first;
        ``replace`` is the bridge's).

        A request `admit` returned is its job, already running.  Otherwise the Ray call
        starts here, on the caller's thread, and travels while the pump wakes (one thread
        hop less per job).  The request is not checked again here, whatever ``checked``
        says (the bridge has, and a replica's own `Engine.submit` does)."""
        if self._closed:
            raise RuntimeError("the engine replicas are closed")
        with self._lock:
            admitted = self._admitted.pop(id(request), None)
        if admitted is not None and admitted.request is request:
            admitted._claim(callback)
            return admitted
        job = RayJob(request, preview_every, callback, model)
        with self._lock:
            if self._idle and not self._pending:
                i = self._idle.pop()
                self._handed[i] = (job, self._start(i, job))
            elif policy == "front":
                self._pending.appendleft(job)
            else:
                self._pending.append(job)
            self._lock.notify_all()
        return job

    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def current_job(self) -> RayJob | None:
        return next(iter(self._running.values()), None)

    def load_model(self, spec: Any) -> RayModel:
        """Load an allow-listed model on every replica (the bridge's loader thread waits)."""
        spec = str(spec)
        infos = self._ray.get([a.load.remote(spec) for a in self._actors])
        return RayModel(self, spec, infos[0])

    def pids(self) -> list[int]:
        """The replicas' process ids now (they change when Ray restarts one)."""
        return [pid for _, pid, _ in self._ray.get([a.hello.remote() for a in self._actors])]

    def close(self) -> None:
        """Cancel what waits and runs, stop the pumps, end the actors."""
        with self._lock:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            handed = [job for job, _ in self._handed.values()]
            self._lock.notify_all()
        for job in handed:  # its pump reads its stream to the replica's "cancelled"
            job.cancel()
        for job in pending:
            job._event("cancelled")
        for job in list(self._running.values()):
            job.cancel()
        for t in self._pumps:
            t.join(30)
        for actor in self._actors:
            self._ray.kill(actor, no_restart=True)

    # ------------------------------------------------------------ pumps

    def _start(self, i: int, job: RayJob, check_first: bool = False) -> Any:
        """Send ``job`` to replica ``i`` (the call returns at once): its stream of events."""
        job.replica, job._actor = self.names[i], self._actors[i]
        run = self._actors[i].run
        return run.remote(job.id, job.request, job.preview_every, job.model, check_first)

    def _drop_unclaimed(self) -> None:
        """Cancel admitted jobs whose `submit` did not come in time (under the lock)."""
        now = time.monotonic()
        for key, job in list(self._admitted.items()):
            if now > job.claim_by:
                del self._admitted[key]
                job.cancel()

    def _take(self, i: int) -> tuple[RayJob, Any] | None:
        """Pump ``i``'s next (job, stream already started by `submit` or None); None: closed."""
        with self._lock:
            self._idle.append(i)
            while i not in self._handed and not self._closed:
                if self._pending and i not in self._reserved:
                    break
                self._lock.wait(CLAIM_WAIT if self._admitted else None)
                self._drop_unclaimed()
            if i in self._idle:
                self._idle.remove(i)
            if i in self._handed:
                return self._handed.pop(i)
            return None if self._closed else (self._pending.popleft(), None)

    def _pump(self, i: int) -> None:
        while (taken := self._take(i)) is not None:
            job, stream = taken
            if job.cancel_requested and stream is None:
                job._event("cancelled")
                continue
            self._running[i] = job
            try:
                died = self._run(i, job, stream)
            finally:
                self._running.pop(i, None)
            if died is not None:
                self._replica_died(i, job, died)
                if not self._wait_restart(i):
                    return

    def _run(self, i: int, job: RayJob, stream: Any = None) -> BaseException | None:
        """Read ``job``'s events from replica ``i`` (starting it unless `submit` has); the
        actor's death if it died under it."""
        from ray.exceptions import RayActorError

        ray = self._ray
        try:
            if stream is None:
                stream = self._start(i, job)
            for ref in stream:
                kind, payload = ray.get(ref)
                if job._held is not None and time.monotonic() > job.claim_by:
                    with self._lock:
                        self._drop_unclaimed()
                if kind == "started":
                    if not job.started:
                        job.started = True
                        job._event(kind)
                elif kind == "progress":
                    job._event(kind, payload)
                elif kind == "done":
                    payload.worker = self.names[i]
                    job._result = payload
                    job._event(kind)
                elif kind == "failed":
                    job.error = _remote_error(*payload)
                    job._event(kind)
                else:
                    job._event("cancelled")
            return None
        except RayActorError as e:
            return e
        except Exception as e:  # noqa: BLE001 - the stream broke otherwise: the job fails
            job.error = RuntimeError(f"replica {self.names[i]}: {type(e).__name__}: {e}")
            job._event("failed")
            return None
        finally:
            job._actor = None

    def _replica_died(self, i: int, job: RayJob, error: BaseException) -> None:
        log_event(logging.WARNING, "replica_died", replica=self.names[i], job=job.id)
        if job.cancel_requested:
            job._event("cancelled")
        elif not job.retried:
            job.retried = True
            with self._lock:
                self._pending.appendleft(job)  # the next free replica runs it, same seed
                self._lock.notify_all()
        else:
            job.error = RuntimeError(
                f"engine replica {self.names[i]} died while running this job (it had been "
                f"retried once already); try again"
            )
            job._event("failed")

    def _wait_restart(self, i: int) -> bool:
        """Block until Ray has restarted actor ``i``; False if it is not back in time
        (while it restarts, calls fail at once with `RayActorError`, so this polls)."""
        deadline = time.monotonic() + RESTART_WAIT
        while not self._closed and time.monotonic() < deadline:
            try:
                self._ray.get(self._actors[i].hello.remote(), timeout=10)
                log_event(logging.INFO, "replica_back", replica=self.names[i])
                return True
            except Exception:  # noqa: BLE001 - restarting (or gone: then until the deadline)
                time.sleep(0.5)
        log_event(logging.ERROR, "replica_gone", replica=self.names[i])
        return False


class RayModel:
    """An allow-listed model on the replicas, with the Engine shape the bridge uses."""

    def __init__(self, engines: RayEngines, spec: str, info: dict):
        self.spec, self._engines, self._info = spec, engines, info

    def info(self) -> dict:
        return dict(self._info)

    def check(self, request: Any) -> Any:
        return self._engines.check(request, self.spec)

    def admit(self, request: Any, *, preview_every: int = 1) -> Any:
        return self._engines.admit(request, self.spec, preview_every=preview_every)

    def submit(self, request: Any, **options: Any) -> RayJob:
        return self._engines.submit(request, model=self.spec, **options)

    def queue_length(self) -> int:
        return self._engines.queue_length()

    def close(self) -> None:
        """Nothing of its own: the replicas close with their `RayEngines`."""


def _check_fits(replicas: int, each: dict[str, float], have: dict[str, float]) -> None:
    """Raise when the cluster cannot hold the replicas at all (Ray would wait forever)."""
    for resource, amount in each.items():
        if amount and replicas * amount > have.get(resource, 0) + 1e-9:
            raise ValueError(
                f"{replicas} replicas x {amount:g} {resource} need {replicas * amount:g} "
                f"{resource}s; the Ray cluster has {have.get(resource, 0):g} "
                f"(use fewer --replicas or a smaller --{resource.lower()}s-per-replica)"
            )


_ERROR_TYPES: dict[str, type[Exception]] = {}


def _remote_error(type_name: str, field: str | None, message: str) -> Exception:
    """The replica's error, rebuilt: a `RequestError` as such, else one of the same name."""
    if field is not None:
        from sdkit.request import RequestError

        return RequestError(field, message)
    cls = _ERROR_TYPES.get(type_name)
    if cls is None:
        cls = _ERROR_TYPES[type_name] = type(type_name, (Exception,), {})
    return cls(message)
