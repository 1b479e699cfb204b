"""Scribbles of the embedded model's scenes, and how well a generated shape follows one.

The embedded ControlNet (`sdkit/embedded/control/sdkscribble`, trained by
`sdkit.embedded.train_control`) learned from these drawings, so tests, benchmarks and the
widget's test make control images here, the same way. Stable API:

* `scribble(scene, rng=None) -> PIL.Image` — 64x64 RGB, white strokes on black: a thick,
  jittered outline of the scene's shape at its place and size, sometimes hatched or filled.
  `rng` is a numpy Generator or an int seed (None: seed 0). Deterministic given the seed.
* `filled_shape(scene) -> bool array (64, 64)` — the shape's pixels as `shapes.render` draws it.
* `heldout(i) -> (Scene, PIL.Image, str)` — the i-th held-out scene, its scribble and a full
  caption; drawn from `HELDOUT_SEED`, which training never uses.
* `placement(image, scene) -> Placement` — centre distance (px) and mask IoU of the blob the
  project's classifier finds in `image` against the scene's filled shape; `.ok` is the
  issue's criterion (centre within `MAX_CENTRE_PX` and IoU >= `MIN_IOU`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sdkit.embedded import shapes

HELDOUT_SEED = 20261204
MAX_CENTRE_PX = 3.0
MIN_IOU = 0.6
_SCALE = 4  # drawn at 4x, then reduced: soft, even strokes


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)


def _outline(scene: shapes.Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """The shape's outline (64-px units) with jittered corners and a slow wobble."""
    r = scene.radius
    if scene.shape == "circle":
        n = 20
        rr = r * 0.85  # as `shapes` draws a circle
        phase = rng.uniform(0, 2 * math.pi)
        pts = [
            (
                scene.cx + rr * math.cos(t) * (1 + 0.05 * math.sin(2 * t + phase)),
                scene.cy + rr * math.sin(t) * (1 + 0.05 * math.cos(3 * t + phase)),
            )
            for t in (2 * math.pi * k / n for k in range(n))
        ]
    else:
        corners = shapes._polygon(scene, 1.0)  # the renderer's own geometry
        corners = [(x + rng.normal(0, 0.04 * r), y + rng.normal(0, 0.04 * r)) for x, y in corners]
        pts = []
        for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1], strict=True):
            for f in (0.0, 0.33, 0.67):  # a hand never draws an edge quite straight
                wob = rng.normal(0, 0.015 * r) if f else 0.0
                pts.append((x0 + f * (x1 - x0) + wob, y0 + f * (y1 - y0) + wob))
    start = int(rng.integers(len(pts)))
    return pts[start:] + pts[:start]


def scribble(
    scene: shapes.Scene, rng: np.random.Generator | int | None = None, size: int = shapes.SIZE
) -> Image.Image:
    """A rough white-on-black drawing of the scene's shape: what a user sketches for control."""
    rng = _rng(rng)
    k = _SCALE * size / shapes.SIZE
    pts = [(x * k, y * k) for x, y in _outline(scene, rng)]
    img = Image.new("L", (size * _SCALE, size * _SCALE), 0)
    draw = ImageDraw.Draw(img)
    style = rng.random()
    if style < 0.15:  # a filled blob
        draw.polygon(pts, fill=255)
    elif style < 0.35:  # hatched inside the outline
        inside = Image.new("L", img.size, 0)
        ImageDraw.Draw(inside).polygon(pts, fill=255)
        hatch = Image.new("L", img.size, 0)
        hd, a = ImageDraw.Draw(hatch), rng.uniform(0, math.pi)
        gap, far = rng.uniform(5, 9) * k, 2 * size * _SCALE
        c, s, mid = math.cos(a), math.sin(a), size * _SCALE / 2
        for off in np.arange(-far, far, gap):
            x, y = mid - s * off, mid + c * off
            hd.line(
                [(x - c * far, y - s * far), (x + c * far, y + s * far)], fill=255, width=int(k)
            )
        img.paste(hatch, mask=inside)
    width = int(round(rng.uniform(2.0, 3.5) * k))
    overshoot = pts[: int(rng.integers(1, 3)) + 1]  # closing the loop past where it started
    draw.line(pts + overshoot, fill=255, width=width, joint="curve")
    return img.resize((size, size), Image.Resampling.BOX).convert("RGB")


def filled_shape(scene: shapes.Scene) -> np.ndarray:
    """The shape's pixels exactly as `shapes.render` draws it (64x64 bool)."""
    solo = dataclasses.replace(scene, colour="white", background="black")
    return np.asarray(shapes.render(solo).convert("L")) >= 128


def full_caption(scene: shapes.Scene) -> str:
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def heldout(i: int) -> tuple[shapes.Scene, Image.Image, str]:
    """Held-out scene `i`, its scribble and caption (seeds no training run draws from)."""
    rng = np.random.default_rng([HELDOUT_SEED, i])
    scene = shapes.random_scene(rng)
    return scene, scribble(scene, rng), full_caption(scene)


@dataclass(frozen=True)
class Placement:
    centre_px: float  # inf when no shape was found
    iou: float

    @property
    def ok(self) -> bool:
        return self.centre_px <= MAX_CENTRE_PX and self.iou >= MIN_IOU


def blob(image: Image.Image) -> np.ndarray | None:
    """The largest blob of the colour `shapes.classify` judges the foreground, holes filled
    (as the classifier fits its templates to), or None when it finds no foreground."""
    from scipy import ndimage

    judged = shapes.classify(image)
    if judged.colour is None:
        return None
    arr = np.asarray(image.convert("RGB").resize((shapes.SIZE, shapes.SIZE)))
    mask = shapes.nearest_colours(arr) == list(shapes.COLOURS).index(judged.colour)
    comp, n = ndimage.label(mask)
    if n > 1:
        mask = comp == int(np.argmax(ndimage.sum(mask, comp, range(1, n + 1)))) + 1
    return ndimage.binary_fill_holes(mask)


def placement(image: Image.Image, scene: shapes.Scene) -> Placement:
    """Where the generated shape landed relative to the scene's (i.e. the scribble's)."""
    mask = blob(image)
    if mask is None or not mask.any():
        return Placement(math.inf, 0.0)
    ys, xs = np.nonzero(mask)
    centre = math.hypot(xs.mean() + 0.5 - scene.cx, ys.mean() + 0.5 - scene.cy)
    target = filled_shape(scene)
    iou = float((mask & target).sum() / max(1, (mask | target).sum()))
    return Placement(centre, iou)
