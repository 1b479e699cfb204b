"""`sdkit batch FILE --out DIR` and `sdkit grid PROMPT --x FIELD=V1,V2 --out DIR`.

Registered through `sdkit.cli.EXTENSIONS` (its own module, so cli.py stays one job). Rows are
read and checked before the model loads. Ctrl-C cancels the job in flight (files already
saved are complete: they are written under a temporary name and renamed) and prints the
summary; a rerun skips what is saved. `--ray ADDRESS` runs the rows on engine replicas in a
Ray cluster (`sdkit.bridge.ray_engines`, the `cluster` extra), looked up by name at run
time only, like the other extensions: the core never imports the bridge or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from sdkit.batch_rows import convert
from sdkit.request import RequestError


def _field_value(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return name.strip(), value


def _common(p: argparse.ArgumentParser) -> None:
    from sdkit.cli import _add_model_options

    p.add_argument("--out", required=True, help="folder for the images (reruns resume there)")
    p.add_argument(
        "--set",
        dest="fields",
        action="append",
        type=_field_value,
        default=[],
        metavar="FIELD=VALUE",
        help="a Request field for every row that does not set it, e.g. --set width=512; repeatable",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on engine replicas in a Ray cluster "
        "('auto': the running cluster or a new local one)",
    )
    p.add_argument("--replicas", type=int, default=1, help="engine replicas with --ray (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    _add_model_options(p)


def register(sub: Any) -> None:
    """Add the `batch` and `grid` subcommands (`sdkit.cli.EXTENSIONS`)."""
    p = sub.add_parser("batch", help="generate every row of a .txt/.jsonl/.csv file or PNG folder")
    p.add_argument(
        "source",
        help=".txt (a prompt a line), .jsonl/.csv (Request fields per row), "
        "or a folder of PNGs to re-run from their parameters",
    )
    _common(p)
    p.set_defaults(func=_batch)
    p = sub.add_parser("grid", help="an X/Y/Z plot: one labelled grid comparing field values")
    p.add_argument("prompt")
    for axis in ("x", "y", "z"):
        p.add_argument(f"--{axis}", metavar="FIELD=V1,V2,...", help=f"the {axis} axis's values")
    _common(p)
    p.set_defaults(func=_grid)


def _executor(args: argparse.Namespace) -> Any:
    if args.ray:
        try:
            ray_engines = importlib.import_module("sdkit.bridge.ray_engines")
        except ImportError as e:
            raise RequestError(
                "ray", f"needs the cluster extra (pip install sdkit[cluster]): {e}"
            ) from e
        return ray_engines.RayEngines(args.model, args.replicas, address=args.ray)
    from sdkit.api import load
    from sdkit.cli import _load_options

    return load(args.model, device=args.device, dtype=args.dtype, **_load_options(args))


def _batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdkit.batch import Batch
    from sdkit.batch_rows import read_rows

    rows = read_rows(args.source, dict(args.fields))  # a bad row fails before the model loads
    executor = _executor(args)
    run = Batch(
        rows,
        executor,
        _out(args),
        window=max(2, len(getattr(executor, "names", ())) + 1),
        seed=True,
    )
    bar = tqdm(total=len(rows), unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    try:
        for item in run:
            if item.status == "skipped":  # not made now: out of the rate and the ETA
                bar.total -= 1
                bar.refresh()
            else:
                bar.update(1)
            bar.set_postfix_str(f"{run.summary.skipped} skipped, {len(run.summary.failed)} failed")
    except KeyboardInterrupt:
        run.close()  # cancels the job in flight
        _wait_idle(executor)
        bar.close()
        print(f"interrupted: {run.summary} (rerun to resume)", file=sys.stderr)
        return 130
    finally:
        bar.close()
        if args.ray:
            executor.close()
    if not args.quiet:
        print(run.summary, file=sys.stderr)
    return 1 if run.summary.failed else 0


def _wait_idle(executor: Any, timeout: float = 30.0) -> None:
    """Let a cancelled job leave torch before the interpreter exits: a worker thread still
    inside a torch op at exit aborts the process ("terminate called without an active
    exception", exit status -6 instead of 130)."""
    import time

    deadline = time.monotonic() + timeout
    while getattr(executor, "current_job", None) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


def _out(args: argparse.Namespace) -> Any:
    from pathlib import Path

    return Path(args.out).expanduser()


def _grid(args: argparse.Namespace) -> int:
    from sdkit.grid import grid, parse_axis

    axes = {a: parse_axis(getattr(args, a), a) for a in ("x", "y", "z") if getattr(args, a)}
    fields = {name: convert(name, value) for name, value in args.fields}
    executor = _executor(args)
    try:
        result = grid(args.prompt, **axes, out=_out(args), executor=executor, **fields)
    finally:
        if args.ray:
            executor.close()
    print(result.path)
    if not args.quiet:
        w, h = result.image.size
        print(f"grid: {len(result.images)} cells, {w}x{h}", file=sys.stderr)
    return 0
