"""``sdkit serve``, ``sdkit worker`` and ``sdkit keys``.

`sdkit.cli` calls `register(subparsers)` lazily; ``python -m sdkit.bridge.cli`` runs the
same commands on their own (scale-out uses it to start worker processes).
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
    if args.workers and args.workers > 0:
        from sdkit.bridge import scaleout

        broker = scaleout.Broker(args.bind, args.back, keys=args.keys, limits=_limits(args))
        broker.start()
        procs = scaleout.spawn_workers(
            args.workers, str(broker.back_address), args.model, args.keys
        )
        print(
            f"sdkit bridge: {broker.front_address} ({args.workers} workers on {broker.back_address})",
            flush=True,
        )
        try:
            _wait_for_signal()
        finally:
            # The broker first: libzmq aborted when workers vanished under a running broker.
            broker.stop()
            scaleout.stop_workers(procs)
        return 0
    from sdkit.bridge.server import Server

    import sdkit

    engine = sdkit.load(args.model)
    server = Server(
        engine,
        bind=args.bind,
        keys=args.keys,
        limits=_limits(args),
        models=_allowed(args.allow_model),
    )
    return _run_until_signal(server, engine, f"sdkit bridge: {{address}} ({engine.spec})")


def cmd_worker(args: argparse.Namespace) -> int:
    _log_setup(args.log_level)
    from sdkit.bridge.server import Server

    import sdkit

    client_keys = None
    if args.keys:
        from sdkit.bridge import security

        client_keys = security.load_client_keys(args.keys, args.client_name)
    engine = sdkit.load(args.model)
    server = Server(
        engine, connect=args.connect, client_keys=client_keys, models=_allowed(args.allow_model)
    )
    banner = f"sdkit worker {server.name}: connected to {args.connect} ({engine.spec})"
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
    """Add ``serve``, ``worker`` and ``keys`` to an argparse subparsers object (no zmq import)."""

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
    p.add_argument("--workers", type=int, default=0, help="N worker processes behind a proxy")
    p.add_argument("--back", default="tcp://127.0.0.1:*", help="the proxy's worker address")
    p.add_argument("--keys", default=None, help="CurveZMQ key folder (needed off loopback)")
    p.add_argument("--max-queued", type=int, default=None, help="unfinished requests per client")
    p.add_argument("--max-queued-total", type=int, default=None, help="unfinished requests")
    p.add_argument("--max-pixels", type=int, default=None, help="pixels per picture and job")
    p.add_argument("--max-images", type=int, default=None, help="num_images per request")
    p.add_argument("--max-steps", type=int, default=None, help="steps per request")
    p.add_argument("--max-message-bytes", type=int, default=None, help="bytes per message")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "worker", help="an engine that serves requests from `serve --workers`"
    )
    common(p)
    p.add_argument("--connect", required=True, help="the proxy's worker address")
    p.add_argument("--keys", default=None, help="key folder when the proxy uses CurveZMQ")
    p.add_argument("--client-name", default="client", help="key pair name in --keys")
    p.set_defaults(func=cmd_worker)

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
