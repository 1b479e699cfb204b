"""`sdkit.batch`: many requests, each image saved with its infotext, resumable.

Why it is shaped this way:
- The executor is anything with `check(request) -> Request` and `submit(request) -> job`
  (the job: `result()`, `cancel()`): a local `Engine` by default, or engine replicas on Ray
  (`sdkit.bridge.ray_engines.RayEngines`), which the core never imports. A few jobs stay in
  flight (`window`) so every replica has work while the results come back in row order.
- Names are stable: `<row>-<hash>.png`, the hash taken over the parameters the image will
  carry (the request as the engine fills it, seed included; a row without a seed gets one
  derived from the row, so a rerun makes the same image). A rerun skips a row only when its
  files exist and carry exactly those parameters; anything else is regenerated. A row whose
  parameters changed gets a new name and its old files are removed.
- Files are written to a hidden temporary name and renamed: what is saved is complete,
  even when SIGINT stops the batch mid-write.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import sys
import types
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, PngImagePlugin

from sdkit.batch_rows import Row, RowError, read_rows
from sdkit.request import MAX_IMAGES, MAX_SEED, Request, RequestError

__all__ = ["Batch", "BatchItem", "Executor", "Row", "RowError", "Summary", "batch", "read_rows"]


class Executor(Protocol):
    """What runs a batch's requests: `sdkit.Engine`, or replicas with the same two methods."""

    def check(self, request: Request) -> Request: ...
    def submit(self, request: Request) -> Any: ...  # a job: result(), cancel()


@dataclass
class BatchItem:
    """The outcome of one row: status "done", "skipped" (its files were there) or "failed"."""

    index: int
    label: str
    status: str
    request: Request  # as it ran (filled by the engine) when it got that far, else as read
    paths: list[Path] = field(default_factory=list)
    result: Any = None  # the `Result` of a row that ran
    error: str | None = None


@dataclass
class Summary:
    """What a batch did so far; `str()` is the CLI's last line."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (row label, reason)

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.skipped - len(self.failed)

    def __str__(self) -> str:
        text = f"{self.done} done, {self.skipped} skipped, {len(self.failed)} failed"
        if self.remaining:
            text += f", {self.remaining} not run"
        return text + "".join(f"\n  {label}: {reason}" for label, reason in self.failed)


def row_seed(row: Row) -> int:
    """A seed for a row that gives none: derived from the row, so reruns reproduce it."""
    data = json.dumps(row.request.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{row.index}\n{data}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED - MAX_IMAGES)


def infotexts(checked: Request) -> list[str]:
    """The `parameters` each of the request's images will carry (image i: seed + i)."""
    assert checked.seed is not None
    return [checked.to_infotext(seed=checked.seed + i) for i in range(checked.num_images)]


def file_names(row: Row, texts: list[str]) -> list[str]:
    """`00001-<hash>.png` (`-<n>` added per image when a row makes several)."""
    digest = hashlib.sha256("\n\0".join(texts).encode()).hexdigest()[:10]
    stem = f"{row.index + 1:05d}-{digest}"
    if len(texts) == 1:
        return [f"{stem}.png"]
    return [f"{stem}-{i + 1}.png" for i in range(len(texts))]


def saved_parameters(path: Path) -> str | None:
    """The `parameters` of a complete PNG at `path`, or None (missing, truncated, none)."""
    try:
        with Image.open(path) as im:
            im.load()
            text = im.info.get("parameters")
    except (OSError, ValueError, SyntaxError):
        return None
    return text if isinstance(text, str) else None


