"""Outpainting (issue 15.3): extend the canvas on any side and paint the new area.

The canvas grows by `left/right/top/bottom` pixels; the new area starts from `extend_fill`
("stretch": the edge pixels drawn outward, "noise": seeded noise, "colour": the mean colour
of the original's extended edges) and is inpainted through the engine's inpaint pipeline
with a mask over the new area plus a `seam` band of the original, soft inside that band
(`mask_blur`). Every pass is composited with `sdkit.masks.composite`, so the original's
pixels outside the band come out exactly as they went in.

Beyond the model's native size only the border region is worked on: the canvas is cut into
tiles of at most the native size, only tiles that hold something to repaint run, nearest to
the original first, each repainting what is still to do plus a soft overlap into what the
tiles before it made. The tile plan is pure geometry (`plan`), known before any pass runs,
so progress counts all tiles and cancel works between and within them.

Named `outpainting` so that importing it does not shadow the function `sdkit.outpaint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from sdkit import masks
from sdkit.modes import Mode
from sdkit.request import MAX_PIXELS, MAX_SIZE, Request, RequestError, filled
from sdkit.runners import RunContext, denoise_steps

if TYPE_CHECKING:
    from sdkit.engine import Engine

SIDES = ("left", "right", "top", "bottom")
Box = masks.Box


def sides(req: Request) -> dict[str, int]:
    """The request's extension per side."""
    return {s: int(getattr(req, s)) for s in SIDES}


def output_size(size: tuple[int, int], ext: dict[str, int]) -> tuple[int, int]:
    """(width, height) of the extended canvas."""
    return size[0] + ext["left"] + ext["right"], size[1] + ext["top"] + ext["bottom"]


def check(req: Request, engine: Engine) -> Request:
    """`ModeSpec.check`: at least one side, an output within the limits; sets width/height
    to the output size (rounded down to the model's size step when it is not a multiple;
    the result image is always exactly the extended canvas)."""
    ext = sides(req)
    if not any(ext.values()):
        raise RequestError(
            "left", "outpaint by 0 on every side: give left, right, top or bottom > 0"
        )
    w, h = filled(req.image, "image").size
    out_w, out_h = output_size((w, h), ext)
    for axis, total, a, b, have in (
        ("wide", out_w, "left", "right", w),
        ("high", out_h, "top", "bottom", h),
    ):
        if total > MAX_SIZE:
            name = b if ext[b] >= ext[a] else a
            raise RequestError(
                name,
                f"the output would be {total} px {axis} (image {have} + {a} {ext[a]} + {b} "
                f"{ext[b]}); at most {MAX_SIZE}",
            )
    if out_w * out_h * req.num_images > MAX_PIXELS:
        name = max(SIDES, key=lambda s: ext[s])
        raise RequestError(
            name,
            f"{out_w}x{out_h} x {req.num_images} image(s) = {out_w * out_h * req.num_images} "
            f"pixels; one job may make at most {MAX_PIXELS}",
        )
    f = engine.size_multiple
    req.width, req.height = max(f, out_w - out_w % f), max(f, out_h - out_h % f)
    return req


# ------------------------------------------------------------------------ geometry


def extend(
    image: Image.Image, ext: dict[str, int], fill: str, seed: int | None
) -> tuple[Image.Image, Image.Image]:
    """The extended canvas with its new area filled, and that new area as an "L" mask."""
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    left, right, top, bottom = (ext[s] for s in SIDES)
    canvas = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")  # "stretch"
    new = np.full(canvas.shape[:2], 255, np.uint8)
    new[top : top + h, left : left + w] = 0
    if fill == "colour":
        sides_ = ((arr[:, 0], left), (arr[:, -1], right), (arr[0], top), (arr[-1], bottom))
        edges = [edge for edge, n in sides_ if n]
        canvas[new > 0] = np.rint(np.concatenate(edges).mean(axis=0)).astype(np.uint8)
    out, area = Image.fromarray(canvas, "RGB"), Image.fromarray(new, "L")
    if fill == "noise":
        out = masks.fill_masked(out, area, "noise", seed=seed)
    return out, area


def seam_mask(new_area: Image.Image, seam: int, blur: float) -> Image.Image:
    """What is repainted: the new area (255) plus a band `seam` px into the original, soft
    (feathered by `blur`, at most seam / 3) and exactly 0 beyond the band."""
    if seam <= 0:
        return new_area.copy()
    blur = min(float(blur), seam / 3)
    soft = masks.prepare_mask(new_area, seam - math.ceil(3 * blur), blur)
    band = np.asarray(masks.grow_mask(new_area, seam))
    out = np.clip(np.asarray(soft), np.asarray(new_area), band)
    return Image.fromarray(out.astype(np.uint8), "L")


@dataclass(frozen=True)
class Tile:
    """One inpaint pass: `box` of the canvas, worked at `size`, repainting `mask` (box-sized)."""

    box: Box
    size: tuple[int, int]
    mask: Image.Image = field(compare=False)


def _spans(length: int, native: int) -> list[tuple[int, int]]:
    """Cover 0..length with windows of at most `native`, overlapping by a quarter."""
    if length <= native:
        return [(0, length)]
    step = native - native // 4
    starts = list(range(0, length - native, step)) + [length - native]
    return [(s, s + native) for s in starts]


