"""``sdkit serve`` and ``sdkit keys``.

`sdkit.cli` calls `register(subparsers)` lazily; ``python -m sdkit.bridge.cli`` runs the
same commands on their own.  ``serve --ray`` runs engine replicas on a Ray cluster
(`ray_engines`); ``--workers N`` is ``--ray auto --replicas N``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

DEFAULT_BIND = "tcp://127.0.0.1:5555"  # = sdkit.bridge.server.DEFAULT_BIND, without importing zmq


def _log_setup(level: str) -> None:
    from sdkit.bridge.logs import json_log_handler

    logger = logging.getLogger("sdkit.bridge")
    logger.setLevel(getattr(logging, level.upper()))
    if not any(getattr(h, "_sdkit_json", False) for h in logger.handlers):
        handler = json_log_handler(sys.stderr, logger.level)
        handler._sdkit_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def _wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM."""
    done = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not done.wait(0.5):
        pass


def _limits(args: argparse.Namespace):
    from sdkit.bridge.protocol import Limits

    base = Limits()
    return Limits(
        max_message_bytes=args.max_message_bytes or base.max_message_bytes,
        max_pixels=args.max_pixels or base.max_pixels,
        max_queued_per_client=args.max_queued or base.max_queued_per_client,
        max_queued=args.max_queued_total or base.max_queued,
        max_images=args.max_images or base.max_images,
        max_steps=args.max_steps or base.max_steps,
    )


def _allowed(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        name, sep, spec = pair.partition("=")
        if not sep or not name or not spec:
            raise SystemExit(f"--allow-model needs NAME=SPEC, got {pair!r}")
        out[name] = spec
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from sdkit.bridge import security

    try:
        security.check_bind(args.bind, args.keys)
    except security.SecurityError as e:
        print(f"sdkit serve: {e}", file=sys.stderr)
        return 2
    _log_setup(args.log_level)
    if args.workers:
        args.ray, args.replicas = args.ray or "auto", args.workers
    from sdkit.bridge.server import Server

    if args.ray is not None:
        try:
            from sdkit.bridge.ray_engines import RayEngines
        except ImportError:  # pragma: no cover - depends on the install
            print(
                "sdkit serve --ray needs Ray: pip install 'sdkit-studio[cluster]'", file=sys.stderr
            )
            return 2
        engine: Any = RayEngines(
            args.model,
            args.replicas,
            address=args.ray,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
            max_restarts=args.max_restarts,
        )
        banner = f"sdkit bridge: {{address}} ({len(engine.names)} Ray replicas of {args.model or 'the embedded model'})"
    else:
        import sdkit

        engine = sdkit.load(args.model)
        banner = f"sdkit bridge: {{address}} ({engine.spec})"
    server = Server(
        engine,
        bind=args.bind,
        keys=args.keys,
        limits=_limits(args),
        models=_allowed(args.allow_model),
    )
    return _run_until_signal(server, engine, banner)


def _run_until_signal(server: Any, engine: Any, banner: str) -> int:
    """Serve until SIGTERM/SIGINT; `banner` may name `{address}` (known once bound)."""
    server.start()
    print(banner.replace("{address}", server.address), flush=True)
    try:
        _wait_for_signal()
    finally:
        # In order: the socket and its context (clients get ``shutdown``), then the engine's
        # threads, so that nothing runs native code while the interpreter exits.
        server.stop()
        engine.close()
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from sdkit.bridge import security

    paths = security.create_keys(args.dir, args.client)
    for k, p in paths.items():
        print(f"{k}: {p}")
    print(
        f"Start the server with --keys {args.dir}; give the client {paths['client_secret'].name} "
        f"and {paths['server_public'].name}."
    )
    return 0


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``keys`` to an argparse subparsers object (no zmq import)."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="model spec (default: the embedded model)")
        p.add_argument(
            "--allow-model",
            action="append",
            metavar="NAME=SPEC",
            help="let clients ask for model NAME (repeatable); nothing else is ever loaded",
        )
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    p = subparsers.add_parser("serve", help="serve the bridge for Krita, GIMP and scripts")
    common(p)
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"ZeroMQ address (default {DEFAULT_BIND})")
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|ADDRESS",
        help="run the engines as Ray actors: auto (the running cluster, else a local one) "
        "or a cluster address (pip install 'sdkit-studio[cluster]')",
    )
    p.add_argument("--replicas", type=int, default=1, help="engine replicas on Ray (with --ray)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="N replicas on a local Ray cluster (= --ray --replicas N)",
    )
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        metavar="G",
        help="GPUs each replica reserves (default: 1 when the Ray cluster has GPUs, else 0 = "
        "CPU replicas); fractions pack replicas, 0.5 = two per GPU; Ray sets each replica's "
        "CUDA_VISIBLE_DEVICES to the GPU it got",
    )
    p.add_argument(
        "--cpus-per-replica",
        type=float,
        default=1.0,
        help="CPUs each replica reserves (also its torch threads; default 1)",
    )
    p.add_argument("--max-restarts", type=int, default=3, help="Ray restarts of a dead replica")
    p.add_argument("--keys", default=None, help="CurveZMQ key folder (needed off loopback)")
    p.add_argument("--max-queued", type=int, default=None, help="unfinished requests per client")
    p.add_argument("--max-queued-total", type=int, default=None, help="unfinished requests")
    p.add_argument("--max-pixels", type=int, default=None, help="pixels per picture and job")
    p.add_argument("--max-images", type=int, default=None, help="num_images per request")
    p.add_argument("--max-steps", type=int, default=None, help="steps per request")
    p.add_argument("--max-message-bytes", type=int, default=None, help="bytes per message")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("keys", help="create CurveZMQ key pairs for the bridge")
    p.add_argument("dir", help="key folder (created)")
    p.add_argument("--client", default="client", help="name of the client key pair to add")
    p.set_defaults(func=cmd_keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdkit-bridge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
