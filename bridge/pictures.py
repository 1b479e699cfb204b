"""Pictures as they travel (rgba8, l8, png frames) to and from PIL images and editor buffers.

The one place that converts pixels for the bridge: the server decodes request frames and
encodes results with it, `sdkit.bridge.Client` turns events into PIL images with it, and
the plug-ins swap Krita's BGRA with it. Standard library only at import time (it is
copied into the editors, whose Pythons have no PIL); PIL is imported by the functions
that need it.

A PNG frame's size is read from its IHDR chunk and checked against the pixel limit and
its descriptor before anything is decoded, so a small file that declares a huge image
(a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import struct
from typing import Any

try:  # as part of sdkit.bridge, or copied next to a plug-in package
    from . import protocol
except ImportError:  # copied next to a plug-in script (GIMP): a top-level module
    import protocol  # type: ignore[no-redef]

PIL_MODES = {"rgba8": "RGBA", "l8": "L"}
"""The PIL mode of each raw frame format."""

_IHDR = struct.Struct(">I4sII")  # chunk length, chunk type, width, height


# ---------------------------------------------------------------------------- PNG headers


def png_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, without decoding; ValueError if it has none."""
    head = bytes(data[:24])
    if head[:8] != protocol.PNG_SIGNATURE:
        raise ValueError("not PNG data (bad signature)")
    if len(head) < 24:
        raise ValueError("the PNG ends before its IHDR chunk")
    length, kind, width, height = _IHDR.unpack(head[8:])
    if kind != b"IHDR" or length != 13:
        raise ValueError("the PNG does not start with an IHDR chunk")
    if width == 0 or height == 0:
        raise ValueError(f"the PNG declares an empty {width}x{height} image")
    return width, height


def check_png(
    pic: protocol.Picture,
    *,
    max_pixels: int | None = None,
    where: str = "picture",
    request_id: str | None = None,
) -> None:
    """Refuse a PNG frame whose header is unreadable, too large or not what its descriptor says.

    Reads 24 bytes; raises `protocol.ProtocolError` (``too_large`` or ``bad_frames``).
    """
    try:
        width, height = png_size(pic.data)
    except ValueError as e:
        raise protocol.ProtocolError("bad_frames", f"{where}: {e}", where, request_id) from None
    if max_pixels is not None and width * height > max_pixels:
        raise protocol.ProtocolError(
            "too_large",
            f"{where} is a PNG of {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels}",
            where,
            request_id,
        )
    if (width, height) != (pic.width, pic.height):
        raise protocol.ProtocolError(
            "bad_frames",
            f"{where} is a {width}x{height} PNG, its descriptor says {pic.width}x{pic.height}",
            where,
            request_id,
        )


# ---------------------------------------------------------------------------- PIL


def to_image(
    pic: protocol.Picture,
    *,
    mode: str | None = None,
    max_pixels: int | None = None,
    where: str = "picture",
    request_id: str | None = None,
) -> Any:
    """A PIL image from a frame (needs PIL).

    ``mode`` is the PIL mode wanted ("RGBA" for an input image, "L" for a mask); None keeps
    what the picture holds, except that a fully opaque RGBA picture becomes RGB, since a
    server sends its RGB results as opaque rgba8. PNG data is checked with `check_png`
    first; a PNG that fails to decode is a ``bad_frames`` `protocol.ProtocolError`.
    """
    if pic.format == "png":  # before PIL is even imported: nothing is decoded yet
        check_png(pic, max_pixels=max_pixels, where=where, request_id=request_id)
    import io

    from PIL import Image

    if pic.format == "png":
        try:
            with Image.open(io.BytesIO(bytes(pic.data))) as im:
                im.load()
                image = im if im.mode in ("RGB", "RGBA", "L") else im.convert("RGBA")
                image = image.copy() if image is im else image
        except Exception as e:  # noqa: BLE001 - any decoder failure is the sender's bad data
            raise protocol.ProtocolError(
                "bad_frames", f"{where} is not a readable PNG ({e})", where, request_id
            ) from None
    else:
        image = Image.frombytes(PIL_MODES[pic.format], (pic.width, pic.height), bytes(pic.data))
    if mode is not None:
        return image if image.mode == mode else image.convert(mode)
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB")
    return image


def from_image(image: Any, fmt: str = "rgba8") -> protocol.Picture:
    """A PIL image as it travels: ``rgba8`` (alpha 255 for RGB), ``l8`` or ``png`` bytes."""
    if fmt == "png":
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return protocol.Picture(image.width, image.height, "png", buf.getvalue())
    mode = PIL_MODES[fmt]
    im = image if image.mode == mode else image.convert(mode)
    return protocol.Picture(image.width, image.height, fmt, im.tobytes())


# ---------------------------------------------------------------------------- editor buffers


def bgra_to_rgba(data: bytes | bytearray | memoryview) -> bytes:
    """Swap the blue and red bytes of every pixel (Krita's RGBA8 is BGRA in memory).

    The same swap turns RGBA back into BGRA.
    """
    if len(data) % 4:
        raise ValueError(f"pixel data of {len(data)} bytes is not a whole number of 4-byte pixels")
    out = bytearray(data)
    out[0::4] = data[2::4]
    out[2::4] = data[0::4]
    return bytes(out)


rgba_to_bgra = bgra_to_rgba


def rgba8(pic: protocol.Picture) -> bytes:
    """A raw frame's pixels as straight RGBA8 (l8 becomes opaque grey), without PIL.

    PNG frames need PIL (`to_image`); editors ask for rgba8 results and previews.
    """
    if pic.format == "rgba8":
        return bytes(pic.data)
    if pic.format == "l8":
        grey = bytes(pic.data)
        out = bytearray(4 * len(grey))
        for channel in range(3):
            out[channel::4] = grey
        out[3::4] = b"\xff" * len(grey)
        return bytes(out)
    raise ValueError(f"a {pic.format} picture needs decoding; ask the server for rgba8")
