"""Wire format v1: encode/decode round trips and every error path of the decoder."""

from __future__ import annotations

import json

import pytest
from sdkit.bridge import inbound, tracker
from sdkit.bridge import protocol as P


def _gen(request=None, **header):
    h = {
        "v": 1,
        "op": "generate",
        "id": "r1",
        "request": {"prompt": "x"} if request is None else request,
    }
    h.update(header)
    return h


def _frames(header, *binary):
    return [json.dumps(header).encode(), *binary]


def _err(frames, limits=None) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        inbound.decode_request(frames, limits)
    return info.value


def test_protocol_module_uses_only_the_standard_library():
    import ast
    import sys
    from pathlib import Path

    import sdkit.bridge.inbound as inbound_mod
    import sdkit.bridge.zmtp as zmtp_mod

    for mod in (P, zmtp_mod, inbound_mod):
        tree = ast.parse(Path(mod.__file__).read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__", (mod.__name__, name)


def test_generate_round_trip_with_image_and_mask():
    image = P.Picture(3, 2, "rgba8", bytes(range(24)))
    mask = P.Picture(3, 2, "l8", b"\x00\xff\x80\x00\xff\x10")
    frames = P.generate_frames(
        "abc",
        {"mode": "inpaint", "prompt": "a red star", "seed": 5},
        image=image,
        mask=mask,
        preview=2,
    )
    assert len(frames) == 3
    msg = inbound.decode_request(frames)
    assert (msg.op, msg.id) == ("generate", "abc")
    assert msg.header["request"] == {"mode": "inpaint", "prompt": "a red star", "seed": 5}
    assert msg.header["preview"] == 2
    assert msg.pictures["image"].data == image.data and msg.pictures["image"].width == 3
    assert msg.pictures["mask"].format == "l8" and msg.pictures["mask"].height == 2


def test_png_frames_are_accepted_by_signature():
    png = P.PNG_SIGNATURE + b"rest-of-file"
    frames = P.generate_frames("p", {"mode": "img2img"}, image=P.Picture(8, 8, "png", png))
    assert inbound.decode_request(frames).pictures["image"].format == "png"


@pytest.mark.parametrize(
    "op,fields",
    [
        ("hello", {"client": "krita"}),
        ("ping", {"data": "x"}),
        ("status", {}),
        ("bye", {}),
        ("cancel", {"target": "r0"}),
    ],
)
def test_simple_ops_decode(op, fields):
    msg = inbound.decode_request(P.request_frames(op, "q1", **fields))
    assert msg.op == op and msg.id == "q1"


def test_event_round_trip_with_pictures():
    pic = P.Picture(2, 1, "rgba8", b"\x01\x02\x03\xff\x04\x05\x06\xff")
    frames = P.event_frames("result", "r9", [("image", pic), ("image", pic)], seeds=[1, 2])
    ev = P.decode_event(frames)
    assert ev.event == "result" and ev.id == "r9" and ev.terminal
    assert ev.header["seeds"] == [1, 2]
    assert [p.data for p in ev.pictures_named("image")] == [pic.data, pic.data]
    err = P.decode_event(P.error_frames("r9", "bad_field", "nope", "request.seed"))
    assert (err.code, err.message, err.field) == ("bad_field", "nope", "request.seed")


@pytest.mark.parametrize(
    "frames,code,field",
    [
        ([], "bad_message", None),
        ([b"\xff\xfe"], "bad_message", None),
        ([b"{not json"], "bad_message", None),
        ([b"[1, 2]"], "bad_message", None),
        ([b'{"v": NaN, "op": "ping", "id": "x"}'], "bad_message", None),
        ([b"[" * 100_000], "too_large", None),
        ([b"[" * 50_000 + b"]" * 50_000][:1], "too_large", None),
    ],
)
def test_undecodable_headers(frames, code, field):
    e = _err(frames)
    assert e.code == code and e.request_id is None


def test_deeply_nested_json_is_an_error_not_a_crash():
    deep = b"[" * 20_000 + b"]" * 20_000
    e = _err([deep], P.Limits(max_header_bytes=10**6))
    assert e.code == "bad_message"


@pytest.mark.parametrize(
    "header,code,field",
    [
        ({"op": "ping", "id": "a"}, "bad_version", "v"),
        ({"v": 2, "op": "ping", "id": "a"}, "bad_version", "v"),
        ({"v": "1", "op": "ping", "id": "a"}, "bad_version", "v"),
        ({"v": True, "op": "ping", "id": "a"}, "bad_version", "v"),
        ({"v": 1, "op": "ping"}, "bad_field", "id"),
        ({"v": 1, "op": "ping", "id": 7}, "bad_field", "id"),
        ({"v": 1, "op": "ping", "id": ""}, "bad_field", "id"),
        ({"v": 1, "op": "ping", "id": "x" * 129}, "bad_field", "id"),
        ({"v": 1, "op": "explode", "id": "a"}, "unknown_op", "op"),
        ({"v": 1, "id": "a"}, "unknown_op", "op"),
        ({"v": 1, "op": "ping", "id": "a", "colour": 1}, "unknown_field", "colour"),
        ({"v": 1, "op": "cancel", "id": "a"}, "bad_field", "target"),
        ({"v": 1, "op": "cancel", "id": "a", "target": 5}, "bad_field", "target"),
        ({"v": 1, "op": "hello", "id": "a", "client": 5}, "bad_field", "client"),
        ({"v": 1, "op": "hello", "id": "a", "versions": "1"}, "bad_field", "versions"),
        ({"v": 1, "op": "ping", "id": "a", "data": "x" * 300}, "bad_field", "data"),
        (_gen(request=[]), "bad_field", "request"),
        (_gen(request={"image": "aGk="}), "bad_field", "request.image"),
        (_gen(request={"width": 10**9}), "too_large", "request.width"),
        (
            _gen(request={"width": 4096, "height": 4096, "num_images": 4}),
            "too_large",
            "request.width",
        ),
        (_gen(preview=-1), "bad_field", "preview"),
        (_gen(preview="yes"), "bad_field", "preview"),
        (_gen(result_format="jpeg"), "bad_field", "result_format"),
        (_gen(frames={}), "bad_field", "frames"),
        (
            _gen(frames=[{"name": "image", "format": "rgba8", "width": 1, "height": 1}]),
            "bad_frames",
            "frames",
        ),
    ],
)
def test_header_errors_name_code_field_and_request_id(header, code, field):
    e = _err(_frames(header))
    assert e.code == code, e
    assert e.field == field, e
    expected_id = (
        header.get("id")
        if isinstance(header.get("id"), str) and 0 < len(header.get("id")) <= 128
        else None
    )
    assert e.request_id == expected_id
    assert e.code in P.ERROR_CODES
    assert str(e).startswith(code)


def _desc(**kw):
    d = {"name": "image", "format": "rgba8", "width": 2, "height": 2}
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "desc,data,code,field",
    [
        (_desc(), b"\x00" * 15, "bad_frames", "frames[0]"),  # truncated pixels
        (_desc(), b"\x00" * 17, "bad_frames", "frames[0]"),
        (_desc(width=-2), b"", "bad_field", "frames[0].width"),
        (_desc(width=0), b"", "bad_field", "frames[0].width"),
        (_desc(height=2.0), b"", "bad_field", "frames[0].height"),
        (_desc(width=10**6, height=10**6), b"", "too_large", "frames[0]"),
        (_desc(format="bgra"), b"", "bad_field", "frames[0].format"),
        (_desc(name="mask"), b"\x00" * 16, "bad_field", "frames[0].format"),  # mask must be l8/png
        (_desc(name="depth"), b"", "bad_field", "frames[0].name"),
        (_desc(extra=1), b"\x00" * 16, "unknown_field", "frames[0].extra"),
        (_desc(format="png"), b"GIF89a..", "bad_frames", "frames[0]"),
        ("image", b"", "bad_field", "frames[0]"),
    ],
)
def test_frame_errors(desc, data, code, field):
    e = _err(_frames(_gen(frames=[desc]), data))
    assert (e.code, e.field, e.request_id) == (code, field, "r1"), e


