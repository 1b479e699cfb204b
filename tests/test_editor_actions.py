"""The plug-ins' connection and actions (bridge/editor_connection.py, editor_actions.py).

Modes, sizes and limits come from the server's hello; the wire path runs against the
real bridge server on a tiny engine.
"""

from __future__ import annotations

import pytest
from sdkit.bridge import editor_actions as ea
from sdkit.bridge import editor_connection as ec
from sdkit.bridge import editor_geometry as geo
from sdkit.bridge.editor_geometry import Rect

TOY = {
    "name": "toy",
    "title": "Toy repaint",
    "fields": ["prompt", "seed", "strength"],
    "required": ["image", "mask"],
    "inputs": ["image", "mask"],
}


def test_modes_come_from_hello_descriptions():
    modes = ec.modes_from_hello(
        {
            "modes": [
                {"name": "txt2img", "title": "Text to image", "fields": ["prompt"], "inputs": []},
                TOY,
                {"name": "control", "title": "Needs a control image", "inputs": ["control"]},
                {"title": "no name"},
                7,
            ]
        }
    )
    assert [(m.name, m.title, m.inputs) for m in modes] == [
        ("txt2img", "Text to image", ()),
        ("toy", "Toy repaint", ("image", "mask")),
    ]  # modes needing pictures an editor cannot read, and garbage, are left out
    assert modes[1].needs_selection and modes[1].fields == ("prompt", "seed", "strength")


def test_bare_mode_names_or_no_list_fall_back_to_the_standard_three():
    names = ec.modes_from_hello({"modes": ["txt2img", "img2img", "inpaint", "unconditional"]})
    assert [m.name for m in names] == ["txt2img", "img2img", "inpaint"]
    assert ec.modes_from_hello({}) == ec.FALLBACK_MODES


def test_a_request_carries_only_the_fields_its_mode_reads():
    toy = ec.modes_from_hello({"modes": [TOY]})[0]
    params = ea.Params(prompt="p", negative_prompt="n", num_inference_steps=3, seed=4)
    assert params.request(toy, 16, 8) == {"mode": "toy", "prompt": "p", "seed": 4, "strength": 0.75}
    t2i = ec.FALLBACK_MODES[0]
    assert "strength" not in params.request(t2i)


def test_a_toy_mode_from_hello_plans_like_inpaint_with_the_servers_multiple():
    toy = ec.modes_from_hello({"modes": [TOY]})[0]
    w, h = 40, 30
    with pytest.raises(geo.SelectionError, match="Toy repaint needs a selection"):
        ea.plan_action(toy, ea.Params(), (w, h), None, None, None)
    action = ea.plan_action(
        toy,
        ea.Params(prompt="x"),
        (w, h),
        Rect(3, 3, 5, 5),
        lambda r: bytes(4 * r.area),
        lambda r: b"\xff" * r.area,
        margin=0,
        multiple=16,
    )
    kwargs = action.request_kwargs()
    assert (kwargs["image"].width, kwargs["image"].height) == (16, 16)
    assert kwargs["mask"].format == "l8" and kwargs["request"]["mode"] == "toy"


def test_connection_reads_size_multiple_ranges_and_modes_from_hello():
    conn = ec.Connection("tcp://127.0.0.1:1")
    assert conn.size_multiple == geo.DEFAULT_MULTIPLE and conn.modes == ec.FALLBACK_MODES

    class FakeSession:
        info = {
            "model": {"size_multiple": 16, "ranges": {"num_inference_steps": [1, 150]}},
            "modes": [TOY],
        }
        limits = None

    conn.session, conn.state = FakeSession(), "connected"
    assert conn.size_multiple == 16
    assert conn.field_range("num_inference_steps") == (1, 150)
    assert conn.field_range("seed") is None
    assert [m.name for m in conn.modes] == ["toy"]
    with pytest.raises(geo.EditorError, match="does not offer 'inpaint' .*toy"):
        conn.mode("inpaint")
    conn.session = None


def test_default_address_is_the_servers_default_bind():
    from sdkit.bridge import server

    assert ec.DEFAULT_ADDRESS == server.DEFAULT_BIND


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    """The real server on a tiny random-weight SD pipeline (only that one is built)."""
    from sdkit.bridge import serve

    from sdkit.engine import Engine
    from tests import tiny

    folder = tmp_path_factory.mktemp("tiny-sd") / "sd"
    engine = Engine(tiny.save(tiny.sd_pipeline(folder), folder, tiny.TINY_DEFAULTS), device="cpu")
    handle = serve(engine, bind="tcp://127.0.0.1:0")
    yield handle.address
    handle.stop()
    engine.close()


