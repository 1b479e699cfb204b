"""Picture conversion (bridge/pictures.py): frames <-> PIL <-> editor buffers, PNG bombs."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image
from sdkit.bridge import pictures
from sdkit.bridge import protocol as P

BRIDGE = Path(pictures.__file__).resolve().parent


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 4096, height: int = 4096) -> bytes:
    """A valid greyscale PNG of ``width`` x ``height`` zeros: a few KB that decode to 16 MB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = (b"\x00" * (width + 1)) * height  # filter byte 0, then the row
    return (
        P.PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_png_size_reads_the_header_only():
    data = bomb_png()
    assert len(data) < 40_000
    assert pictures.png_size(data) == (4096, 4096)
    assert pictures.png_size(data[:24]) == (4096, 4096)  # the rest is never looked at
    with pytest.raises(ValueError, match="signature"):
        pictures.png_size(b"GIF89a" + bytes(30))
    with pytest.raises(ValueError, match="IHDR"):
        pictures.png_size(P.PNG_SIGNATURE + _chunk(b"tEXt", b"a" * 13))


def test_a_png_bomb_is_refused_before_decoding_even_when_its_descriptor_lies():
    pic = P.Picture(8, 8, "png", bomb_png())  # the descriptor says 8x8
    with pytest.raises(P.ProtocolError) as e:
        pictures.to_image(pic, mode="L", max_pixels=1024 * 1024, where="frames[0]")
    assert e.value.code == "too_large" and e.value.field == "frames[0]"
    assert "4096x4096" in e.value.message


def test_the_bomb_check_needs_no_pil_so_nothing_was_decoded():
    """With PIL made unimportable, the refusal still comes: it happens before any decoding."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.modules['PIL'] = None\n"
        "import struct, zlib, pictures, protocol as P\n"
        "ihdr = struct.pack('>IIBBBBB', 4096, 4096, 8, 0, 0, 0, 0)\n"
        "body = b'IHDR' + ihdr\n"
        "png = P.PNG_SIGNATURE + struct.pack('>I', 13) + body + struct.pack('>I', zlib.crc32(body))\n"
        "try:\n"
        "    pictures.to_image(P.Picture(4096, 4096, 'png', png), max_pixels=2**20)\n"
        "except P.ProtocolError as e:\n"
        "    print(e.code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(BRIDGE)], capture_output=True, text=True
    )
    assert out.stdout.strip() == "too_large", out.stderr


def test_png_descriptor_mismatch_and_garbage_are_bad_frames():
    data = _png(Image.new("RGB", (6, 4), (1, 2, 3)))
    with pytest.raises(P.ProtocolError, match="descriptor says 8x8") as e:
        pictures.to_image(P.Picture(8, 8, "png", data))
    assert e.value.code == "bad_frames"
    broken = data[:40] + b"\x00" * 20  # a good header, then garbage
    with pytest.raises(P.ProtocolError, match="not a readable PNG") as e:
        pictures.to_image(P.Picture(6, 4, "png", broken), request_id="r1")
    assert e.value.code == "bad_frames" and e.value.request_id == "r1"


def test_png_round_trip_within_the_limit():
    im = Image.new("RGBA", (5, 3), (10, 20, 30, 40))
    pic = pictures.from_image(im, "png")
    assert (pic.format, pic.width, pic.height) == ("png", 5, 3)
    back = pictures.to_image(pic, max_pixels=15)
    assert back.mode == "RGBA" and back.tobytes() == im.tobytes()
    assert pictures.to_image(pic, mode="L").mode == "L"
    palette = _png(Image.new("P", (4, 4)))
    assert pictures.to_image(P.Picture(4, 4, "png", palette)).mode == "RGB"  # opaque


def test_raw_frames_to_pil_and_back():
    rgb = Image.new("RGB", (3, 2), (200, 100, 50))
    pic = pictures.from_image(rgb)
    assert pic.format == "rgba8" and bytes(pic.data[:4]) == bytes([200, 100, 50, 255])
    back = pictures.to_image(pic)
    assert back.mode == "RGB" and back.tobytes() == rgb.tobytes()  # opaque -> RGB
    clear = pictures.to_image(P.Picture(1, 1, "rgba8", bytes([1, 2, 3, 4])))
    assert clear.mode == "RGBA"
    assert pictures.to_image(pic, mode="RGBA").mode == "RGBA"
    mask = pictures.from_image(Image.new("RGB", (2, 2), (255, 255, 255)), "l8")
    assert (mask.format, bytes(mask.data)) == ("l8", b"\xff" * 4)
    assert pictures.to_image(mask).mode == "L"


def test_bgra_to_rgba_swaps_red_and_blue_and_is_its_own_inverse():
    bgra = bytes([1, 2, 3, 4, 10, 20, 30, 40])
    assert pictures.bgra_to_rgba(bgra) == bytes([3, 2, 1, 4, 30, 20, 10, 40])
    assert pictures.rgba_to_bgra(pictures.bgra_to_rgba(bgra)) == bgra
    with pytest.raises(ValueError, match="4-byte pixels"):
        pictures.bgra_to_rgba(b"abc")


def test_rgba8_of_raw_frames_without_pil():
    assert pictures.rgba8(P.Picture(1, 1, "rgba8", b"\x01\x02\x03\x04")) == b"\x01\x02\x03\x04"
    assert pictures.rgba8(P.Picture(2, 1, "l8", b"\x07\x09")) == bytes([7, 7, 7, 255, 9, 9, 9, 255])
    with pytest.raises(ValueError, match="rgba8"):
        pictures.rgba8(P.Picture(1, 1, "png", bomb_png(1, 1)))
