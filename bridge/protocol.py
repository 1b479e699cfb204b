"""The sdkit bridge wire format, version 1 (standard library only: it runs inside editors).

A message is a list of ZeroMQ frames: frame 0 is a UTF-8 JSON object (the header), the
other frames are binary pictures that the header's ``frames`` list describes in order.
`bridge/PROTOCOL.md` is the normative description; this module is its executable form,
shared by the server, `sdkit.bridge.Client` and the editor plug-ins.

The decoders never trust their input: every fault becomes a `ProtocolError` carrying an
error code, a message naming what was wrong, the header field at fault and (when it could
be read) the request id, so that the server can answer it.

The transport-neutral client core, `Session`, lives in ``tracker.py``, and the server's
decoder of client messages, `decode_request`, in ``inbound.py``.
This file is a little over 400 lines because it is what an editor copies as one piece:
the wire's constants, types, encoders and the event decoder.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.TypeGuard is Python 3.10+; editors may embed an older Python
    from typing import TypeGuard

VERSION = 1
SUPPORTED_VERSIONS = (1,)

OPS = ("hello", "generate", "cancel", "status", "ping", "bye")
EVENTS = (
    "hello",
    "pong",
    "status",
    "cancel",
    "bye",
    "accepted",
    "queued",
    "started",
    "progress",
    "result",
    "error",
)
TERMINAL_EVENTS = ("result", "error")

# Error codes and when they are sent (PROTOCOL.md lists the same table).
ERROR_CODES = {
    "bad_message": "the frames are not a valid message (no header, not UTF-8 JSON, not an object)",
    "bad_version": "the header's protocol version is missing or not supported",
    "unknown_op": "the op is missing or not one of the known operations",
    "unknown_field": "the header (or a frame descriptor) has a key this version does not define",
    "bad_field": "a header field or a Request field has a wrong type or value",
    "bad_frames": "the binary frames do not match the header's frame descriptors",
    "too_large": "a size limit was exceeded (message bytes, pixels, header bytes, frames)",
    "queue_full": "this client, or the server as a whole, holds the most unfinished requests allowed",
    "duplicate_id": "this client already has an unfinished request with this id",
    "model_not_allowed": "the requested model is not on the server's allow-list",
    "cancelled": "the request was cancelled before it finished",
    "failed": "the engine raised an error while generating",
    "shutdown": "the server stopped before the request finished",
    "connection_lost": "(client side) the connection dropped while the request was in flight",
    "timeout": "(client side) no answer within the client's timeout",
    "internal": "an unexpected server error; the server keeps running",
    "unavailable": "(Ray scale-out) no engine replica answered; all are down or restarting",
}

# Picture formats: bytes per pixel, None for encoded (PNG) data.
FORMATS = {"rgba8": 4, "l8": 1, "png": None}
# Which picture may travel under which name in a request, and in which formats. A `control`
# frame is the image of the control unit `request.control[index]` (its descriptor's "index").
REQUEST_FRAMES = {"image": ("rgba8", "png"), "mask": ("l8", "png"), "control": ("rgba8", "png")}
MAX_CONTROL_INDEX = 15  # a control frame's "index" is 0..this (units beyond are bad_frames)
RESULT_FORMATS = ("rgba8", "png")
# Where a generate waits (sdkit.jobs.QueuePolicy's values): back of its client's line, front
# of it, or replace: supersedes the waiting/running request of the same client + stream.
QUEUE_POLICIES = ("back", "front", "replace")
MAX_STREAM_LENGTH = 128

_COMMON_KEYS = ("v", "op", "id")
_OP_KEYS = {
    "hello": ("client", "versions"),
    "generate": ("request", "frames", "preview", "result_format", "policy", "stream"),
    "cancel": ("target",),
    "status": (),
    "ping": ("data",),
    "bye": (),
}
_DESCRIPTOR_KEYS = ("name", "format", "width", "height", "index")
MAX_ID_LENGTH = 128
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class CodedError(Exception):
    """An error as the protocol reports it: a code, a message, the field at fault, the id."""

    def __init__(
        self, code: str, message: str, field: str | None = None, request_id: str | None = None
    ):
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id
        where = f" [{field}]" if field else ""
        super().__init__(f"{code}{where}: {message}")


class ProtocolError(CodedError, ValueError):
    """A message that breaks the protocol; the server answers it with an ``error`` event."""


@dataclass(frozen=True)
class Limits:
    """Server limits, announced in ``hello`` so that clients can check before sending."""

    max_message_bytes: int = 64 * 2**20
    max_header_bytes: int = 64 * 2**10
    max_frames: int = 8
    max_pixels: int = 4096 * 4096
    max_queued_per_client: int = 8
    max_queued: int = 256  # unfinished requests of all clients together
    max_images: int = 16  # per request (sdkit.request.MAX_IMAGES)
    max_steps: int = 1000  # per request (sdkit.request.MAX_STEPS)

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Limits:
        return cls(**{k: int(v) for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Picture:
    """Pixels as they travel: ``rgba8`` (straight alpha, row-major), ``l8`` or ``png``."""

    width: int
    height: int
    format: str
    data: bytes | bytearray | memoryview

    def descriptor(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            **extra,
        }

    def expected_bytes(self) -> int | None:
        bpp = FORMATS[self.format]
        return None if bpp is None else self.width * self.height * bpp


@dataclass
class Message:
    """A decoded client -> server message."""

    op: str
    id: str
    header: dict[str, Any]
    pictures: dict[str, Picture] = field(default_factory=dict)


@dataclass
class Event:
    """A decoded server -> client event (or one a `Session` made up, e.g. connection_lost)."""

    event: str
    id: str | None
    header: dict[str, Any]
    pictures: list[tuple[dict[str, Any], Picture]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    @property
    def code(self) -> str | None:
        return self.header.get("code")

    @property
    def message(self) -> str | None:
        return self.header.get("message")

    @property
    def field(self) -> str | None:
        return self.header.get("field")

    def pictures_named(self, name: str) -> list[Picture]:
        return [p for d, p in self.pictures if d.get("name") == name]


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------- encoding


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in JSON headers")


def dumps(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")


def request_frames(
    op: str,
    request_id: str,
    *,
    pictures: Mapping[str, Picture] | None = None,
    **fields: Any,
) -> list[Any]:
    """Frames of a client -> server message; ``pictures`` maps frame names to `Picture`s
    (``control[i]``: unit i's control image, sent as name ``control`` with ``index`` i)."""
    header: dict[str, Any] = {"v": VERSION, "op": op, "id": request_id}
    header.update({k: v for k, v in fields.items() if v is not None})
    pics = list((pictures or {}).items())
    if op == "generate":
        header["frames"] = [_request_descriptor(name, p) for name, p in pics]
    return [dumps(header), *(p.data for _, p in pics)]


_CONTROL_KEY = re.compile(r"^control\[(\d+)\]$")


def _request_descriptor(name: str, pic: Picture) -> dict[str, Any]:
    m = _CONTROL_KEY.match(name)
    return pic.descriptor("control", index=int(m.group(1))) if m else pic.descriptor(name)


def generate_frames(
    request_id: str,
    request: Mapping[str, Any],
    *,
    image: Picture | None = None,
    mask: Picture | None = None,
    control: Mapping[int, Picture] | None = None,
    preview: int = 0,
    result_format: str = "rgba8",
    policy: str = "back",
    stream: str | None = None,
) -> list[Any]:
    """A ``generate`` message: Request fields in the header, image, mask and the control
    units' images (``control``: unit index -> picture) as frames; ``policy`` and
    ``stream`` travel only when set (an older server sees the same message as before)."""
    pictures = {}
    if image is not None:
        pictures["image"] = image
    if mask is not None:
        pictures["mask"] = mask
    for i, pic in sorted((control or {}).items()):
        pictures[f"control[{i}]"] = pic
    return request_frames(
        "generate",
        request_id,
        request=dict(request),
        pictures=pictures,
        preview=int(preview) or None,
        result_format=None if result_format == "rgba8" else result_format,
        policy=None if policy == "back" else policy,
        stream=stream,
    )


def event_frames(
    event: str,
    request_id: str | None,
    pictures: Sequence[tuple[str, Picture]] = (),
    **fields: Any,
) -> list[Any]:
    """Frames of a server -> client event; each picture is (name, Picture)."""
    header: dict[str, Any] = {"v": VERSION, "event": event, "id": request_id, **fields}
    if pictures:
        header["frames"] = [p.descriptor(name, index=i) for i, (name, p) in enumerate(pictures)]
    return [dumps(header), *(p.data for _, p in pictures)]


def error_frames(
    request_id: str | None, code: str, message: str, field: str | None = None
) -> list[Any]:
    return event_frames("error", request_id, code=code, message=message, field=field)


# ---------------------------------------------------------------------------- decoding


_ID_IN_RAW = re.compile(rb'"id"\s*:\s*"([^"\\]{1,%d})"' % MAX_ID_LENGTH)
_PEEK_BYTES = 2**20  # an oversized header up to this size is parsed for its id only


def peek_id(frames: Sequence[Any]) -> str | None:
    """The request id of a message that failed to decode, if it can be read; never raises.

    Headers up to 1 MiB are parsed as JSON; of a larger one, the first 4 KiB are searched
    for ``"id": "..."`` (clients put ``v``, ``op`` and ``id`` first).
    """
    try:
        raw = bytes(frames[0][:_PEEK_BYTES]) if len(frames[0]) <= _PEEK_BYTES else b""
        if raw:
            try:
                header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
                return _request_id(header) if isinstance(header, dict) else None
            except (ValueError, RecursionError):
                pass
        found = _ID_IN_RAW.search(bytes(frames[0][:4096]))
        return found.group(1).decode("utf-8") if found else None
    except Exception:  # noqa: BLE001 - best effort, for an error reply
        return None


def _header(frames: Sequence[Any], max_header_bytes: int) -> dict[str, Any]:
    if not frames:
        raise ProtocolError("bad_message", "empty message: frame 0 must be a JSON header")
    raw = frames[0]
    if len(raw) > max_header_bytes:
        raise ProtocolError(
            "too_large",
            f"header is {len(raw)} bytes; the limit is {max_header_bytes}",
            None,
            peek_id(frames),
        )
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError("bad_message", f"frame 0 is not UTF-8 ({e.reason})") from None
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("bad_message", f"frame 0 is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ProtocolError(
            "bad_message", f"frame 0 must be a JSON object, got {type(header).__name__}"
        )
    return header


def _request_id(header: Mapping[str, Any]) -> str | None:
    rid = header.get("id")
    if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LENGTH:
        return rid
    return None


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str, rid: str | None):
    """Unknown keys are errors: a typo must not silently fall back to a default."""
    allowed = tuple(allowed)
    for k in d:
        if k not in allowed:
            place = f" in {where}" if where else ""
            raise ProtocolError(
                "unknown_field",
                f"unknown key {k!r}{place}; allowed: {', '.join(allowed)}",
                f"{where}.{k}" if where else str(k),
                rid,
            )