def _distance(box: Box, original: Box) -> float:
    """How far the centre of `box` lies from `original` (0 inside it): tiles whose centre
    is nearest the original run first, so each has the most known picture around it."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    dx = max(0.0, original[0] - cx, cx - original[2])
    dy = max(0.0, original[1] - cy, cy - original[3])
    return max(dx, dy)


def _taper(box: Box, width: int, height: int, reach: int) -> np.ndarray:
    """1 inside the box, falling to 0 on its edges that lie inside the canvas (a ramp into
    earlier tiles' pixels must end before the box does, or the box edge shows)."""
    x0, y0, x1, y1 = box

    def axis(start: int, end: int, limit: int) -> np.ndarray:
        pos = np.arange(end - start, dtype=float)
        lo = pos / reach if start > 0 else np.inf
        hi = (end - start - 1 - pos) / reach if end < limit else np.inf
        return np.minimum(lo, hi)

    return np.clip(np.minimum.outer(axis(y0, y1, height), axis(x0, x1, width)), 0, 1)


def plan(soft: Image.Image, original: Box, native: tuple[int, int], multiple: int) -> list[Tile]:
    """The passes that repaint `soft` (canvas-sized), each at most `native` in size.

    One pass when the canvas fits; else tiles centred nearest the `original` first. Each tile
    repaints what no earlier tile did (with `soft`'s values) plus a soft overlap into what
    earlier tiles made, never more than `soft` allows (so the original outside the band
    stays exact)."""
    need = np.asarray(soft)
    height, width = need.shape
    nw, nh = (max(multiple, n - n % multiple) for n in native)
    boxes = [
        (x0, y0, x1, y1)
        for y0, y1 in _spans(height, nh)
        for x0, x1 in _spans(width, nw)
        if need[y0:y1, x0:x1].any()
    ]
    boxes.sort(key=lambda b: (_distance(b, original), b[1], b[0]))
    done = np.zeros(need.shape, bool)
    tiles = []
    for box in boxes:
        x0, y0, x1, y1 = box
        sub_need, sub_done = need[y0:y1, x0:x1], done[y0:y1, x0:x1]
        todo = (sub_need > 0) & ~sub_done
        if not todo.any():
            continue
        mask = np.where(todo, sub_need, 0)
        if sub_done.any():
            reach = max(2, min(x1 - x0, y1 - y0) // 4)  # the windows' overlap
            todo_img = Image.fromarray(todo.astype(np.uint8) * 255, "L")
            ramp = np.asarray(masks.prepare_mask(todo_img, reach // 2, reach / 4))
            ramp = np.rint(ramp * _taper(box, width, height, reach // 2))
            mask = np.where(sub_done, np.minimum(ramp, sub_need), mask)
        done[y0:y1, x0:x1] |= todo
        size = (
            max(multiple, (x1 - x0) // multiple * multiple),
            max(multiple, (y1 - y0) // multiple * multiple),
        )
        tiles.append(Tile(box, size, Image.fromarray(mask.astype(np.uint8), "L")))
    return tiles


# ------------------------------------------------------------------------ the runner


@dataclass
class _TileContext(RunContext):
    """The job's context for one tile: its working size, progress counted over all tiles."""

    tile_size: tuple[int, int] = (0, 0)
    offset: int = 0
    total: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return self.tile_size

    def progress(self, step: int, total: int, latents: Any = None, *, pixel: bool = False) -> None:
        super().progress(self.offset + step, self.total, latents, pixel=pixel)

    def common_kwargs(self, denoise_steps: int) -> dict:
        width, height = self.size
        return super().common_kwargs(denoise_steps) | {"width": width, "height": height}


def run(ctx: RunContext) -> list[Image.Image]:
    """Extend, fill, then inpaint tile by tile; composite keeps the original exact."""
    req, engine = ctx.request, ctx.engine
    image = filled(req.image, "image").convert("RGB")
    ext = sides(req)
    canvas, area = extend(image, ext, req.extend_fill, req.seed)
    soft = seam_mask(area, req.seam, req.mask_blur)
    x, y = ext["left"], ext["top"]
    original = (x, y, x + image.width, y + image.height)
    native = (engine.defaults["width"], engine.defaults["height"])
    tiles = plan(soft, original, native, engine.size_multiple)
    steps = denoise_steps(ctx.steps, req.strength)
    tctx = _TileContext(engine, ctx.job, ctx.generators, total=len(tiles) * steps)
    canvases = [canvas] * req.num_images
    for k, tile in enumerate(tiles):
        ctx.check_cancel()
        tctx.tile_size, tctx.offset = tile.size, k * steps
        pipe = tctx.pipeline(Mode.INPAINT)
        crops = [c.crop(tile.box) for c in canvases]
        inputs = [c.resize(tile.size, Image.Resampling.LANCZOS) for c in crops]
        mask = tile.mask.resize(tile.size, Image.Resampling.BILINEAR)
        same = all(c is canvases[0] for c in canvases)  # before any pass: one input image
        out = pipe(
            image=inputs[0] if same else inputs,
            mask_image=mask,
            strength=req.strength,
            **tctx.with_prompts(pipe, tctx.common_kwargs(steps)),
        ).images
        done = []
        for crop, made, whole in zip(crops, out, canvases, strict=True):
            ctx.check_cancel()
            piece = masks.composite(crop, made, tile.mask)  # resizes `made` to the box
            whole = whole.copy()
            whole.paste(piece, tile.box[:2])
            done.append(whole)
        canvases = done
    return canvases
