"""Connect to (or start) the Ray cluster that runs the engine replicas (`ray_engines`).

Its own module because a loaded machine needs a workaround at start-up (fixed agent ports)
that has nothing to do with dispatching jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from sdkit.bridge.logs import log_event


def start_ray(
    address: str | None = "auto", num_cpus: int | None = None, num_gpus: int | None = None
) -> Any:
    """Connect to a Ray cluster (``auto``: the running one, else a new local one; or an
    address such as ``ray://head:10001`` / ``head:6379``); returns the ray module.

    ``num_cpus``/``num_gpus`` declare a new local cluster's resources (default: what Ray
    detects); declared GPUs need not exist, which lets tests check placement on a CPU box."""
    import ray

    target = None if address in (None, "", "auto", "local") else address
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            with _fixed_agent_ports():
                ray.init(
                    address=target,
                    num_cpus=num_cpus if target is None else None,
                    num_gpus=num_gpus if target is None else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        except Exception as e:  # noqa: BLE001 - a slow machine: Ray's own 30 s start-up limit
            if target is not None or "timed out during startup" not in str(e) or attempt == 2:
                raise
            log_event(logging.WARNING, "ray_start_retry", error=str(e))
            ray.shutdown()
    return ray


@contextlib.contextmanager
def _fixed_agent_ports() -> Iterator[None]:
    """Start a local node with its agents' ports chosen up front.

    Left at 0, each agent writes its port to a file that the raylet waits for, 30 s at
    most: on a loaded machine the agent (which imports much of Ray) takes longer and the
    raylet aborts ("Timed out waiting for file .../metrics_agent_port_...").  With the
    ports given, nothing waits for those files.
    """
    from ray._private import parameter

    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")  # the raylet's wait

    original = parameter.RayParams.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        for name in (
            "metrics_agent_port",
            "dashboard_agent_listen_port",
            "runtime_env_agent_port",
            "metrics_export_port",
        ):
            if not getattr(self, name, None):
                setattr(self, name, _free_port())

    parameter.RayParams.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original  # type: ignore[method-assign]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
