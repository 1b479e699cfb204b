"""Tiled upscale (A1111's "SD upscale"): Lanczos to the output size, then img2img tile by tile.

Why tiles: a model draws well only near its native size, and memory must not grow with the
picture. The input is resized with Lanczos to `upscale_factor` x its size (rounded to the
model's size multiple), then refined by img2img in overlapping tiles of the model's native
size. Each tile is one plain diffusers img2img call made by the built-in img2img runner
(`sdkit.runners.run_img2img`), so prompt syntax, clip skip, cancel points and 9-channel UNets
behave exactly as in the img2img mode.

Blending (our own; A1111 pastes tiles with a linear alpha over the overlap): every tile
weighs its pixels with linear ramps across the whole overlap it shares with each neighbour,
and the output is sum(weight x tile) / sum(weight). The weights are a partition of unity
that falls to almost zero at each tile's inner edges, so no tile's border shows.

Memory: one tile is in flight at a time; besides the Lanczos picture, the only array of the
output's size is the float accumulator (and its weight plane). Progress counts tiles x
denoising steps as one total; cancel is checked between tiles and within each (every step
and every UNet block). Tile i's noise comes from a CPU generator seeded by `tile_seed(seed,
i)`, so one seed gives one picture on any device.

`strength` keeps `Request`'s meaning and default (0.75, A1111's img2img default, which its
SD upscale script also uses unchanged). Refining tiles wants much less, so the faces that
offer upscaling (`sdkit.upscale()`, `Engine.upscale`, the CLI, the widget's button, Krita's
action) propose `DEFAULT_STRENGTH`; a check hook cannot tell 0.75 chosen from 0.75 defaulted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from sdkit.request import MAX_PIXELS, MAX_SIZE, Request, RequestError, filled

if TYPE_CHECKING:
    from sdkit.runners import RunContext

DEFAULT_STRENGTH = 0.3  # what the upscale faces propose (A1111 users refine at 0.2..0.4)


@dataclass(frozen=True)
class Tile:
    """One tile: its index (the seed offset) and its box in the output."""

    index: int
    x: int
    y: int
    width: int
    height: int


def output_size(size: tuple[int, int], factor: float, multiple: int) -> tuple[int, int]:
    """`size` x `factor`, each side rounded to the nearest multiple of `multiple` (>= one)."""
    return tuple(max(multiple, round(s * factor / multiple) * multiple) for s in size)  # type: ignore[return-value]


def tile_size(engine: Any, width: int, height: int) -> tuple[int, int]:
    """The model's native size, or the output's side where it is smaller."""
    return min(int(engine.defaults["width"]), width), min(int(engine.defaults["height"]), height)


def positions(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one side: as few tiles as keep every overlap >= `overlap`, spread
    evenly from 0 to `length - tile` (so the last tile ends at the edge)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def layout(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> list[Tile]:
    """The tiles covering a `width` x `height` output, row by row."""
    xs, ys = positions(width, tile_w, overlap), positions(height, tile_h, overlap)
    return [
        Tile(r * len(xs) + c, x, y, tile_w, tile_h)
        for r, y in enumerate(ys)
        for c, x in enumerate(xs)
    ]


def ramp(size: int, before: int, after: int) -> np.ndarray:
    """Weights along one side of a tile: rising over the `before` pixels it shares with the
    previous tile, falling over the `after` it shares with the next; 1 elsewhere. Never 0,
    so every covered pixel has weight; about 1/(overlap+1) at an inner edge."""
    w = np.ones(size, np.float32)
    if before > 0:
        w[:before] = np.arange(1, before + 1, dtype=np.float32) / (before + 1)
    if after > 0:
        w[size - after :] = np.minimum(
            w[size - after :], np.arange(after, 0, -1, dtype=np.float32) / (after + 1)
        )
    return w


def tile_weights(tile: Tile, starts_x: list[int], starts_y: list[int]) -> np.ndarray:
    """The tile's 2-D weights: ramps over the actual overlap with each neighbour."""

    def side(start: int, size: int, starts: list[int]) -> np.ndarray:
        i = starts.index(start)
        before = starts[i - 1] + size - start if i > 0 else 0
        after = start + size - starts[i + 1] if i + 1 < len(starts) else 0
        return ramp(size, before, after)

    wx = side(tile.x, tile.width, starts_x)
    wy = side(tile.y, tile.height, starts_y)
    return np.outer(wy, wx)


