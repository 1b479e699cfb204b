"""Control layers for the editor plug-ins (bridge/editor_control.py, issue 15.5), outside the
editors: the layer's pixels in the request's area become unit 0's control frame, and over
the real bridge on the embedded model a scribble layer steers where the shape lands."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sdkit.bridge import editor_actions as ea
from sdkit.bridge import editor_control as ec
from sdkit.bridge import editor_geometry as geo
from sdkit.bridge.editor_connection import Connection, ModeInfo

from sdkit.embedded import scribbles

PROMPT = "a red circle on a green background"
TXT2IMG = ModeInfo("txt2img", "Generate", ("prompt", "width", "height", "control"), (), ())


def scribble_layer(size: tuple[int, int], cx: float, cy: float, r: float = 12) -> Image.Image:
    """White strokes on a transparent layer, as an artist paints them."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).ellipse((cx - r, cy - r, cx + r, cy + r), outline="white", width=3)
    return layer


def reader(image: Image.Image, calls: list | None = None):
    def read(rect: geo.Rect) -> bytes:
        if calls is not None:
            calls.append(rect)
        return image.crop((rect.x, rect.y, rect.right, rect.bottom)).tobytes()

    return read


def test_the_layer_under_the_area_over_black_padded_beyond_the_canvas():
    layer = Image.new("RGBA", (70, 60), (200, 100, 50, 128))
    layer.putpixel((10, 5), (255, 255, 255, 0))
    action = ea.Action(TXT2IMG, ea.Params(width=64, height=64), origin=(10, 5))
    calls: list = []
    pic = ec.control_picture(action, (70, 60), reader(layer, calls))
    assert calls == [geo.Rect(10, 5, 60, 55)]  # only what lies on the canvas is read
    assert (pic.width, pic.height, pic.format) == (64, 64, "rgba8")
    px = np.frombuffer(pic.data, np.uint8).reshape(64, 64, 4)
    assert (px[..., 3] == 255).all()
    assert px[0, 0].tolist() == [0, 0, 0, 255]  # transparent -> black
    assert px[1, 1].tolist() == [100, 50, 25, 255]  # half alpha over black
    assert (px[55:, :, :3] == 0).all() and (px[:, 60:, :3] == 0).all()  # beyond the canvas


def test_attach_sends_unit_zero_with_its_frame_and_refuses_modes_without_control():
    action = ea.Action(TXT2IMG, ea.Params(prompt="x", width=8, height=8))
    pic = ec.control_picture(action, (8, 8), lambda r: bytes(4 * r.area))
    ec.attach(action, ec.ControlChoice("sdkscribble", weight=1.5, end=0.8), pic)
    kwargs = action.request_kwargs()
    assert kwargs["request"]["control"] == [
        {"model": "sdkscribble", "weight": 1.5, "start": 0.0, "end": 0.8, "module": "none"}
    ]
    assert kwargs["control"] == {0: pic}
    other = ea.Action(ModeInfo("outpaint", "Expand", ("prompt", "left")), ea.Params())
    with pytest.raises(geo.EditorError, match="Expand takes no control layer"):
        ec.attach(other, ec.ControlChoice("sdkscribble"), pic)


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("zmq")
    from sdkit.bridge import serve

    import sdkit

    engine = sdkit.load()
    handle = serve(engine, bind="tcp://127.0.0.1:0")
    yield handle.address
    handle.stop()
    engine.close()


def test_an_unknown_control_model_names_the_offered_ones(server):
    conn = Connection(server)
    try:
        conn.wait_ready()
        assert conn.adapters("controls") == ["sdkscribble"]
        with pytest.raises(geo.EditorError, match="no control model 'nope'.*sdkscribble"):
            ec.check_model(conn, "nope")
    finally:
        conn.close()


@pytest.mark.slow
def test_a_scribble_layer_steers_the_shape_over_the_real_bridge(server):
    """A 96x80 canvas, Generate at the selection's corner (16, 8): the layer's circle at the
    left or right of that 64x64 area puts the embedded model's shape on that side."""
    conn = Connection(server)
    centres = {}
    try:
        conn.wait_ready()
        mode = conn.mode("txt2img")
        for side, cx in (("left", 16 + 18), ("right", 16 + 46)):
            layer = scribble_layer((96, 80), cx, 8 + 32)
            params = ea.Params(prompt=PROMPT, seed=1, width=64, height=64)
            action = ea.plan_action(
                mode, params, (96, 80), geo.Rect(16, 8, 20, 20), reader(layer), lambda r: None
            )
            pic = ec.control_picture(action, (96, 80), reader(layer))
            ec.attach(action, ec.ControlChoice(ec.check_model(conn, "sdkscribble")), pic)
            placement = ea.run_blocking(conn, action, timeout=300)
            assert (placement.x, placement.y, placement.width, placement.height) == (16, 8, 64, 64)
            result = Image.frombytes("RGBA", (64, 64), placement.rgba).convert("RGB")
            ys, xs = np.nonzero(scribbles.blob(result))
            centres[side] = xs.mean()
    finally:
        conn.close()
    assert centres["left"] < 28 and centres["right"] > 36, centres
