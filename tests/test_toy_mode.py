"""A toy mode registered in this file alone, driven through every face of sdkit.

"grey" makes flat grey images: of the requested size, or, given an input image, of that
image's size and mean grey level. Registering it here (no other module edited) must be
enough for `Request.validate`, `Engine.check`/`submit`, `Engine.info()`, and the CLI (and
the widget and the bridge: their tests join this file and reuse the `toy_mode` fixture).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageStat

from sdkit import modes
from sdkit.cli import main
from sdkit.jobs import EventKind, JobState
from sdkit.request import Request, RequestError

TOY = "grey"


def run_grey(ctx) -> list[Image.Image]:
    """The toy runner: one progress step per image, cancel checked between images."""
    req = ctx.request
    level = 128
    if req.image is not None:
        level = round(ImageStat.Stat(req.image.convert("L")).mean[0])
    images = []
    for i in range(req.num_images):
        ctx.check_cancel()
        images.append(Image.new("RGB", (req.width, req.height), (level,) * 3))
        ctx.progress(i + 1, req.num_images)
    return images


TOY_SPEC = modes.ModeSpec(
    name=TOY,
    title="Flat grey",
    fields=("image", "width", "height", "seed", "num_images"),
    required=(),
    inputs=("image",),
    pipelines={},  # needs no diffusers pipeline: every model family serves it
    run=run_grey,
)


@pytest.fixture(scope="module")
def toy_mode():
    """The "grey" mode, registered for this module's tests and removed after them."""
    spec = modes.register(TOY_SPEC)
    yield spec
    modes.unregister(TOY)


def test_the_registry_knows_a_mode_and_forgets_it():
    """Uses its own name, so it holds whether or not the `toy_mode` fixture is active."""
    import dataclasses

    name = "grey-registry-test"
    with pytest.raises(RequestError) as err:
        Request(mode=name).validate()
    assert err.value.field == "mode" and "txt2img" in err.value.message
    spec = modes.register(dataclasses.replace(TOY_SPEC, name=name))
    try:
        assert modes.get(name) is spec and modes.registered()[-1] is spec
        assert spec.describe() == {
            "name": name,
            "title": "Flat grey",
            "fields": ["image", "width", "height", "seed", "num_images"],
            "required": [],
            "inputs": ["image"],
        }
        with pytest.raises(ValueError):
            modes.register(spec)  # one spec per name
        Request(mode=name, width=16, height=16).validate()
    finally:
        modes.unregister(name)
    assert name not in [s.name for s in modes.registered()]
    with pytest.raises(RequestError):
        Request(mode=name).validate()


def test_a_spec_naming_unknown_fields_is_refused():
    import dataclasses

    with pytest.raises(ValueError, match="unknown Request fields"):
        modes.register(dataclasses.replace(TOY_SPEC, name="bad", fields=("colour",)))
    assert "bad" not in [s.name for s in modes.registered()]


def test_toy_mode_through_engine_submit(sd_engine, toy_mode):
    assert TOY in [m["name"] for m in sd_engine.info()["modes"]]
    events = []
    job = sd_engine.submit(
        Request(mode=TOY, width=16, height=24, num_images=2, seed=3),
        callback=lambda kind, job, ev: events.append((kind, ev)),
    )
    result = job.result(timeout=60)
    assert job.state == JobState.DONE and job.wait_delivered(30)
    kinds = [k for k, _ in events]
    assert kinds == [
        EventKind.QUEUED,
        EventKind.STARTED,
        EventKind.PROGRESS,
        EventKind.PROGRESS,
        EventKind.DONE,
    ]
    # StrEnums compare equal to the plain strings too
    assert kinds == ["queued", "started", "progress", "progress", "done"]
    assert [ev.step for k, ev in events if k == "progress"] == [1, 2]
    assert result.seeds == [3, 4] and len(result) == 2
    assert result[0].size == (16, 24) and np.all(np.asarray(result[0]) == 128)


def test_toy_mode_takes_its_size_from_an_input_image(sd_engine, toy_mode):
    image = Image.new("RGB", (40, 24), (60, 60, 60))
    checked = sd_engine.check(Request(mode=TOY, image=image))
    assert (checked.width, checked.height) == (40, 24)
    result = sd_engine.submit(Request(mode=TOY, image=image)).result(timeout=60)
    assert result[0].size == (40, 24) and result[0].getpixel((0, 0)) == (60, 60, 60)
    with pytest.raises(RequestError) as err:
        sd_engine.check(Request(mode=TOY, width=20, height=16))
    assert err.value.field == "width" and "multiple of 8" in err.value.message


