"""One engine replica inside a Ray actor process (imported there by `ray_engines`).

The actor runs a job on its own `sdkit.Engine` and streams the job's events back as a Ray
generator: one ordered stream per job, ending with the terminal event, so the server
needs no polling and a dead replica shows as an error raised by the stream itself.
The actor is threaded (``max_concurrency``) so that ``cancel`` and ``check`` are served
while a job streams.  Besides its own model, a replica serves the server's allow-listed
models (``--allow-model``), each loaded on first use and kept (a restarted replica loads
them again when a job asks).  Nothing here imports zmq or the server.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

from sdkit.bridge.ops import public_message


class Replica:
    """The actor's class (wrapped by ``ray.remote`` in `ray_engines`)."""

    def __init__(self, spec: Any, index: int, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)  # a CPU replica uses the CPUs Ray gave it
        import sdkit

        self.engine = sdkit.load(spec)
        self.name = f"{socket.gethostname()}/replica-{index}"
        self._jobs: dict[str, Any] = {}
        self._cancelled: set[str] = set()  # cancels that came before their job's run
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}  # allow-listed spec -> its engine here

    def _engine(self, model: str | None) -> Any:
        """The engine for an allow-listed model spec (None: the replica's own), loaded once."""
        if model is None:
            return self.engine
        engine = self._models.get(model)
        if engine is None:
            import sdkit

            engine = self._models[model] = sdkit.load(model)
        return engine

    def load(self, model: str) -> dict:
        """Load an allow-listed model now (the server's loader waits for every replica)."""
        return self._engine(model).info()

    def placement(self) -> dict:
        """What Ray gave this replica and where its engine runs (for the server's log)."""
        import ray

        return {
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.engine.device),
        }

    def hello(self) -> tuple[str, int, dict]:
        """(name, process id, engine info): what the server shows and the tests kill."""
        return self.name, os.getpid(), self.engine.info()

    def check(self, request: Any, model: str | None = None) -> tuple[Any, tuple[str, str] | None]:
        """(the filled request, None) or (None, (field, message)) of a `RequestError`.

        Input pictures the check left as they came go back as None (the server has them):
        a big img2img picture then crosses the wire once per check, not twice."""
        return self._check(request, model)[1:]

    def _check(self, request: Any, model: str | None) -> tuple[Any, Any, tuple[str, str] | None]:
        """(filled request, what `check` returns: its wire form and the error)."""
        from sdkit.request import RequestError

        engine = self._engine(model)
        try:
            filled = engine.check(request)
        except RequestError as e:
            return None, None, (e.field, public_message(e.message, engine))
        same = {n: None for n in ("image", "mask") if getattr(filled, n) is getattr(request, n)}
        return filled, (dataclasses.replace(filled, **same) if same else filled), None

    def cancel(self, token: str) -> None:
        with self._lock:
            job = self._jobs.get(token)
            if job is None and len(self._cancelled) < 1000:  # bounded: late cancels of old jobs
                self._cancelled.add(token)
        if job is not None:
            job.cancel()

    def run(
        self,
        token: str,
        request: Any,
        preview_every: int,
        model: str | None = None,
        check_first: bool = False,
    ) -> Iterator[tuple[str, Any]]:
        """Run one job; yields ("started"|"progress"|"done"|"failed"|"cancelled", payload).

        ``check_first`` (the server's admission of a job to an idle replica): first yields
        ("checked", what `check` returns), and runs the filled request only if it passed,
        so checking and starting cost the server one round trip instead of two."""
        from sdkit.request import RequestError

        if check_first:
            request, *checked = self._check(request, model)
            if request is None:
                yield "checked", tuple(checked)
                return
        events: queue.SimpleQueue = queue.SimpleQueue()
        engine = self._engine(model)
        job = engine.submit(
            request,
            checked=check_first,  # checked by this engine just now
            preview_every=preview_every,
            callback=lambda kind, job, event: events.put((str(kind), event)),
        )
        with self._lock:
            self._jobs[token] = job
            if token in self._cancelled:
                self._cancelled.discard(token)
                job.cancel()
        try:
            if check_first:  # after the job is on its way: it runs while this travels
                yield "checked", tuple(checked)
            while True:
                kind, event = events.get()
                if kind in ("started", "progress"):
                    yield kind, event
                elif kind == "done":
                    yield kind, job.result(0)
                    return
                elif kind == "failed":
                    err = job.error
                    field = err.field if isinstance(err, RequestError) else None
                    message = err.message if isinstance(err, RequestError) else str(err)
                    # the replica's engine knows its adapter folders; the server's view does not
                    yield kind, (type(err).__name__, field, public_message(message, engine))
                    return
                elif kind == "cancelled":
                    yield kind, None
                    return
        finally:
            self._jobs.pop(token, None)
            job.cancel()  # the server stopped reading: never leave it running
