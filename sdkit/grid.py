"""`sdkit.grid`: A1111's X/Y/Z plot. One request, up to three axes of (field, values); every
cell runs through `sdkit.batch` (so Ray replicas run cells in parallel), and the cells are
laid out unscaled with their labels drawn in: the x values above the columns, the y values
left of the rows, one grid per z value side by side under its own title.

All cells share one seed (picked once when the request has none): the axes are the only
difference between cells, which is what a comparison needs. Axis values are checked by the
engine before anything runs; an error names the axis and the field.
"""

from __future__ import annotations

import dataclasses
import random
import re
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sdkit.batch import BatchItem, Executor, save_png
from sdkit.batch import batch as run_batch
from sdkit.batch_rows import convert
from sdkit.request import MAX_IMAGES, MAX_SEED, Request, RequestError

__all__ = ["Grid", "grid", "parse_axis", "draw_grid"]
Axis = tuple[str, Sequence[Any]]
PAD = 6  # pixels around label text
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass
class Grid:
    """The labelled grid `image`, the cell `images` (z, then y, then x order) with their
    `boxes` (left, top, right, bottom) in `image`, and the batch items that made them."""

    image: Image.Image
    images: list[Image.Image]
    boxes: list[tuple[int, int, int, int]]
    items: list[BatchItem]
    axes: dict[str, Axis]
    path: Path | None = None  # where the grid was saved (`out`)
    request: Request | None = None  # the request the axes vary (seed filled in)

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def parse_axis(text: str, axis: str = "x") -> Axis:
    """`"guidance_scale=3,5,7"` -> ("guidance_scale", [3.0, 5.0, 7.0]) (the CLI's form)."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise RequestError(axis, f"expected FIELD=V1,V2,..., got {text!r}")
    return name.strip(), [v.strip() for v in values.split(",") if v.strip()]


def _label(name: str, value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{name}: {value}"


def _cells(request: Request, axes: dict[str, Axis], executor: Executor) -> list[Request]:
    """One request per cell (z, y, x order), every axis value checked by the engine."""
    for axis, (name, values) in axes.items():
        if not values:
            raise RequestError(name, f"axis {axis} has no values")
        typed = []
        for v in values:
            try:
                value = convert(name, v)
                if name in ("mode", "image", "mask", "extra"):
                    raise RequestError(name, "cannot be a grid axis")
                executor.check(dataclasses.replace(request, **{name: value}))
            except RequestError as e:
                where = "" if e.field == name else f" ({e.field})"
                raise RequestError(name, f"axis {axis} value {v!r}{where}: {e.message}") from None
            typed.append(value)
        axes[axis] = (name, typed)
    zs = axes.get("z", ("", [None]))
    ys = axes.get("y", ("", [None]))
    xs = axes.get("x", ("", [None]))
    cells = []
    for z in zs[1]:
        for y in ys[1]:
            for x in xs[1]:
                over = {}
                for (name, _), value in ((zs, z), (ys, y), (xs, x)):
                    if name:
                        over[name] = value
                cells.append(dataclasses.replace(request, **over))
    return cells


def grid(
    request: Request | str,
    x: Axis | None = None,
    y: Axis | None = None,
    z: Axis | None = None,
    *,
    out: str | Path | None = None,
    model: Any = None,
    executor: Executor | None = None,
    **fields: Any,
) -> Grid:
    """A labelled grid comparing the values of up to three fields, e.g.
    `sdkit.grid("a red circle", x=("guidance_scale", [3, 5, 7]), y=("scheduler", ["Euler a",
    "DPM++ 2M"]))`. `request`: a Request or a prompt (`fields` are Request fields for it).
    `out`: a folder for the cells (saved by `sdkit.batch`, resumable) and `grid.png`.
    Raises a `RequestError` naming the axis and field for a bad value, before any cell runs,
    and a `RuntimeError` naming the cells that failed."""
    if isinstance(request, str):
        request = Request(prompt=request, **{k: convert(k, v) for k, v in fields.items()})
    elif fields:
        request = dataclasses.replace(request, **{k: convert(k, v) for k, v in fields.items()})
    axes = {name: a for name, a in (("x", x), ("y", y), ("z", z)) if a is not None}
    if not axes:
        raise RequestError("x", "a grid needs at least one axis")
    if executor is None:
        from sdkit.api import _engine

        executor = _engine(model)
    if request.seed is None:
        request = dataclasses.replace(request, seed=random.randrange(MAX_SEED - MAX_IMAGES))
    cells = _cells(request, axes, executor)
    folder = None if out is None else Path(out).expanduser()
    items = list(run_batch(cells, out=folder, executor=executor, seed_rows=False))
    failed = [f"cell {i.index + 1}: {i.error}" for i in items if i.status == "failed"]
    if failed:
        raise RuntimeError("grid cells failed: " + "; ".join(failed))
    images = [item.result[0] if item.result is not None else _open(item.paths[0]) for item in items]
    image, boxes = draw_grid(images, axes)
    path = None
    if folder is not None:
        path = folder / "grid.png"
        save_png(image, request.to_infotext(), path)
    return Grid(image, images, boxes, items, axes, path, request)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


# ---------------------------------------------------------------------------- drawing


def font_for(cell: tuple[int, int]) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's default font at a size readable at 100 % (16 px at least; larger for big cells)."""
    size = max(16, min(cell) // 16)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width: int, font: Any) -> list[str]:
    """Lines of `text` no wider than `width`: broken at spaces, then after "_", then anywhere."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for piece in re.findall(r"[^_]*_|[^_]+", word):
            if font.getlength(line + piece) <= width:
                line += piece
                continue
            if line:
                lines.append(line)
                line = ""
            for ch in piece:
                if line and font.getlength(line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
    if line:
        lines.append(line)
    return lines


def _line_height(font: Any) -> int:
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 4


def _text_block(lines: list[str], font: Any) -> int:
    return len(lines) * _line_height(font)


def _draw_lines(
    draw: ImageDraw.ImageDraw, lines: list[str], box: tuple[int, int, int, int], font: Any
) -> None:
    """Draw `lines` centred in `box`."""
    left, top, right, bottom = box
    h = _line_height(font)
    y = top + (bottom - top - len(lines) * h) // 2
    for line in lines:
        w = font.getlength(line)
        draw.text((left + (right - left - w) / 2, y), line, fill=INK, font=font)
        y += h


def draw_grid(
    images: list[Image.Image], axes: dict[str, Axis]
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Lay out `images` (z, y, x order) unscaled, labels drawn in; returns the picture and
    each image's box in it."""
    xs = axes.get("x", ("", [None]))
    ys = axes.get("y", ("", [None]))
    zs = axes.get("z", ("", [None]))
    cols, rows = len(xs[1]), len(ys[1])
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    font = font_for((cw, ch))
    col_lines = [_wrap(_label(xs[0], v), cw - 2 * PAD, font) for v in xs[1]] if xs[0] else []
    top = max((_text_block(ls, font) for ls in col_lines), default=-2 * PAD) + 2 * PAD
    left = 0
    row_lines: list[list[str]] = []
    if ys[0]:
        labels = [_label(ys[0], v) for v in ys[1]]
        widest = max(font.getlength(t) for t in labels)
        left = int(min(widest, max(cw, 12 * font.size if hasattr(font, "size") else cw))) + 2 * PAD
        row_lines = [_wrap(t, left - 2 * PAD, font) for t in labels]
    title_lines = [_wrap(_label(zs[0], v), left + cols * cw - 2 * PAD, font) for v in zs[1]]
    title = max((_text_block(ls, font) for ls in title_lines), default=0) + 2 * PAD if zs[0] else 0
    one_w, one_h = left + cols * cw, title + top + rows * ch
    gap = 2 * PAD if len(zs[1]) > 1 else 0
    sheet = Image.new("RGB", (len(zs[1]) * one_w + (len(zs[1]) - 1) * gap, one_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    boxes: list[tuple[int, int, int, int]] = []
    n = 0
    for k in range(len(zs[1])):
        x0 = k * (one_w + gap)
        if zs[0]:
            _draw_lines(draw, title_lines[k], (x0, 0, x0 + one_w, title), font)
        for c, lines in enumerate(col_lines):
            cx = x0 + left + c * cw
            _draw_lines(draw, lines, (cx, title, cx + cw, title + top), font)
        for r, lines in enumerate(row_lines):
            cy = title + top + r * ch
            _draw_lines(draw, lines, (x0, cy, x0 + left, cy + ch), font)
        for r in range(rows):
            for c in range(cols):
                im = images[n]
                px, py = x0 + left + c * cw, title + top + r * ch
                sheet.paste(im.convert("RGB"), (px, py))
                boxes.append((px, py, px + im.width, py + im.height))
                n += 1
    return sheet, boxes


class _CallableModule(types.ModuleType):
    """`import sdkit.grid` binds the module over the function `sdkit.grid`; calling the
    module calls the function, so `sdkit.grid(...)` works whatever was imported first."""

    def __call__(self, *args: Any, **kwargs: Any) -> Grid:
        return grid(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