def test_duplicate_frames_and_mismatched_mask():
    d = _desc()
    e = _err(_frames(_gen(frames=[d, d]), b"\0" * 16, b"\0" * 16))
    assert e.code == "bad_frames" and "second" in e.message
    m = {"name": "mask", "format": "l8", "width": 1, "height": 1}
    e = _err(_frames(_gen(frames=[d, m]), b"\0" * 16, b"\0"))
    assert e.code == "bad_frames" and "mask is 1x1" in e.message


def test_limits_on_bytes_frames_and_header():
    limits = P.Limits(max_message_bytes=100, max_frames=2, max_header_bytes=200)
    e = _err(_frames(_gen(frames=[_desc(width=5, height=5)]), b"\0" * 100), limits)
    assert e.code == "too_large" and e.request_id == "r1" and "100" in e.message
    e = _err(_frames({"v": 1, "op": "ping", "id": "a"}, b"", b""), limits)
    assert e.code == "too_large" and "frames" in e.message
    e = _err(_frames({"v": 1, "op": "ping", "id": "a", "data": "x" * 300}), limits)
    assert e.code == "too_large" and "header" in e.message


def test_ops_other_than_generate_take_no_frames():
    e = _err(_frames({"v": 1, "op": "ping", "id": "a"}, b"x"))
    assert (e.code, e.request_id) == ("bad_frames", "a")


def test_decode_event_rejects_garbage():
    with pytest.raises(P.ProtocolError):
        P.decode_event([b'{"v":1,"event":"boom","id":"x"}'])
    with pytest.raises(P.ProtocolError):
        P.decode_event([b'{"v":1,"event":"result","id":"x","frames":[{}]}'])


def test_progress_fraction():
    ev = P.Event("progress", "x", {"step": 3, "total": 4})
    assert P.progress_fraction(ev) == 0.75
    assert P.progress_fraction(P.Event("progress", "x", {"total": 0})) == 0.0


