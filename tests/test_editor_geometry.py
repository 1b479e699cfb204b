"""The plug-ins' geometry, mask and pixel code (bridge/editor_geometry.py)."""

from __future__ import annotations

import pytest
from sdkit.bridge import editor_geometry as geo
from sdkit.bridge.editor_geometry import Rect


def _check_region(region: geo.Region, canvas_w: int, canvas_h: int) -> None:
    r = region.rect
    assert region.width % 8 == 0 and region.height % 8 == 0
    assert Rect(0, 0, canvas_w, canvas_h).contains(r)
    assert r.contains(region.selection)
    assert region.width >= r.width and region.height >= r.height
    # Padding only where the canvas itself is too short to give a multiple of 8.
    assert region.pad_right == 0 or r.width == canvas_w
    assert region.pad_bottom == 0 or r.height == canvas_h
    assert region.pad_right < 8 and region.pad_bottom < 8


def test_region_in_the_middle_gets_the_margin_and_rounds_up():
    region = geo.context_region(Rect(100, 90, 21, 13), 400, 300, margin=10)
    _check_region(region, 400, 300)
    r = region.rect
    assert r.x <= 90 and r.y <= 80 and r.right >= 131 and r.bottom >= 113
    assert (r.width, r.height) == (48, 40)  # 41 -> 48, 33 -> 40, all from the canvas
    assert (region.width, region.height) == (48, 40)
    assert region.selection == Rect(100, 90, 21, 13)


@pytest.mark.parametrize(
    "sel",
    [
        Rect(0, 0, 10, 10),  # top-left corner
        Rect(190, 140, 11, 9),  # bottom-right corner of a 201x149 canvas
        Rect(0, 60, 201, 5),  # a full-width band
        Rect(-20, -30, 50, 50),  # partly off the canvas: clamped
        Rect(195, 0, 100, 149),  # sticking out right
    ],
)
def test_regions_at_the_canvas_edges_stay_inside(sel):
    region = geo.context_region(sel, 201, 149, margin=16)
    _check_region(region, 201, 149)
    assert region.selection == sel.intersect(Rect(0, 0, 201, 149))


def test_full_canvas_selection_of_an_odd_canvas_is_padded_not_cut():
    region = geo.context_region(Rect(0, 0, 101, 77), 101, 77)
    assert region.rect == Rect(0, 0, 101, 77)
    assert (region.width, region.height) == (104, 80)
    assert (region.pad_right, region.pad_bottom) == (3, 3)


def test_full_canvas_selection_of_a_multiple_of_8_canvas_is_exact():
    region = geo.context_region(Rect(0, 0, 64, 48), 64, 48)
    assert region.rect == Rect(0, 0, 64, 48)
    assert (region.width, region.height) == (64, 48)


def test_tiny_canvas():
    region = geo.context_region(Rect(1, 1, 2, 2), 5, 3)
    assert region.rect == Rect(0, 0, 5, 3)
    assert (region.width, region.height) == (8, 8)


def test_empty_selection_is_a_clear_error():
    with pytest.raises(geo.SelectionError, match="nothing is selected"):
        geo.context_region(Rect(10, 10, 0, 5), 100, 100)
    with pytest.raises(geo.SelectionError, match="outside the 100x100 canvas"):
        geo.context_region(Rect(150, 10, 20, 20), 100, 100)


def test_fully_transparent_selection_mask_is_a_clear_error():
    region = geo.context_region(Rect(8, 8, 8, 8), 64, 64, margin=0)
    rgba = bytes(4 * 64)
    with pytest.raises(geo.SelectionError, match="empty"):
        geo.prepare(region, rgba, bytes(64))


def test_the_size_multiple_is_a_parameter():
    region = geo.context_region(Rect(0, 0, 30, 30), 101, 77, margin=0, multiple=16)
    assert (region.width, region.height) == (32, 32)
    region = geo.context_region(Rect(0, 0, 101, 77), 101, 77, multiple=64)
    assert (region.width, region.height) == (128, 128)  # padded where the canvas is short


def test_check_size_names_the_limit():
    region = geo.context_region(Rect(0, 0, 64, 64), 64, 64)
    geo.check_size(region, 64 * 64)
    with pytest.raises(geo.SelectionError, match="at most 1000 pixels"):
        geo.check_size(region, 1000)