def test_toy_mode_through_the_cli(tiny_models, toy_mode, tmp_path, capsys):
    argv = [TOY, "--width", "16", "--height", "8", "--seed", "5", "--num-images", "1"]
    argv += ["--model", str(tiny_models["sd"]), "--device", "cpu", "--out", str(tmp_path)]
    code = main([*argv, "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    path = out.out.strip()
    assert path.endswith(".png") and Image.open(path).size == (16, 8)
    req = Request.from_png(path)
    assert req.mode == TOY and req.seed == 5
    Image.new("RGB", (24, 16), (90, 90, 90)).save(tmp_path / "in.png")
    argv = [TOY, "--image", str(tmp_path / "in.png"), "--model", str(tiny_models["sd"])]
    code = main([*argv, "--device", "cpu", "--out", str(tmp_path / "b"), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    made = Image.open(out.out.strip())
    assert made.size == (24, 16) and made.convert("RGB").getpixel((3, 3)) == (90, 90, 90)
    with pytest.raises(SystemExit):
        main([TOY, "--help"])
    assert "--num-images" in capsys.readouterr().out


def test_info_stays_json_safe_with_the_toy(sd_engine, toy_mode):
    info = json.loads(json.dumps(sd_engine.info()))
    assert {"name", "title", "fields", "required", "inputs"} <= set(info["modes"][-1])


def test_toy_mode_in_the_widget(sd_engine, toy_mode, tmp_path):
    """The widget's tabs come from the registry: the toy is a tab showing its own fields,
    and Generate through the widget produces (and keeps) its result."""
    from sdkit.widgets import SDWidget

    wd = SDWidget(engine=sd_engine, outputs_dir=tmp_path, seed=3)
    try:
        c = wd.controls
        assert c.mode_tabs.titles[-1] == "Flat grey"
        c.mode = TOY
        shown = {n for n, row in c.rows.items() if row.layout.display != "none"}
        assert shown == {"width", "height", "seed", "num_images"}
        assert wd.input_box.layout.display is None  # it takes an input picture
        c.width.value, c.height.value, c.num_images.value = 16, 24, 2
        job = wd.generate()
        wd.wait(60)
        assert job.state == JobState.DONE and job.request.mode == TOY
        items = wd.gallery.items
        assert [i.seed for i in items] == [4, 3] and items[0].source == "widget"
        assert items[0].image.size == (16, 24) and np.all(np.asarray(items[0].image) == 128)
        assert [Request.from_png(p).mode for p in tmp_path.glob("*.png")] == [TOY, TOY]
        # its picture input comes from the widget's canvas
        wd.set_request(Request(mode=TOY, image=Image.new("RGB", (16, 24), (60, 60, 60))))
        job = wd.generate()
        wd.wait(60)
        assert job.state == JobState.DONE
        assert wd.gallery.items[0].image.getpixel((0, 0)) == (60, 60, 60)
    finally:
        wd.close()


@pytest.mark.parametrize("transport", ["zmq", "zmtp"])
def test_toy_mode_through_the_bridge(sd_engine, toy_mode, transport):
    """The bridge carries the registered toy mode: `hello` describes it, a request runs it,
    and its optional picture input travels as a frame."""
    if transport == "zmq":
        pytest.importorskip("zmq")
    from sdkit.bridge import Client, serve

    handle = serve(sd_engine, "tcp://127.0.0.1:0")
    try:
        with Client(handle.address, transport=transport, timeout=120) as client:
            described = {m["name"]: m for m in client.hello()["modes"]}
            assert described[TOY] == TOY_SPEC.describe()
            events = []
            r = client.generate(
                mode=TOY, width=16, height=24, num_images=2, seed=3, progress=events.append
            )
            assert r.request.mode == TOY and r.seeds == [3, 4] and len(r) == 2
            assert r[0].size == (16, 24) and np.all(np.asarray(r[0].convert("RGB")) == 128)
            assert [(e.step, e.total) for e in events] == [(1, 2), (2, 2)]
            image = Image.new("RGB", (40, 24), (60, 60, 60))
            r = client.generate(mode=TOY, image=image)
            assert r[0].size == (40, 24) and r[0].convert("RGB").getpixel((5, 5)) == (60, 60, 60)
    finally:
        handle.stop()
