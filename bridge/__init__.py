"""sdkit.bridge: Stable Diffusion for Krita, GIMP and other programs over ZeroMQ.

`serve(engine)` runs the server in a background thread (e.g. next to the notebook widget,
sharing its engine); `Client` talks to it from Python.  `protocol` and `zmtp` are standard
library only, for editors whose Python has no pyzmq.  pyzmq is imported only when a
server or a pyzmq client is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "BridgeError",
    "Client",
    "PROTOCOL_VERSION",
    "SecurityError",
    "Server",
    "ServerHandle",
    "serve",
]

PROTOCOL_VERSION = 1

_LAZY = {
    "serve": "sdkit.bridge.server",
    "ServerHandle": "sdkit.bridge.server",
    "Server": "sdkit.bridge.server",
    "Client": "sdkit.bridge.client",
    "BridgeError": "sdkit.bridge.client",
    "SecurityError": "sdkit.bridge.security",
}

if TYPE_CHECKING:
    from sdkit.bridge.client import BridgeError, Client
    from sdkit.bridge.security import SecurityError
    from sdkit.bridge.server import Server, ServerHandle, serve


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdkit.bridge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