def test_crop_and_pad():
    # 3x2 image, 1 byte per pixel.
    img = bytes([1, 2, 3, 4, 5, 6])
    assert geo.crop(img, 3, 2, Rect(1, 0, 2, 2), 1) == bytes([2, 3, 5, 6])
    assert geo.pad(img, 3, 2, 4, 3, 1) == bytes([1, 2, 3, 3, 4, 5, 6, 6, 4, 5, 6, 6])
    assert geo.pad(img, 3, 2, 4, 3, 1, fill=0) == bytes([1, 2, 3, 0, 4, 5, 6, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="outside"):
        geo.crop(img, 3, 2, Rect(2, 0, 2, 2), 1)


def test_mask_bounds():
    w, h = 7, 5
    mask = bytearray(w * h)
    assert geo.mask_bounds(bytes(mask), w, h) is None
    mask[1 * w + 2] = 3  # a faint soft edge pixel counts
    mask[3 * w + 5] = 255
    assert geo.mask_bounds(bytes(mask), w, h) == Rect(2, 1, 4, 3)


def test_soft_mask_becomes_the_layer_alpha():
    rgba = bytes([10, 20, 30, 255] * 4)
    mask = bytes([0, 64, 200, 255])
    out = geo.apply_mask_alpha(rgba, mask)
    assert out[3::4] == mask
    assert out[0::4] == bytes([10] * 4)  # colour untouched (straight alpha)
    # A translucent result multiplies: 128 * 128 / 255 ~ 64.
    half = geo.apply_mask_alpha(bytes([1, 1, 1, 128] * 2), bytes([128, 255]))
    assert half[3::4] == bytes([64, 128])


def test_prepare_pads_image_with_edges_and_mask_with_keep():
    region = geo.context_region(Rect(0, 0, 5, 3), 5, 3)
    rgba = bytes(range(60))
    soft = bytes([0, 50, 100, 150, 255] * 3)
    p = geo.prepare(region, rgba, soft)
    assert len(p.image) == 8 * 8 * 4 and len(p.mask) == 8 * 8
    assert p.mask[:8] == bytes([0, 50, 100, 150, 255, 0, 0, 0])  # soft values kept
    assert p.mask[3 * 8 :] == bytes(5 * 8)  # padding rows are never repainted
    assert p.image[5 * 4 : 6 * 4] == rgba[4 * 4 : 5 * 4]  # right edge repeated


def test_prepare_without_a_mask_repaints_the_whole_region():
    region = geo.context_region(Rect(0, 0, 8, 8), 8, 8)
    p = geo.prepare(region, bytes(8 * 8 * 4), None)
    assert p.mask == b"\xff" * 64


def test_place_result_covers_the_selection_and_is_masked_by_it():
    region = geo.context_region(Rect(2, 1, 3, 2), 5, 3, margin=0)
    assert region.rect == Rect(0, 0, 5, 3) and (region.width, region.height) == (8, 8)
    result = bytearray()
    for y in range(8):
        for x in range(8):
            result += bytes([x, y, 50, 255])
    sel = bytearray(15)
    sel[1 * 5 + 2] = 255
    sel[1 * 5 + 3] = 128
    placed = geo.place_result(
        region, bytes(result), 8, 8, bytes(sel), prompt="a red circle", seed=7
    )
    assert (placed.x, placed.y, placed.width, placed.height) == (2, 1, 3, 2)
    assert len(placed.rgba) == 3 * 2 * 4
    assert placed.rgba[0::4] == bytes([2, 3, 4, 2, 3, 4])  # the pixels at the selection
    assert placed.rgba[1::4] == bytes([1, 1, 1, 2, 2, 2])
    assert placed.rgba[3::4] == bytes([255, 128, 0, 0, 0, 0])  # alpha from the soft mask
    assert placed.name == "[sdkit] a red circle (7)"
    with pytest.raises(geo.EditorError, match="16x8 image for a 8x8 request"):
        geo.place_result(region, bytes(16 * 8 * 4), 16, 8, None, prompt="x", seed=1)


def test_place_result_without_a_mask_keeps_the_region_opaque():
    region = geo.context_region(Rect(0, 0, 6, 5), 6, 5)
    placed = geo.place_result(region, b"\x09" * (8 * 8 * 4), 8, 8, None, prompt="", seed=None)
    assert (placed.x, placed.y, placed.width, placed.height) == (0, 0, 6, 5)
    assert placed.rgba == b"\x09" * (6 * 5 * 4)


def test_layer_name_is_short_and_single_line():
    name = geo.layer_name("a  very\nlong prompt " * 10, 123)
    assert name.startswith("[sdkit] a very long prompt")
    assert name.endswith("… (123)")
    assert "\n" not in name and len(name) < 60
    assert geo.layer_name("", None) == "[sdkit] (no prompt)"