def _canvas(width, height):
    rgba = bytearray()
    for y in range(height):
        for x in range(width):
            rgba += bytes([(x * 7) % 256, (y * 5) % 256, 90, 255])
    return bytes(rgba)


def test_inpaint_selection_round_trip(bridge):
    w, h = 45, 37
    rgba = _canvas(w, h)
    sel = Rect(11, 9, 13, 11)
    mask = bytearray(w * h)
    for y in range(sel.y, sel.bottom):
        for x in range(sel.x, sel.right):
            mask[y * w + x] = 255
    mask[sel.y * w + sel.x] = 100  # one soft pixel
    conn = ec.Connection(bridge)
    conn.wait_ready()
    assert conn.state == "connected" and conn.default_size() == (32, 32)
    action = ea.plan_action(
        conn.mode("inpaint"),
        ea.Params(prompt="a red circle", num_inference_steps=2, seed=42),
        (w, h),
        sel,
        lambda r: geo.crop(rgba, w, h, r, 4),
        lambda r: geo.crop(bytes(mask), w, h, r, 1),
        margin=8,
    )
    region = action.prepared.region
    assert region.width % 8 == 0 and region.height % 8 == 0
    statuses = []
    placement = ea.run_blocking(conn, action, on_progress=lambda a: statuses.append(a.state))
    conn.close()
    assert "running" in statuses and action.state == "done"
    assert action.preview is not None  # previews were asked for and arrived
    assert (placement.x, placement.y, placement.width, placement.height) == (11, 9, 13, 11)
    assert placement.name == "[sdkit] a red circle (42)"
    alpha = placement.rgba[3::4]
    assert alpha[0] == 100 and set(alpha[1:]) == {255}


def test_txt2img_uses_the_requested_size_and_the_origin(bridge):
    conn = ec.Connection(bridge)
    conn.wait_ready()
    action = ea.plan_action(
        conn.mode("txt2img"),
        ea.Params(prompt="a blue square", num_inference_steps=2, seed=3, width=24, height=16),
        (100, 100),
        Rect(5, 6, 10, 10),
        None,
        None,
    )
    placement = ea.run_blocking(conn, action)
    conn.close()
    assert (placement.x, placement.y, placement.width, placement.height) == (5, 6, 24, 16)
    assert len(placement.rgba) == 24 * 16 * 4


def test_cancel_ends_the_action_as_cancelled(bridge):
    conn = ec.Connection(bridge)
    conn.wait_ready()
    action = ea.Action(
        conn.mode("txt2img"), ea.Params(prompt="x", num_inference_steps=500, width=32, height=32)
    )
    action.start(conn)
    while action.state not in ("running",) and not action.done:
        for ev in conn.poll(0.05):
            action.handle(ev)
    action.cancel(conn)
    while not action.done:
        for ev in conn.poll(0.05):
            action.handle(ev)
    conn.close()
    assert action.state == "cancelled" and action.placement is None


def test_server_errors_name_the_field(bridge):
    conn = ec.Connection(bridge)
    action = ea.Action(ec.FALLBACK_MODES[0], ea.Params(prompt="x", width=30, height=32))
    with pytest.raises(geo.EditorError, match="width"):
        ea.run_blocking(conn, action)
    conn.close()


def test_dead_server_is_a_clear_error_not_a_hang():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = ec.Connection(f"tcp://127.0.0.1:{port}", hello_timeout=1.0)
    with pytest.raises(geo.EditorError, match="no sdkit server answers .* `sdkit serve`"):
        conn.wait_ready()
    assert conn.state == "failed"


def test_a_request_over_the_servers_limits_fails_at_once(bridge):
    """Issue 13.7: a 70 KB prompt breaks the 64 KiB header limit from hello; nothing is sent."""
    conn = ec.Connection(bridge)
    conn.wait_ready()
    limit = conn.limits.max_header_bytes
    action = ea.Action(conn.mode("txt2img"), ea.Params(prompt="x" * (limit + 4000)))
    with pytest.raises(geo.EditorError, match=f"at most {limit} .*request.prompt"):
        action.start(conn)
    assert action.job is None and not conn.session.pending
    small = ea.Action(
        conn.mode("txt2img"), ea.Params(prompt="x", num_inference_steps=1, width=8, height=8)
    )
    assert ea.run_blocking(conn, small).width == 8  # the connection is fine afterwards
    conn.close()
