"""Inpainting masks: grow, feather, crop/paste for only-masked, fill, and the exact composite."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from sdkit.masks import (
    composite,
    crop_region,
    feather_mask,
    fill_masked,
    grow_mask,
    invert,
    mask_bbox,
    paste_back,
    prepare_mask,
)


def noise_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def block_mask(w: int, h: int, box, value: int = 255) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(value, box)
    return m


# ---------------------------------------------------------------------------- grow, blur


def test_grow_is_a_round_dilation_by_grow_pixels():
    m = block_mask(21, 21, (10, 10, 11, 11))
    grown = np.asarray(grow_mask(m, 3))
    assert grown[10, 13] == 255 and grown[10, 14] == 0  # 3 px along an axis
    assert grown[12, 12] == 255  # distance 2.8
    assert grown[13, 13] == 0  # distance 4.2: round, not square
    assert int((grown == 255).sum()) == 29  # lattice points in a disk of radius 3
    assert set(np.unique(grown).tolist()) == {0, 255}


def test_grow_keeps_grey_levels():
    m = block_mask(20, 20, (8, 8, 12, 12), value=128)
    grown = np.asarray(grow_mask(m, 2))
    assert grown[10, 6] == 128 and grown[10, 5] == 0
    assert grown.max() == 128


def test_grow_zero_and_empty_masks_are_unchanged():
    m = block_mask(10, 10, (2, 2, 5, 5))
    assert np.array_equal(np.asarray(grow_mask(m, 0)), np.asarray(m))
    empty = Image.new("L", (10, 10), 0)
    assert not np.asarray(grow_mask(empty, 5)).any()


def _disc_dilation(arr: np.ndarray, r: int) -> np.ndarray:
    """The definition: each pixel takes the max over the disc of radius r around it."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ndimage.grey_dilation(arr, footprint=xx * xx + yy * yy <= r * r, mode="constant")


@pytest.mark.parametrize("levels", [(255,), (90, 255), (40, 128, 200), tuple(range(1, 256, 5))])
@pytest.mark.parametrize("r", [1, 2, 5, 7, 11, 19])
def test_grow_is_the_disc_max_filter_for_any_grey_levels(levels, r):
    rng = np.random.default_rng(r * 1000 + len(levels))
    arr = np.zeros((33, 40), np.uint8)
    spots = rng.integers(0, arr.size, 6)
    arr.flat[spots] = rng.choice(levels, spots.size)
    arr[20:24, 3:9] = levels[-1]
    grown = np.asarray(grow_mask(Image.fromarray(arr, "L"), r))
    assert np.array_equal(grown, _disc_dilation(arr, r))


