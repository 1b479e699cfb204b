"""The engines a bridge request may name, loaded off the socket thread.

A request names no model (the server's engine) or one of the allow-listed names; a name
that maps to a spec is loaded on first use by a loader thread, so the socket thread keeps
answering every client while weights load.  Client model specs never reach a loader.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from sdkit.bridge import protocol as P
from sdkit.bridge.logs import log_event

Loader = Callable[[Any], Any]


def _sdkit_load(spec: Any) -> Any:
    import sdkit

    return sdkit.load(spec)


class Engines:
    """Name -> engine; `resolve` never blocks.

    ``on_loaded(name)`` is called on the loader thread when a load ends (either way); the
    server then calls `take` on its own thread to get the engine or the error.
    """

    def __init__(
        self,
        engine: Any,
        allowed: Mapping[str, Any] | None,
        on_loaded: Callable[[str], None],
        loader: Loader | None = None,
    ):
        self.engine = engine
        self._allowed = dict(allowed or {})
        self._loaded: dict[str, Any] = {}
        self._loading: set[str] = set()
        self._outcome: dict[str, tuple[Any, BaseException | None]] = {}
        self._lock = threading.Lock()
        self._on_loaded = on_loaded
        # Ray replicas load allowed models on themselves (`RayEngines.load_model`)
        self._load = loader or getattr(engine, "load_model", None) or _sdkit_load

    def _own_names(self) -> tuple[str, ...]:
        info = self.engine.info()
        return (info.get("name") or str(self.engine.spec), str(self.engine.spec))

    def names(self) -> list[str]:
        """The model names a request may use (``hello``'s ``models``)."""
        return sorted({self._own_names()[0], *self._allowed})

    def resolve(self, model: Any, rid: str) -> Any | None:
        """The engine for ``request.model``, or None while it loads (the load is started)."""
        if model is None or model in (*self._own_names(), "default", "embedded"):
            return self.engine
        if not isinstance(model, str):
            raise P.ProtocolError(
                "bad_field", "request.model must be a string", "request.model", rid
            )
        if model not in self._allowed:
            raise P.ProtocolError(
                "model_not_allowed",
                f"model {model!r} is not served here; allowed: {', '.join(self.names())}",
                "request.model",
                rid,
            )
        target = self._allowed[model]
        if not (isinstance(target, str | bytes) or hasattr(target, "__fspath__")):
            return target  # an engine object given by the embedding program
        with self._lock:
            if model in self._loaded:
                return self._loaded[model]
            if model not in self._loading:
                self._loading.add(model)
                threading.Thread(
                    target=self._run, args=(model, target), name=f"sdkit-load-{model}", daemon=True
                ).start()
        return None

    def _run(self, name: str, target: Any) -> None:
        log_event(20, "loading_model", model=name)
        engine, error = None, None
        try:
            engine = self._load(target)
        except BaseException as e:  # noqa: BLE001 - reported to the requests that wait
            error = e
        with self._lock:
            self._loading.discard(name)
            self._outcome[name] = (engine, error)
            if error is None:
                self._loaded[name] = engine
        log_event(20 if error is None else 40, "model_loaded", model=name, error=repr(error))
        self._on_loaded(name)

    def take(self, name: str) -> tuple[Any, BaseException | None]:
        """The outcome of the load of ``name`` that just ended: (engine, None) or (None, error).

        A failed load is forgotten, so a later request tries again.
        """
        with self._lock:
            return self._outcome.pop(name, (self._loaded.get(name), None))
