"""Client -> server messages, decoded and checked: the server's side of the wire.

Standard library only, like `protocol` (whose types, limits and picture decoder it uses).
Every fault becomes a `protocol.ProtocolError` with a code, a message, the field at fault
and (when readable) the request id; a well-typed header of the wrong shape (a list where a
name belongs, an object for a number) is one of those faults, never another exception.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .protocol import (
    _COMMON_KEYS,
    _OP_KEYS,
    MAX_CONTROL_INDEX,
    MAX_ID_LENGTH,
    MAX_STREAM_LENGTH,
    OPS,
    QUEUE_POLICIES,
    REQUEST_FRAMES,
    RESULT_FORMATS,
    SUPPORTED_VERSIONS,
    Limits,
    Message,
    ProtocolError,
    _check_keys,
    _header,
    _is_int,
    _request_id,
    decode_picture,
)


def _check_version(header: Mapping[str, Any], rid: str | None) -> None:
    v = header.get("v")
    if v is None:
        raise ProtocolError(
            "bad_version", "missing protocol version 'v' (this server speaks 1)", "v", rid
        )
    if not _is_int(v) or v not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "bad_version",
            f"protocol version {v!r} is not supported; supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
            "v",
            rid,
        )


def decode_request(frames: Sequence[Any], limits: Limits | None = None) -> Message:
    """Decode and check a client -> server message; raise `ProtocolError` on any fault."""
    limits = limits or Limits()
    header = _header(frames, limits.max_header_bytes)
    rid = _request_id(header)
    total = sum(len(f) for f in frames)
    if total > limits.max_message_bytes:
        raise ProtocolError(
            "too_large",
            f"message is {total} bytes; the limit is {limits.max_message_bytes}",
            None,
            rid,
        )
    if len(frames) > limits.max_frames:
        raise ProtocolError(
            "too_large",
            f"message has {len(frames)} frames; the limit is {limits.max_frames}",
            None,
            rid,
        )
    _check_version(header, rid)
    if "id" not in header:
        raise ProtocolError("bad_field", "missing request id 'id'", "id", None)
    if rid is None:
        raise ProtocolError(
            "bad_field",
            f"'id' must be a non-empty string of at most {MAX_ID_LENGTH} characters",
            "id",
            None,
        )
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError(
            "unknown_op", f"unknown op {op!r}; known ops: {', '.join(OPS)}", "op", rid
        )
    _check_keys(header, _COMMON_KEYS + _OP_KEYS[op], "", rid)
    msg = Message(op, rid, header)
    if op == "generate":
        _decode_generate(msg, frames, limits)
    elif len(frames) > 1:
        raise ProtocolError(
            "bad_frames", f"{op} takes no binary frames, got {len(frames) - 1}", "frames", rid
        )
    elif op == "cancel":
        target = header.get("target")
        if not isinstance(target, str) or not 0 < len(target) <= MAX_ID_LENGTH:
            raise ProtocolError(
                "bad_field",
                f"cancel needs 'target', a request id string; got {target!r}",
                "target",
                rid,
            )
    elif op == "hello":
        client = header.get("client")
        if client is not None and (not isinstance(client, str) or len(client) > 200):
            raise ProtocolError("bad_field", "'client' must be a short string", "client", rid)
        versions = header.get("versions")
        if versions is not None and (
            not isinstance(versions, list) or not all(_is_int(v) for v in versions)
        ):
            raise ProtocolError(
                "bad_field", "'versions' must be a list of integers", "versions", rid
            )
    elif op == "ping":
        data = header.get("data")
        if data is not None and (not isinstance(data, str) or len(data) > 256):
            raise ProtocolError(
                "bad_field", "'data' must be a string of at most 256 characters", "data", rid
            )
    return msg


def _decode_generate(msg: Message, frames: Sequence[Any], limits: Limits) -> None:
    header, rid = msg.header, msg.id
    request = header.get("request", {})
    if not isinstance(request, dict):
        raise ProtocolError(
            "bad_field",
            f"'request' must be an object of Request fields, got {type(request).__name__}",
            "request",
            rid,
        )
    for key in ("image", "mask"):
        if key in request:
            raise ProtocolError(
                "bad_field",
                f"send the {key} as a binary frame described in 'frames', not inside 'request'",
                f"request.{key}",
                rid,
            )
    units = request.get("control")
    for i, unit in enumerate(units if isinstance(units, list) else []):
        if isinstance(unit, dict) and "image" in unit:
            raise ProtocolError(
                "bad_field",
                f"send control unit {i}'s image as a frame "
                f'{{"name": "control", "index": {i}, ...}}, not inside \'request\'',
                f"request.control[{i}].image",
                rid,
            )
    for key in ("width", "height"):
        v = request.get(key)
        if _is_int(v) and v > 0 and v > limits.max_pixels:
            raise ProtocolError(
                "too_large", f"request.{key}={v} exceeds the pixel limit", f"request.{key}", rid
            )
    w, h = request.get("width"), request.get("height")
    if _is_int(w) and _is_int(h) and w > 0 and h > 0:
        n = request.get("num_images", 1)
        n = n if _is_int(n) and n > 0 else 1
        if w * h * n > limits.max_pixels:
            raise ProtocolError(
                "too_large",
                f"request asks for {n} x {w}x{h} = {w * h * n} pixels; the limit is "
                f"{limits.max_pixels}",
                "request.width",
                rid,
            )
    preview = header.get("preview", 0)
    if not isinstance(preview, int) or preview < 0 or preview > 10_000:
        raise ProtocolError(
            "bad_field",
            f"'preview' must be false/true or an integer 0..10000 (every n steps), got {preview!r}",
            "preview",
            rid,
        )
    fmt = header.get("result_format", "rgba8")
    if fmt not in RESULT_FORMATS:
        raise ProtocolError(
            "bad_field",
            f"'result_format' is {fmt!r}; allowed: {', '.join(RESULT_FORMATS)}",
            "result_format",
            rid,
        )
    policy = header.get("policy", "back")
    if policy not in QUEUE_POLICIES:
        raise ProtocolError(
            "bad_field",
            f"'policy' is {policy!r}; allowed: {', '.join(QUEUE_POLICIES)}",
            "policy",
            rid,
        )
    stream = header.get("stream")
    if stream is not None and not (isinstance(stream, str) and len(stream) <= MAX_STREAM_LENGTH):
        raise ProtocolError(
            "bad_field",
            f"'stream' must be a string of at most {MAX_STREAM_LENGTH} characters",
            "stream",
            rid,
        )
    descriptors = header.get("frames", [])
    if not isinstance(descriptors, list):
        raise ProtocolError(
            "bad_field",
            f"'frames' must be a list of frame descriptors, got {type(descriptors).__name__}",
            "frames",
            rid,
        )
    if len(descriptors) != len(frames) - 1:
        raise ProtocolError(
            "bad_frames",
            f"header describes {len(descriptors)} binary frame(s) but {len(frames) - 1} arrived",
            "frames",
            rid,
        )
    for i, d in enumerate(descriptors):
        where = f"frames[{i}]"
        if not isinstance(d, dict):
            raise ProtocolError(
                "bad_field", f"{where} must be an object, got {type(d).__name__}", where, rid
            )
        name = d.get("name")
        if not isinstance(name, str) or name not in REQUEST_FRAMES:
            raise ProtocolError(
                "bad_field",
                f"{where}.name is {name!r}; allowed: {', '.join(REQUEST_FRAMES)}",
                f"{where}.name",
                rid,
            )
        pic = decode_picture(
            d,
            frames[i + 1],
            where=where,
            formats=REQUEST_FRAMES[name],
            max_pixels=limits.max_pixels,
            rid=rid,
        )
        if name == "control":
            name = _control_key(d, units, where, rid)
        if name in msg.pictures:
            raise ProtocolError(
                "bad_frames", f"{where}: a second '{name}' frame", f"{where}.name", rid
            )
        msg.pictures[name] = pic
    image, mask = msg.pictures.get("image"), msg.pictures.get("mask")
    if image and mask and (image.width, image.height) != (mask.width, mask.height):
        raise ProtocolError(
            "bad_frames",
            f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}",
            "frames",
            rid,
        )


def _control_key(d: Mapping[str, Any], units: Any, where: str, rid: str | None) -> str:
    """``control[i]`` for a control frame: its ``index`` names a unit of ``request.control``."""
    index = d.get("index")
    count = len(units) if isinstance(units, list) else 0
    if not _is_int(index) or not 0 <= index <= MAX_CONTROL_INDEX:
        raise ProtocolError(
            "bad_field",
            f"{where}.index must be the control unit's index 0..{MAX_CONTROL_INDEX}, got {index!r}",
            f"{where}.index",
            rid,
        )
    if index >= count:
        raise ProtocolError(
            "bad_frames",
            f"{where} is the image of control unit {index}, but request.control has "
            f"{count} unit(s)",
            f"{where}.index",
            rid,
        )
    return f"control[{index}]"