@pytest.mark.parametrize("levels", [(255,), (60, 130, 255)])
def test_huge_grow_costs_memory_of_the_image_not_of_grow(levels):
    # issue 13: grow=3000 on 64x64 took 1.1 GB in np.mgrid (memory grew as grow^2)
    arr = np.zeros((64, 64), np.uint8)
    for i, level in enumerate(levels):
        arr[10 + 3 * i, 20 + 5 * i] = level
    mask = Image.fromarray(arr, "L")
    tracemalloc.start()
    try:
        grown = np.asarray(grow_mask(mask, 3000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert (grown == max(levels)).all()  # the disc covers the whole image


def test_huge_blur_is_clamped_to_the_image():
    m = block_mask(64, 48, (20, 20, 40, 40))
    for blur in (10**6, 2**31, 2**63, float("inf")):
        soft = feather_mask(m, blur)
        assert soft.size == (64, 48) and soft.mode == "L"
    assert np.array_equal(np.asarray(feather_mask(m, 10**9)), np.asarray(feather_mask(m, 64)))
    assert np.array_equal(np.asarray(feather_mask(m, float("nan"))), np.asarray(m))


def test_feather_softens_the_edge_and_stays_local():
    m = block_mask(64, 64, (16, 16, 48, 48))
    soft = np.asarray(feather_mask(m, 4))
    assert soft[32, 32] == 255  # deep inside
    assert 0 < soft[32, 16] < 255 and 0 < soft[32, 15] < 255  # both sides of the edge
    assert soft[32, 2] == 0 and soft[2, 2] == 0  # far outside: exactly zero
    assert np.array_equal(np.asarray(feather_mask(m, 0)), np.asarray(m))


def test_prepare_mask_grows_then_feathers_and_accepts_rgb():
    m = block_mask(64, 64, (30, 30, 34, 34)).convert("RGB")
    prepared = prepare_mask(m, grow=6, blur=2)
    assert prepared.mode == "L" and prepared.size == (64, 64)
    arr = np.asarray(prepared)
    assert arr[32, 32] == 255 and arr[32, 38] > 0  # grown beyond the 4 px block
    assert arr[0, 0] == 0


def test_invert_and_bbox():
    m = block_mask(10, 10, (2, 3, 5, 7))
    assert mask_bbox(m) == (2, 3, 5, 7)
    inv = np.asarray(invert(m))
    assert inv[0, 0] == 255 and inv[4, 3] == 0
    assert mask_bbox(Image.new("L", (4, 4))) is None


# ---------------------------------------------------------------------------- only masked


def test_crop_region_pads_and_matches_the_working_aspect():
    m = block_mask(200, 100, (90, 40, 110, 50))  # a 20x10 hole
    crop = crop_region(m, padding=8, vae_factor=8, target_size=(64, 64))
    x0, y0, x1, y1 = crop.box
    assert crop.size == (64, 64)
    assert x0 <= 82 and y0 <= 32 and x1 >= 118 and y1 >= 58  # bbox + padding inside the box
    assert x1 - x0 == y1 - y0  # square like the working size
    assert 0 <= x0 and 0 <= y0 and x1 <= 200 and y1 <= 100


def test_crop_region_shifts_inside_the_image_at_edges():
    m = block_mask(100, 100, (0, 0, 6, 30))
    x0, y0, x1, y1 = crop_region(m, padding=4, target_size=(64, 32)).box
    assert (x0, y0) == (0, 0)
    assert (x1 - x0) == 2 * (y1 - y0)  # 2:1 like 64x32
    assert y1 >= 34


def test_crop_region_clamps_when_the_image_is_too_small():
    m = block_mask(40, 100, (10, 10, 30, 90))
    box = crop_region(m, padding=20, target_size=(512, 256)).box
    assert box == (0, 0, 40, 100)  # cannot widen further: the whole image


def test_crop_region_without_target_rounds_to_the_vae_factor():
    m = block_mask(100, 100, (10, 10, 31, 23))
    crop = crop_region(m, padding=0, vae_factor=8)
    assert crop.size == (24, 16)
    assert (crop.box[2] - crop.box[0], crop.box[3] - crop.box[1]) == crop.size


def test_crop_region_of_an_empty_mask_is_the_whole_image():
    assert crop_region(Image.new("L", (30, 20)), 8, target_size=(64, 64)).box == (0, 0, 30, 20)


def test_paste_back_changes_only_the_box_or_the_mask():
    original = noise_image(80, 60, 1)
    generated = Image.new("RGB", (64, 64), (0, 255, 0))
    box = (10, 20, 42, 52)
    out = np.asarray(paste_back(original, generated, box))
    orig = np.asarray(original)
    inside = np.zeros(orig.shape[:2], bool)
    inside[20:52, 10:42] = True
    assert np.array_equal(out[~inside], orig[~inside])
    assert (out[inside] == [0, 255, 0]).all()

    m = block_mask(80, 60, (20, 30, 30, 40))
    out = np.asarray(paste_back(original, generated, box, mask=m))
    masked = np.asarray(m) > 0
    assert np.array_equal(out[~masked], orig[~masked])
    assert (out[masked] == [0, 255, 0]).all()


# ---------------------------------------------------------------------------- fill


def two_colour_image() -> Image.Image:
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (220, 20, 20)
    arr[:, 40:] = (20, 20, 220)
    return Image.fromarray(arr)


def test_fill_original_is_the_image():
    img = two_colour_image()
    out = fill_masked(img, block_mask(80, 40, (10, 10, 20, 20)), "original")
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_fill_paints_the_hole_with_the_colour_around_it():
    img = np.asarray(two_colour_image()).copy()
    img[12:28, 10:26] = (255, 255, 255)  # white object inside the red half, to be removed
    m = block_mask(80, 40, (10, 12, 26, 28))
    out = np.asarray(fill_masked(Image.fromarray(img), m, "fill"))
    hole = out[12:28, 10:26].reshape(-1, 3).astype(int)
    assert (hole[:, 0] > 150).all() and (hole[:, 1] < 60).all()  # red, not white
    keep = np.asarray(m) == 0
    assert np.array_equal(out[keep], img[keep])


def test_fill_works_when_almost_everything_is_masked():
    img = two_colour_image()
    m = Image.new("L", (80, 40), 255)
    m.putpixel((79, 39), 0)
    out = np.asarray(fill_masked(img, m, "fill"))
    assert (np.abs(out.astype(int) - [20, 20, 220]).max(axis=-1) <= 1).all()


def test_noise_fill_is_seeded():
    img = two_colour_image()
    m = block_mask(80, 40, (10, 10, 30, 30))
    a = np.asarray(fill_masked(img, m, "noise", seed=1))
    b = np.asarray(fill_masked(img, m, "noise", seed=1))
    c = np.asarray(fill_masked(img, m, "noise", seed=2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    hole = a[10:30, 10:30].astype(float)
    assert hole.std() > 40  # noise, not a flat colour
    keep = np.asarray(m) == 0
    assert np.array_equal(a[keep], np.asarray(img)[keep])


def test_fill_rejects_unknown_names_and_sizes():
    img = two_colour_image()
    with pytest.raises(ValueError, match="original, fill, noise"):
        fill_masked(img, block_mask(80, 40, (0, 0, 1, 1)), "latent nothing")
    with pytest.raises(ValueError, match="size"):
        fill_masked(img, Image.new("L", (8, 8)), "fill")


# ---------------------------------------------------------------------------- composite


def test_composite_changes_zero_pixels_outside_the_grown_feathered_mask():
    original = noise_image(96, 64, 3)
    generated = noise_image(96, 64, 4)
    prepared = prepare_mask(block_mask(96, 64, (40, 20, 60, 40)), grow=4, blur=3)
    out = np.asarray(composite(original, generated, prepared))
    m = np.asarray(prepared)
    orig, gen = np.asarray(original), np.asarray(generated)
    keep = m == 0
    assert keep.sum() > 96 * 64 // 2  # a real zero region
    assert np.array_equal(out[keep], orig[keep])  # integer exact
    assert np.array_equal(out[m == 255], gen[m == 255])
    soft = (m > 0) & (m < 255)
    assert soft.any()
    lo = np.minimum(orig, gen)[soft].astype(int)
    hi = np.maximum(orig, gen)[soft].astype(int)
    assert ((out[soft] >= lo) & (out[soft] <= hi)).all()


def test_composite_keeps_rgba_and_resizes_the_generated_image():
    original = noise_image(40, 24, 5, "RGBA")
    generated = Image.new("RGB", (48, 32), (10, 200, 30))  # e.g. rounded up to multiples of 8
    m = block_mask(40, 24, (10, 5, 20, 15))
    out = composite(original, generated, m)
    assert out.mode == "RGBA" and out.size == (40, 24)
    keep = np.asarray(m) == 0
    assert np.array_equal(np.asarray(out)[keep], np.asarray(original)[keep])
    with pytest.raises(ValueError, match="size"):
        composite(original, generated, Image.new("L", (8, 8)))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**16),
    st.integers(0, 8),
    st.floats(0, 6),
)
def test_composite_exactness_property(seed, grow, blur):
    rng = np.random.default_rng(seed)
    raw = (rng.random((24, 32)) > 0.93).astype(np.uint8) * rng.integers(
        1, 256, (24, 32), dtype=np.uint8
    )
    prepared = prepare_mask(Image.fromarray(raw, "L"), grow=grow, blur=blur)
    original, generated = noise_image(32, 24, seed), noise_image(32, 24, seed + 1)
    out = np.asarray(composite(original, generated, prepared))
    keep = np.asarray(prepared) == 0
    assert np.array_equal(out[keep], np.asarray(original)[keep])