def save_png(image: Image.Image, text: str, path: Path) -> None:
    """Write `image` with its infotext to `path` atomically (a temporary name, renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Batch(Iterator[BatchItem]):
    """A lazy run over rows: nothing is checked or generated until it is iterated. Closing it
    (or leaving a `for` loop early, or Ctrl-C) cancels the jobs in flight; `summary` is kept."""

    def __init__(
        self, rows: list[Row], executor: Executor, out: Path | None, window: int, seed: bool
    ):
        self.rows = rows
        self.executor = executor
        self.out = out
        self.window = max(1, window)
        self.fill_seeds = seed
        self.summary = Summary(total=len(rows))
        self._gen = self._run()

    def __len__(self) -> int:
        return len(self.rows)

    def __next__(self) -> BatchItem:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> Generator[BatchItem, None, None]:
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        slots: collections.deque[tuple[Row, Request, list[str], Any] | BatchItem] = (
            collections.deque()
        )
        rows = iter(self.rows)
        running = 0
        try:
            while True:
                while running < self.window:
                    row = next(rows, None)
                    if row is None:
                        break
                    slot = self._start(row)
                    running += not isinstance(slot, BatchItem)
                    slots.append(slot)
                if not slots:
                    return
                slot = slots.popleft()
                if not isinstance(slot, BatchItem):
                    running -= 1
                    slot = self._finish(*slot)
                self._count(slot)
                yield slot
        finally:
            for slot in slots:
                if not isinstance(slot, BatchItem):
                    slot[3].cancel()

    def _start(self, row: Row) -> tuple[Row, Request, list[str], Any] | BatchItem:
        """Check the row; a `BatchItem` when it is skipped or refused, else its job."""
        req = row.request
        if req.seed is None and self.fill_seeds:
            req = dataclasses.replace(req, seed=row_seed(row))
        try:
            checked = self.executor.check(req)
            texts = infotexts(checked)
            if self.out is not None:
                paths = [self.out / n for n in file_names(row, texts)]
                if all(saved_parameters(p) == t for p, t in zip(paths, texts, strict=True)):
                    return BatchItem(row.index, row.label, "skipped", checked, paths)
            return (row, checked, texts, self.executor.submit(checked))
        except RequestError as e:
            return BatchItem(row.index, row.label, "failed", req, error=str(e))

    def _finish(self, row: Row, checked: Request, texts: list[str], job: Any) -> BatchItem:
        try:
            result = job.result()
        except Exception as e:  # noqa: BLE001 - one row's failure is reported, others go on
            reason = str(e) or type(e).__name__
            return BatchItem(row.index, row.label, "failed", checked, error=reason)
        paths: list[Path] = []
        if self.out is not None:
            names = file_names(row, texts)
            actual = list(result.infotexts)
            if actual != texts:  # the engine wrote other parameters: name the files by those
                names = file_names(row, actual)
            paths = [self.out / n for n in names]
            for image, text, path in zip(result.images, actual, paths, strict=True):
                save_png(image, text, path)
            for old in self.out.glob(f"{row.index + 1:05d}-*.png"):
                if old not in paths:  # the row's earlier parameters: superseded
                    old.unlink(missing_ok=True)
        return BatchItem(row.index, row.label, "done", result.request, paths, result)

    def _count(self, item: BatchItem) -> None:
        if item.status == "done":
            self.summary.done += 1
        elif item.status == "skipped":
            self.summary.skipped += 1
        else:
            self.summary.failed.append((item.label, item.error or "failed"))


def batch(
    requests: Any,
    *,
    out: str | Path | None = None,
    model: Any = None,
    executor: Executor | None = None,
    window: int | None = None,
    seed_rows: bool = True,
    **fields: Any,
) -> Batch:
    """Run many requests; returns a lazy iterator of `BatchItem`s, one per request, in order.

    `requests`: a `.txt`/`.jsonl`/`.csv` file, a folder of PNGs (re-run from their infotext),
    or an iterable of `Request`s, field dicts or prompts (`sdkit.batch_rows.read_rows`; a bad
    row raises a `RowError` naming the row and the field, before anything runs).
    `out`: a folder; each image is saved there with its infotext as `<row>-<hash>.png`, and
    rows whose files already carry the right parameters are skipped (resume).
    `model`: a spec or `Engine` (default: the embedded model); `executor`: anything with
    `check` and `submit` instead (e.g. Ray replicas). `window`: jobs kept in flight (default:
    replicas + 1). `seed_rows`: give seedless rows a seed derived from the row (reruns
    reproduce them). `fields`: Request fields for every row that does not set them.
    A row the engine refuses, or whose job fails, is a "failed" item (see `.summary`)."""
    rows = read_rows(requests, fields)
    if executor is None:
        from sdkit.api import _engine

        executor = _engine(model)
    if window is None:
        window = max(2, len(getattr(executor, "names", ())) + 1)
    return Batch(rows, executor, None if out is None else Path(out).expanduser(), window, seed_rows)


class _CallableModule(types.ModuleType):
    """`import sdkit.batch` binds the module over the function `sdkit.batch`; calling the
    module calls the function, so `sdkit.batch(...)` works whatever was imported first."""

    def __call__(self, *args: Any, **kwargs: Any) -> Batch:
        return batch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