def _dimension(d: Mapping[str, Any], key: str, where: str, rid: str | None) -> int:
    v = d.get(key)
    if not _is_int(v) or v <= 0:
        raise ProtocolError(
            "bad_field",
            f"{where}.{key} must be a positive integer, got {v!r}",
            f"{where}.{key}",
            rid,
        )
    return v


def decode_picture(
    descriptor: Any,
    data: Any,
    *,
    where: str,
    formats: Sequence[str] = tuple(FORMATS),
    max_pixels: int | None = None,
    rid: str | None = None,
) -> Picture:
    """Check one frame descriptor against its frame's bytes."""
    if not isinstance(descriptor, dict):
        raise ProtocolError(
            "bad_field", f"{where} must be an object, got {type(descriptor).__name__}", where, rid
        )
    _check_keys(descriptor, _DESCRIPTOR_KEYS, where, rid)
    fmt = descriptor.get("format")
    if fmt not in formats:
        raise ProtocolError(
            "bad_field",
            f"{where}.format is {fmt!r}; allowed here: {', '.join(formats)}",
            f"{where}.format",
            rid,
        )
    width = _dimension(descriptor, "width", where, rid)
    height = _dimension(descriptor, "height", where, rid)
    if max_pixels is not None and width * height > max_pixels:
        raise ProtocolError(
            "too_large",
            f"{where} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            where,
            rid,
        )
    pic = Picture(width, height, str(fmt), data)
    expected = pic.expected_bytes()
    if expected is not None and len(data) != expected:
        raise ProtocolError(
            "bad_frames",
            f"{where} ({fmt} {width}x{height}) needs {expected} bytes, the frame has {len(data)}",
            where,
            rid,
        )
    if expected is None and bytes(data[:8]) != PNG_SIGNATURE:
        raise ProtocolError("bad_frames", f"{where} is not PNG data (bad signature)", where, rid)
    return pic


def decode_event(frames: Sequence[Any], *, max_header_bytes: int = 16 * 2**20) -> Event:
    """Decode a server -> client event (the client trusts the server less than fully)."""
    header = _header(frames, max_header_bytes)
    event = header.get("event")
    if event not in EVENTS:
        raise ProtocolError("bad_message", f"unknown event {event!r}", "event", _request_id(header))
    rid = header.get("id")
    ev = Event(event, rid if isinstance(rid, str) else None, header)
    descriptors = header.get("frames", [])
    if not isinstance(descriptors, list) or len(descriptors) != len(frames) - 1:
        raise ProtocolError("bad_frames", "event frames do not match their descriptors", "frames")
    for i, d in enumerate(descriptors):
        ev.pictures.append((d, decode_picture(d, frames[i + 1], where=f"frames[{i}]")))
    return ev


# ---------------------------------------------------------------------------- helpers


def progress_fraction(event: Event) -> float:
    """0..1 from a ``progress`` event (for progress bars)."""
    step, total = event.header.get("step", 0), event.header.get("total", 0)
    try:
        return max(0.0, min(1.0, float(step) / float(total)))
    except (TypeError, ValueError, ZeroDivisionError):
        return 0.0
