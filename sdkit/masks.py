"""Inpainting masks, pure PIL/numpy: grow, feather, invert, only-masked crop and paste-back,
masked-content fill, and the final composite over the original.

Convention everywhere: an "L" mask, 255 = repaint, 0 = keep, grey = soft.  The promise
sdkit makes is that pixels where the prepared (grown, feathered) mask is 0 come out exactly
as they went in; `composite` is where that is enforced.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage

from sdkit.request import FILLS

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive), as PIL


class Crop(NamedTuple):
    """Only-masked inpainting: the `box` cut from the image and the `size` to generate at."""

    box: Box
    size: tuple[int, int]


def _as_mask(mask: Image.Image) -> Image.Image:
    return mask if mask.mode == "L" else mask.convert("L")


def grow_mask(mask: Image.Image, grow: int) -> Image.Image:
    """Dilate by `grow` px with a round brush (grey levels dilate too: a max filter over the
    disc of radius `grow`).

    Cost is O(pixels), whatever `grow` is: the radius is clamped to the image diagonal (a
    larger disc covers the same pixels) and large discs go through distance transforms, one
    per grey level, instead of a max filter whose footprint grows as grow^2 (issue 13).
    """
    mask = _as_mask(mask)
    if grow <= 0:
        return mask
    arr = np.asarray(mask)
    if not arr.any():
        return mask.copy()
    h, w = arr.shape
    r = min(int(grow), math.isqrt(h * h + w * w) + 1)
    levels = np.unique(arr[arr > 0])
    if levels.size > 1 and _disc_area(r) <= _EDT_COST * levels.size:
        # small discs over many grey levels: one max filter is cheaper than a transform per level
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        disc = xx * xx + yy * yy <= r * r
        return Image.fromarray(ndimage.grey_dilation(arr, footprint=disc, mode="constant"), "L")
    out = np.zeros_like(arr)
    for level in levels:  # ascending, so each pixel ends with the highest level in reach
        out[_within(arr >= level, r)] = level
    return Image.fromarray(out, "L")


# one distance transform costs about as much as a max filter with this many footprint pixels
_EDT_COST = 50


def _disc_area(r: int) -> int:
    """Lattice points in the disc x^2 + y^2 <= r^2."""
    return sum(2 * math.isqrt(r * r - dy * dy) + 1 for dy in range(-r, r + 1))


def _within(region: np.ndarray, r: int) -> np.ndarray:
    """Pixels at Euclidean distance <= r from `region` (exact: sqrt of a whole square is exact)."""
    return ndimage.distance_transform_edt(~region) <= r


def feather_mask(mask: Image.Image, blur: float) -> Image.Image:
    """Gaussian feather with standard deviation `blur` px (A1111's "Mask blur")."""
    mask = _as_mask(mask)
    if not blur > 0:  # also NaN
        return mask
    # a radius beyond the image adds nothing but cost (and Pillow refuses 2**31 and up)
    return mask.filter(ImageFilter.GaussianBlur(radius=min(blur, max(mask.size))))


def prepare_mask(mask: Image.Image, grow: int = 0, blur: float = 0) -> Image.Image:
    """The mask inpainting uses: greyscale, dilated by `grow`, then feathered by `blur`."""
    return feather_mask(grow_mask(mask, grow), blur)


def invert(mask: Image.Image) -> Image.Image:
    """Swap repaint and keep."""
    return ImageOps.invert(_as_mask(mask))


def mask_bbox(mask: Image.Image) -> Box | None:
    """Bounding box of the non-zero pixels, or None for an empty mask."""
    return _as_mask(mask).getbbox()


def crop_region(
    mask: Image.Image,
    padding: int,
    vae_factor: int = 8,
    target_size: tuple[int, int] | None = None,
) -> Crop:
    """Where only-masked inpainting works: the mask's bounding box plus `padding`, clamped to
    the image and widened (never narrowed) to the working aspect ratio.

    `target_size` (width, height) is the working resolution, e.g. the request's size; the
    crop is generated there and scaled back.  Without it the crop's own size rounded up to
    a multiple of `vae_factor` is used (the box grows to match where the image allows).
    An empty mask gives the whole image.
    """
    mask = _as_mask(mask)
    img_w, img_h = mask.size
    bbox = mask.getbbox()
    if bbox is None:
        box: Box = (0, 0, img_w, img_h)
    else:
        x0, y0, x1, y1 = bbox
        box = (
            max(0, x0 - padding),
            max(0, y0 - padding),
            min(img_w, x1 + padding),
            min(img_h, y1 + padding),
        )

    if target_size is None:
        w = _round_up(box[2] - box[0], vae_factor)
        h = _round_up(box[3] - box[1], vae_factor)
        box = _widen(box, w, h, img_w, img_h)
        return Crop(box, (w, h))

    tw, th = (int(v) for v in target_size)
    if tw <= 0 or th <= 0:
        raise ValueError(f"target_size must be positive, got {target_size}")
    bw, bh = box[2] - box[0], box[3] - box[1]
    # widen one side so that bw/bh == tw/th (as close as whole pixels allow)
    if bw * th < bh * tw:
        bw = min(img_w, round(bh * tw / th))
    elif bw * th > bh * tw:
        bh = min(img_h, round(bw * th / tw))
    return Crop(_widen(box, bw, bh, img_w, img_h), (tw, th))


def _round_up(v: int, m: int) -> int:
    return max(m, -(-v // m) * m)


def _widen(box: Box, w: int, h: int, img_w: int, img_h: int) -> Box:
    """Grow `box` around its centre to w x h, shifted to stay inside the image, clamped."""
    (x0, x1), (y0, y1) = _span(box[0], box[2], w, img_w), _span(box[1], box[3], h, img_h)
    return (x0, y0, x1, y1)


def _span(a: int, b: int, want: int, limit: int) -> tuple[int, int]:
    want = min(max(want, b - a), limit)
    extra = want - (b - a)
    a -= extra // 2
    a = min(max(a, 0), limit - want)
    return a, a + want


def paste_back(
    original: Image.Image,
    generated: Image.Image,
    box: Box,
    mask: Image.Image | None = None,
) -> Image.Image:
    """Scale the crop generated for `box` back to the box and put it into `original`;
    with `mask` (full-image, prepared) only the masked pixels change (see `composite`)."""
    w, h = box[2] - box[0], box[3] - box[1]
    patch = generated.convert(original.mode)
    if patch.size != (w, h):
        patch = patch.resize((w, h), Image.Resampling.LANCZOS)
    out = original.copy()
    out.paste(patch, box[:2])
    return composite(original, out, mask) if mask is not None else out


def fill_masked(
    image: Image.Image,
    mask: Image.Image,
    fill: str,
    seed: int | None = None,
) -> Image.Image:
    """Masked content before img2img: "original" keeps the pixels, "fill" paints the hole
    with the colours around it (blurred inward), "noise" with seeded uniform noise.
    Grey mask pixels blend between the original and the fill."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    image_rgb = image.convert("RGB")
    mask = _as_mask(mask)
    if mask.size != image.size:
        raise ValueError(f"mask size {mask.size} differs from image size {image.size}")
    if fill == "original":
        return image_rgb.copy()
    src = np.asarray(image_rgb, dtype=np.float64)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    if fill == "noise":
        rng = np.random.default_rng(seed)
        content = rng.uniform(0, 255, size=src.shape)
    else:
        content = _surrounding_colour(src, np.asarray(mask) < 255)
    out = src * (1 - alpha) + content * alpha
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _surrounding_colour(src: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Each pixel's colour from the known pixels around it, by normalised Gaussian blurs
    from fine to coarse (the finest scale that reaches a pixel decides)."""
    if not known.any():
        return np.full_like(src, 127.5)
    weight = known.astype(np.float64)
    out = np.zeros_like(src)
    done = np.zeros(known.shape, dtype=bool)
    sigma = 2.0
    largest = max(src.shape[:2])
    while True:
        w = ndimage.gaussian_filter(weight, sigma, mode="nearest")
        reach = (w > 1e-3) & ~done
        if reach.any():
            for c in range(src.shape[2]):
                v = ndimage.gaussian_filter(src[..., c] * weight, sigma, mode="nearest")
                out[..., c][reach] = v[reach] / w[reach]
            done |= reach
        if done.all() or sigma > largest:
            break
        sigma *= 2
    if not done.all():  # unreachable in practice; the mean colour of what is known
        out[~done] = src[known].mean(axis=0)
    return out


def composite(original: Image.Image, generated: Image.Image, soft_mask: Image.Image) -> Image.Image:
    """`generated` over `original` through `soft_mask`: where the mask is 0 the result is
    exactly `original` (integer-exact), where 255 exactly `generated`, soft in between.

    `generated` is resized to the original's size if it differs (e.g. a model that needs
    multiples of 8); the mask must match the original's size.
    """
    mask = _as_mask(soft_mask)
    if original.mode not in ("L", "RGB", "RGBA"):
        original = original.convert("RGBA" if "A" in original.getbands() else "RGB")
    if mask.size != original.size:
        raise ValueError(f"mask size {mask.size} differs from image size {original.size}")
    gen = generated.convert(original.mode)
    if gen.size != original.size:
        gen = gen.resize(original.size, Image.Resampling.LANCZOS)
    a = np.asarray(original)
    b = np.asarray(gen)
    m = np.asarray(mask).astype(np.int32)
    if a.ndim == 3:
        m = m[..., None]
    blended = (a.astype(np.int32) * (255 - m) + b.astype(np.int32) * m + 127) // 255
    out = np.where(m == 0, a, np.where(m == 255, b, blended.astype(a.dtype)))
    return Image.fromarray(out.astype(a.dtype), original.mode)
