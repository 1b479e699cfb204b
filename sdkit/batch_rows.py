"""Rows of a batch: `Request`s read from a `.txt`, `.jsonl` or `.csv` file or a folder of PNGs.

Its own module so that a bad file is refused before any model loads, with an error that
names the row and the field (`RowError`), and so that `sdkit.grid` and the CLI share one
text-to-field conversion (`convert`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkit.request import Request, RequestError

_FIELDS = {f.name: str(f.type) for f in dataclasses.fields(Request)}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class RowError(RequestError):
    """A bad field of one row: `row` names it ("prompts.csv row 3"), `field` the field."""

    def __init__(self, row: str, field: str, message: str):
        super().__init__(field, message)
        self.row = row
        self.args = (f"{row}: {field}: {message}",)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return (type(self), (self.row, self.field, self.message))


@dataclass
class Row:
    """One request of a batch and where it came from (for messages)."""

    index: int  # 0-based position in the batch; the saved file names start with index + 1
    label: str  # "prompts.csv row 3", "old/00012.png", "request 4"
    request: Request


def convert(field: str, value: Any) -> Any:
    """`value` (text from a CSV cell, a grid axis or a CLI flag) as `field`'s type; values that
    are not text pass through. A `RequestError` names the field."""
    kind = _FIELDS.get(field)
    if kind is None:
        raise RequestError(field, f"unknown field; known fields: {', '.join(_FIELDS)}")
    if not isinstance(value, str):
        return value
    text = value.strip()
    if "None" in kind and text.lower() in ("", "none", "default"):
        return None
    try:
        if kind.startswith("int"):
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise RequestError(field, f"{value!r} is not a number") from None
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise RequestError(field, f"{value!r} is not true or false")
    if kind.startswith(("list", "dict")):
        try:
            return json.loads(text)
        except ValueError:
            raise RequestError(field, f"{value!r} is not JSON") from None
    return value


def make(label: str, fields: Mapping[str, Any], defaults: Mapping[str, Any]) -> Request:
    """A Request from one row's fields over the batch's defaults; errors name the row."""
    merged = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
    try:
        values = {k: convert(k, v) for k, v in merged.items()}
        return Request.from_dict(values)
    except RowError:
        raise
    except RequestError as e:
        raise RowError(label, e.field, e.message) from None
    except TypeError as e:  # a value of the wrong shape for from_dict
        raise RowError(label, "request", str(e)) from None


def read_rows(source: Any, defaults: Mapping[str, Any] | None = None) -> list[Row]:
    """The batch's rows: `source` is a path (`.txt`: one prompt a line, blank and `#` lines
    skipped; `.jsonl`: one object of Request fields a line; `.csv`: a header of Request
    field names, empty cells take the default; a folder: its PNGs, re-run from their
    infotext) or an iterable of `Request`s, dicts of fields or prompt strings.
    `defaults`: fields every row gets unless it sets them (PNG rows keep their own)."""
    defaults = dict(defaults or {})
    for name in defaults:
        convert(name, defaults[name])  # unknown names fail here, before any row
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if path.is_dir():
            items = _png_rows(path)
        elif path.suffix.lower() == ".txt":
            items = _txt_rows(path, defaults)
        elif path.suffix.lower() == ".jsonl":
            items = _jsonl_rows(path, defaults)
        elif path.suffix.lower() == ".csv":
            items = _csv_rows(path, defaults)
        elif not path.exists():
            raise RequestError("source", f"{path} does not exist")
        else:
            raise RequestError(
                "source", f"{path}: expected a .txt, .jsonl or .csv file or a folder of PNGs"
            )
    else:
        items = _object_rows(source, defaults)
    return [Row(i, label, req) for i, (label, req) in enumerate(items)]


def _txt_rows(path: Path, defaults: Mapping[str, Any]) -> list[tuple[str, Request]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            label = f"{path.name} line {n}"
            out.append((label, make(label, {"prompt": line.strip()}, defaults)))
    return out


def _jsonl_rows(path: Path, defaults: Mapping[str, Any]) -> list[tuple[str, Request]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label = f"{path.name} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise RowError(label, "request", f"not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise RowError(label, "request", f"expected an object, got {type(obj).__name__}")
        out.append((label, make(label, obj, defaults)))
    return out


def _csv_rows(path: Path, defaults: Mapping[str, Any]) -> list[tuple[str, Request]]:
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for name in reader.fieldnames or []:
            if name not in _FIELDS:
                raise RowError(
                    f"{path.name} header", name, f"unknown field; known: {', '.join(_FIELDS)}"
                )
        for n, cells in enumerate(reader, 1):
            label = f"{path.name} row {n}"
            if None in cells:
                raise RowError(label, "request", "more cells than the header names")
            fields = {k: v for k, v in cells.items() if v is not None and v.strip() != ""}
            out.append((label, make(label, fields, defaults)))
    return out


def _png_rows(folder: Path) -> list[tuple[str, Request]]:
    out = []
    for path in sorted(folder.glob("*.png")):
        label = f"{folder.name}/{path.name}"
        try:
            out.append((label, Request.from_png(path)))
        except RequestError as e:
            raise RowError(label, e.field, e.message) from None
    if not out:
        raise RequestError("source", f"{folder} holds no .png files")
    return out


def _object_rows(items: Iterable[Any], defaults: Mapping[str, Any]) -> list[tuple[str, Request]]:
    out = []
    for n, item in enumerate(items, 1):
        label = f"request {n}"
        if isinstance(item, Request):
            over = {k: v for k, v in defaults.items() if getattr(item, k) is None}
            out.append((label, dataclasses.replace(item, **over) if over else item))
        elif isinstance(item, str):
            out.append((label, make(label, {"prompt": item}, defaults)))
        elif isinstance(item, Mapping):
            out.append((label, make(label, item, defaults)))
        else:
            raise RowError(label, "request", f"expected a Request, dict or prompt, got {item!r}")
    return out