def tile_seed(seed: int, index: int) -> int:
    """Tile `index`'s noise seed: a hash of (seed, index), so neighbouring seeds do not share
    tiles' noise (seed 7's tile 1 is not seed 8's tile 0)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def check(request: Request, engine: Any) -> Request:
    """`ModeSpec.check`: the output size becomes width/height; limits name upscale_factor.

    One picture per job (num_images > 1 is refused, not silently dropped: a batch would
    multiply an already long job). tile_overlap must leave tiles advancing by at least half
    a tile along each side cut into more than one."""
    image = filled(request.image, "image")
    if request.num_images != 1:
        raise RequestError(
            "num_images", f"upscale makes one picture per job, got {request.num_images}"
        )
    multiple = engine.size_multiple
    factor = request.upscale_factor
    w, h = output_size(image.size, factor, multiple)
    if w > MAX_SIZE or h > MAX_SIZE or w * h > MAX_PIXELS:
        largest = min(MAX_SIZE / image.width, MAX_SIZE / image.height)
        largest = min(largest, math.sqrt(MAX_PIXELS / (image.width * image.height)))
        raise RequestError(
            "upscale_factor",
            f"{image.width}x{image.height} x {factor:g} = {w}x{h}, beyond the limit of "
            f"{MAX_SIZE} pixels per side ({MAX_PIXELS} in all); for this image use at most "
            f"{math.floor(largest * 100) / 100:g}",
        )
    tw, th = tile_size(engine, w, h)
    tiled = [t for t, side in ((tw, w), (th, h)) if side > t]  # sides cut into several tiles
    limit = min(tiled, default=2 * request.tile_overlap) // 2
    if request.tile_overlap > limit:
        raise RequestError(
            "tile_overlap",
            f"{request.tile_overlap} is more than half a tile ({tw}x{th}); use at most {limit}",
        )
    return dataclasses.replace(request, width=w, height=h)


def run_upscale(ctx: RunContext) -> list[Image.Image]:
    """The mode's runner: Lanczos, then img2img per tile, blended into one float array."""
    from sdkit.runners import denoise_steps, run_img2img

    req = ctx.request
    width, height = ctx.size
    lanczos = Image.Resampling.LANCZOS
    up = filled(req.image, "image").convert("RGB").resize((width, height), lanczos)
    tw, th = tile_size(ctx.engine, width, height)
    tiles = layout(width, height, tw, th, req.tile_overlap)
    xs = sorted({t.x for t in tiles})
    ys = sorted({t.y for t in tiles})
    per_tile = denoise_steps(ctx.steps, req.strength)
    total = per_tile * len(tiles)
    acc = np.zeros((height, width, 3), np.float32)
    weight = np.zeros((height, width), np.float32)
    seed = filled(req.seed, "seed")
    for tile in tiles:
        ctx.check_cancel()
        box = (tile.x, tile.y, tile.x + tile.width, tile.y + tile.height)
        sub = _tile_context(ctx, tile, up.crop(box), tile_seed(seed, tile.index), per_tile, total)
        (out,) = run_img2img(sub)
        w = tile_weights(tile, xs, ys)
        region = (slice(tile.y, box[3]), slice(tile.x, box[2]))
        acc[region] += np.asarray(out, np.float32) * w[..., None]
        weight[region] += w
        del out, sub
    del up
    acc /= weight[..., None]
    np.rint(acc, out=acc)
    return [Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), "RGB")]


def _tile_context(
    ctx: RunContext, tile: Tile, image: Image.Image, seed: int, per_tile: int, total: int
) -> RunContext:
    """A RunContext for one tile: an img2img request at tile size with the tile's seed, whose
    progress is reported as a step of the whole job."""
    import torch

    from sdkit.modes import Mode

    req = dataclasses.replace(
        ctx.request,
        mode=Mode.IMG2IMG,
        image=image,
        width=tile.width,
        height=tile.height,
        seed=seed,
        num_images=1,
        resize_mode="resize",
    )
    generators = [torch.Generator("cpu").manual_seed(seed)]
    done = tile.index * per_tile
    cls = _tile_context_class()
    return cls(
        ctx.engine, ctx.job, generators, tile_request=req, parent=ctx, done=done, total=total
    )


@functools.cache
def _tile_context_class() -> type:
    """`RunContext` with a request of its own and progress counted for the whole job (made
    on first use: `sdkit.runners` imports torch, this module does not)."""
    from sdkit.runners import RunContext

    @dataclass
    class TileContext(RunContext):
        tile_request: Request | None = None
        parent: RunContext | None = None
        done: int = 0  # steps of the job before this tile
        total: int = 0  # steps of the whole job

        @property
        def request(self) -> Request:
            return filled(self.tile_request, "request")

        def progress(self, step: int, total: int, latents: Any = None, **kw: Any) -> None:
            assert self.parent is not None
            self.parent.progress(self.done + step, self.total, latents, **kw)

    return TileContext
