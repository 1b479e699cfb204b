"""Control units over the bridge: each unit's image travels as a `control` frame with its
index, over real ZeroMQ sockets (pyzmq and the stdlib ZMTP client); an old client that
knows nothing of control still works; bad control frames are errors naming the field."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

zmq = pytest.importorskip("zmq")

from sdkit.bridge import Client, protocol, serve  # noqa: E402
from sdkit.bridge.client import BridgeError  # noqa: E402
from test_control import PROMPT, UNIT, arr, control_dir, engine, picture, scribble  # noqa: E402,F401


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    handle = serve(engine, "tcp://127.0.0.1:0")
    yield handle
    handle.stop()


@pytest.mark.parametrize("transport", ["zmq", "zmtp"])
def test_control_frames_give_the_engines_image(engine, server, transport):  # noqa: F811
    units = [
        {**UNIT, "image": scribble()},
        {"model": "tinycn2", "image": scribble(box=(10, 4, 28, 30)), "weight": 1.5},
    ]
    want = engine.txt2img(PROMPT, seed=3, control=units, progress=False)
    with Client(server.address, transport=transport, timeout=120) as client:
        got = client.txt2img(PROMPT, seed=3, control=units)
        assert np.array_equal(arr(got[0]), arr(want[0]))
        assert [{k: u[k] for k in ("model", "weight")} for u in got.request.control] == [
            {"model": "tinycn", "weight": 0.8},
            {"model": "tinycn2", "weight": 1.5},
        ]
        assert 'ControlNet 1: "Module: none, Model: tinycn2' in got.infotexts[0]
        # img2img: the image frame and a control frame side by side
        want = engine.img2img(picture(), PROMPT, seed=4, control=units[:1], progress=False)
        got = client.img2img(picture(), PROMPT, seed=4, control=units[:1])
        assert np.array_equal(arr(got[0]), arr(want[0]))


def test_a_transparent_control_layer_counts_as_black(engine, server):  # noqa: F811
    layer = Image.new("RGBA", (32, 32), (255, 255, 255, 0))  # an editor's paint layer
    ImageDraw.Draw(layer).ellipse((6, 6, 20, 20), outline=(255, 255, 255, 255), width=3)
    want = engine.txt2img(PROMPT, seed=5, control=[{**UNIT, "image": scribble()}], progress=False)
    with Client(server.address, timeout=120) as client:
        got = client.txt2img(PROMPT, seed=5, control=[{**UNIT, "image": layer}])
    assert np.array_equal(arr(got[0]), arr(want[0]))


class Raw:
    """A client as an old plug-in would write it: frames by hand on a DEALER socket."""

    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def ask(self, frames: list, rid: str, timeout: float = 120) -> protocol.Event:
        """Send `frames`; the terminal event (result or error) of request `rid`."""
        self.sock.send_multipart(frames)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if poller.poll(100):
                ev = protocol.decode_event(self.sock.recv_multipart())
                if ev.id == rid and (ev.terminal or ev.event == "hello"):
                    return ev
        raise AssertionError(f"no answer to {rid}")

    def close(self) -> None:
        self.sock.close()


def _rgba(image: Image.Image) -> protocol.Picture:
    rgba = image.convert("RGBA")
    return protocol.Picture(rgba.width, rgba.height, "rgba8", rgba.tobytes())


def test_an_old_client_still_works(engine, server):  # noqa: F811
    """A v1 client from before control: its hello and its frames as they were then."""
    raw = Raw(server.address)
    try:
        hello = raw.ask(protocol.request_frames("hello", "h1", client="old/1"), "h1")
        assert hello.event == "hello" and "control" in hello.header["formats"]
        assert hello.header["controls"] == ["tinycn", "tinycn2", "tinyxl"]
        request = {"mode": "img2img", "prompt": PROMPT, "seed": 6, "strength": 0.6}
        frames = [
            protocol.dumps(
                {
                    "v": 1,
                    "op": "generate",
                    "id": "g1",
                    "request": request,
                    "frames": [{"name": "image", "format": "rgba8", "width": 32, "height": 32}],
                }
            ),
            _rgba(picture()).data,
        ]
        ev = raw.ask(frames, "g1")
        assert ev.event == "result", ev.header
        got = Image.frombytes("RGBA", (32, 32), bytes(ev.pictures[0][1].data)).convert("RGB")
        want = engine.img2img(picture(), PROMPT, seed=6, strength=0.6, progress=False)
        assert np.array_equal(arr(got), arr(want[0]))
    finally:
        raw.close()


def _generate(request: dict, pictures: dict, rid: str) -> list:
    return protocol.request_frames("generate", rid, request=request, pictures=pictures)


@pytest.mark.parametrize(
    "request_fields,pictures,code,field",
    [
        # a frame for a unit the request does not have
        ({"control": [{"model": "tinycn"}]}, {"control[1]": None}, "bad_frames", "frames[0].index"),
        # the unit's image inside the header
        (
            {"control": [{"model": "tinycn", "image": "abc"}]},
            {},
            "bad_field",
            "request.control[0].image",
        ),
        # a unit without its frame
        ({"control": [{"model": "tinycn"}]}, {}, "bad_field", "request.control[0].image"),
        # a unit out of range
        (
            {"control": [{"model": "tinycn", "weight": 3}]},
            {"control[0]": None},
            "bad_field",
            "request.control[0].weight",
        ),
        # an unknown model
        (
            {"control": [{"model": "nosuch"}]},
            {"control[0]": None},
            "bad_field",
            "request.control[0].model",
        ),
        # a mode that takes no control
        (
            {"mode": "unconditional", "prompt": "", "control": [{"model": "tinycn"}]},
            {"control[0]": None},
            "bad_frames",
            "frames",
        ),
        # two frames for one unit
        (
            {"control": [{"model": "tinycn"}]},
            {"control[0]": None, "control[00]": None},
            "bad_frames",
            "frames[1].name",
        ),
    ],
)
def test_bad_control_frames_name_the_field(server, request_fields, pictures, code, field):
    raw = Raw(server.address)
    try:
        pics = {k: _rgba(scribble()) for k in pictures}
        request = {"prompt": PROMPT, **request_fields}
        ev = raw.ask(_generate(request, pics, "bad"), "bad")
        assert ev.event == "error" and (ev.code, ev.field) == (code, field), ev.header
    finally:
        raw.close()


def test_a_frame_index_that_is_not_a_unit_index_is_refused(server):
    raw = Raw(server.address)
    try:
        pic = _rgba(scribble())
        header = {
            "v": 1,
            "op": "generate",
            "id": "i1",
            "request": {"prompt": PROMPT, "control": [{"model": "tinycn"}]},
            "frames": [pic.descriptor("control", index="0")],
        }
        ev = raw.ask([protocol.dumps(header), pic.data], "i1")
        assert (ev.code, ev.field) == ("bad_field", "frames[0].index")
    finally:
        raw.close()


def test_client_errors_name_the_unit(server):
    with Client(server.address, timeout=60) as client:
        with pytest.raises(BridgeError) as e:
            client.txt2img(
                PROMPT, control=[{**UNIT, "image": scribble(), "start": 0.9, "end": 0.2}]
            )
    assert e.value.field == "request.control[0].start"
