"""ControlNet preprocessors that need no downloaded model: `none`, `canny`, `scribble`, `invert`.

Each turns a picture (already fitted to the working size) into the control image a ControlNet
expects: white lines on black. Written with numpy/scipy (no OpenCV dependency); `canny`
follows OpenCV's algorithm (L1 Sobel magnitude, non-maximum suppression, hysteresis) with
A1111's default thresholds 100/200.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

CANNY_LOW, CANNY_HIGH = 100, 200  # A1111's "Threshold A/B" defaults for canny


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def canny_edges(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> np.ndarray:
    """Boolean edge map: OpenCV-style Canny on the grey picture (no pre-blur, as cv2.Canny)."""
    from scipy import ndimage

    g = _grey(image)
    gx = ndimage.sobel(g, axis=1, mode="nearest")
    gy = ndimage.sobel(g, axis=0, mode="nearest")
    mag = np.abs(gx) + np.abs(gy)
    # Non-maximum suppression along the gradient direction, quantised to 4 directions.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    pad = np.pad(mag, 1)
    h, w = mag.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    keep = np.zeros_like(mag, dtype=bool)
    for lo, hi, (dy, dx) in (
        (0.0, 22.5, (0, 1)),
        (157.5, 180.1, (0, 1)),
        (22.5, 67.5, (1, 1)),
        (67.5, 112.5, (1, 0)),
        (112.5, 157.5, (1, -1)),
    ):
        sector = (angle >= lo) & (angle < hi)
        peak = (mag >= shifted(dy, dx)) & (mag > shifted(-dy, -dx))
        keep |= sector & peak
    mag = np.where(keep, mag, 0.0)
    strong = mag >= high
    weak = mag >= low
    labels, n = ndimage.label(weak, structure=np.ones((3, 3), bool))
    if n == 0:
        return strong
    hit = np.zeros(n + 1, dtype=bool)
    hit[np.unique(labels[strong])] = True
    hit[0] = False
    return hit[labels]


def _white_on_black(edges: np.ndarray) -> Image.Image:
    return Image.fromarray((edges * 255).astype(np.uint8), "L").convert("RGB")


def canny(image: Image.Image) -> Image.Image:
    return _white_on_black(canny_edges(image))


def scribble(image: Image.Image) -> Image.Image:
    """Thick edges: Canny at half the thresholds, dilated by ~1/128 of the short side, so a
    photo or a thin drawing becomes the bold strokes scribble ControlNets are trained on."""
    from scipy import ndimage

    edges = canny_edges(image, CANNY_LOW / 2, CANNY_HIGH / 2)
    radius = max(1, round(min(image.size) / 128))
    disk = np.add.outer(np.arange(-radius, radius + 1) ** 2, np.arange(-radius, radius + 1) ** 2)
    return _white_on_black(ndimage.binary_dilation(edges, structure=disk <= radius * radius))


def invert(image: Image.Image) -> Image.Image:
    """A black-on-white drawing as the white-on-black lines ControlNets expect."""
    return ImageOps.invert(image.convert("RGB"))


def none(image: Image.Image) -> Image.Image:
    """The user's own control image, unchanged."""
    return image.convert("RGB")


PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": none,
    "canny": canny,
    "scribble": scribble,
    "invert": invert,
}