class _LoopbackTransport:
    """An in-memory transport: what the session sends, and what a test hands back."""

    def __init__(self):
        self.epoch = 0
        self.sent: list[list[bytes]] = []
        self.incoming: list[list[bytes]] = []

    def send_multipart(self, frames):
        self.sent.append([bytes(f) for f in frames])

    def poll(self, timeout=0.0):
        out, self.incoming = self.incoming, []
        return out

    def close(self):
        pass


def test_session_tracks_requests_and_turns_a_dropped_connection_into_errors():
    t = _LoopbackTransport()
    s = tracker.Session(t, client="test")
    rid = s.generate({"prompt": "a red circle"}, image=P.Picture(1, 1, "rgba8", b"\0\0\0\xff"))
    assert inbound.decode_request(t.sent[-1]).pictures["image"].width == 1
    t.incoming.append(P.event_frames("accepted", rid, position=0))
    t.incoming.append(P.event_frames("progress", rid, step=1, total=2))
    t.incoming.append(P.event_frames("progress", "someone-else", step=1, total=2))
    evs = s.poll()
    assert [e.event for e in evs] == ["accepted", "progress"] and rid in s.pending
    h = s.hello()
    t.epoch += 1  # the transport lost its connection: nothing sent before can be answered
    evs = s.poll()
    assert {e.id for e in evs} == {rid, h}
    assert all(e.event == "error" and e.code == "connection_lost" for e in evs)
    assert not s.pending
    rid2 = s.generate({"prompt": "again"})
    t.incoming.append(P.event_frames("result", rid2, seeds=[1]))
    assert [e.event for e in s.poll()] == ["result"] and not s.pending


def test_session_timeout_cancels_and_reports():
    t = _LoopbackTransport()
    s = tracker.Session(t)
    rid = s.generate({"prompt": "x"}, timeout=0.0)
    evs = s.poll()
    assert [(e.event, e.code, e.id) for e in evs] == [("error", "timeout", rid)]
    assert inbound.decode_request(t.sent[-1]).op == "cancel"
    with pytest.raises(ValueError):
        s.generate({"prompt": "y"}, request_id="dup")
        s.generate({"prompt": "y"}, request_id="dup")


# -- issue 13.1: wrong-shape headers never raise anything but ProtocolError -----------------

_SHAPES = ([0, True], {"a": 1}, 7, -1, 2**70, 1.5, "x", "", None, True, [], {})


def _valid_headers():
    """Well-formed headers of every op, with frames, to mutate one field at a time."""
    desc = [
        {"name": "image", "format": "rgba8", "width": 2, "height": 2},
        {"name": "mask", "format": "l8", "width": 2, "height": 2},
    ]
    gen = _gen({"mode": "inpaint", "prompt": "x", "width": 8}, frames=desc, preview=1)
    yield gen, [b"\0" * 16, b"\0" * 4]
    yield _gen(result_format="png"), []
    yield {"v": 1, "op": "hello", "id": "h", "client": "k", "versions": [1]}, []
    yield {"v": 1, "op": "cancel", "id": "c", "target": "r1"}, []
    yield {"v": 1, "op": "ping", "id": "p", "data": "d"}, []


def _mutations(value, path=()):
    """(path, replacement) for every key and list item of ``value``, every shape."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, sub in items:
        for shape in _SHAPES:
            yield (*path, key), shape
        if isinstance(sub, dict | list):
            yield from _mutations(sub, (*path, key))


def _replaced(value, path, new):
    value = json.loads(json.dumps(value))
    target = value
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return value


def test_fuzz_wrong_shape_headers_only_raise_protocol_errors():
    n = 0
    for header, binary in _valid_headers():
        inbound.decode_request(_frames(header, *binary))  # the unmutated header is valid
        for path, shape in _mutations(header):
            frames = _frames(_replaced(header, path, shape), *binary)
            n += 1
            try:
                inbound.decode_request(frames)
            except P.ProtocolError:
                pass
            try:  # the same header, read as an event by a client
                P.decode_event([frames[0].replace(b'"op"', b'"event"'), *binary])
            except P.ProtocolError:
                pass
    assert n > 300


def test_a_descriptor_name_that_is_a_list_is_a_bad_field():
    header = _gen(
        {"mode": "img2img", "prompt": "x"},
        frames=[{"name": [0, True], "format": "l8", "width": 8, "height": 8}],
    )
    e = _err(_frames(header, b"\0" * 64))
    assert (e.code, e.field, e.request_id) == ("bad_field", "frames[0].name", "r1")


def test_an_oversized_header_is_answered_with_its_id():
    """Issue 13.7: a 70 KB prompt; the too_large error must carry the id, or the client hangs."""
    header = {"v": 1, "op": "generate", "id": "big1", "request": {"prompt": "x" * 70_000}}
    e = _err(_frames(header))
    assert (e.code, e.request_id) == ("too_large", "big1")
    huge = {"v": 1, "op": "generate", "id": "big2", "request": {"prompt": "x" * 3_000_000}}
    e = _err(_frames(huge), P.Limits(max_message_bytes=2**30))
    assert (e.code, e.request_id) == ("too_large", "big2")  # found in the first bytes
    assert P.peek_id([b"\xff" * 10]) is None and P.peek_id([]) is None
