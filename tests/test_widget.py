"""SDWidget without a browser: widgets driven from Python with the messages the front end sends.

A real engine (the embedded model, and a tiny SD 1.x-shaped model with VAE factor 8) runs
every generation. Exceptions raised in widget callbacks (which ipywidgets and the engine
only log) fail the test. What must not happen is waited for on an event, with a timeout.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from ipycanvas.canvas import _CanvasManager
from PIL import Image, PngImagePlugin
from sdkit.widgets import SDWidget, gallery
from sdkit.widgets.controls import RequestControls
from sdkit.widgets.painter import MaskPainter

import sdkit
from sdkit import modes
from sdkit.engine import Engine
from sdkit.models import LoadedModel
from sdkit.request import Request, RequestError

# ----------------------------------------------------------------------------- helpers


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def callback_errors():
    """Fail on exceptions swallowed in callbacks.

    ipywidgets logs "Exception in callback/widget method" to the traitlets logger (no
    IPython here), the engine logs a failing listener to "sdkit.engine", the widget logs
    its own guarded failures to "sdkit.widgets".
    """
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("traitlets", "sdkit")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.records
    for lg in loggers:
        lg.removeHandler(handler)
    bad = [
        r
        for r in handler.records
        if r.levelno >= logging.ERROR or r.getMessage().startswith("Exception in")
    ]
    assert not bad, "exceptions in widget callbacks:\n" + "\n".join(
        f"{r.name}: {r.getMessage()}" for r in bad
    )


def frontend_custom(widget, content: dict) -> None:
    """Deliver a custom comm message exactly as the browser sends it."""
    widget._handle_msg(
        {"content": {"data": {"method": "custom", "content": content}}, "buffers": []}
    )


def mouse(painter: MaskPainter, event: str, x: float, y: float) -> None:
    frontend_custom(painter.canvas, {"event": f"mouse_{event}", "x": x, "y": y})


def upload(widget, name: str, data: bytes) -> None:
    """A FileUpload state update as the front end sends it (content as a binary buffer)."""
    state = {
        "value": [
            {
                "name": name,
                "type": "image/png",
                "size": len(data),
                "content": None,
                "last_modified": 0,
            }
        ]
    }
    widget._handle_msg(
        {
            "content": {
                "data": {
                    "method": "update",
                    "state": state,
                    "buffer_paths": [["value", 0, "content"]],
                }
            },
            "buffers": [memoryview(data)],
        }
    )


def expected_stroke(shape, points, radius):
    """Brute force: pixel centres within `radius` of the polyline (image coordinates)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    best = np.full(shape, np.inf)
    segs = list(zip(points, points[1:], strict=False)) or [(points[0], points[0])]
    for (ax, ay), (bx, by) in segs:
        d = np.array([bx - ax, by - ay])
        n2 = float(d @ d)
        t = (
            np.zeros(shape)
            if n2 == 0
            else np.clip(((xx - ax) * d[0] + (yy - ay) * d[1]) / n2, 0, 1)
        )
        best = np.minimum(best, np.hypot(xx - (ax + t * d[0]), yy - (ay + t * d[1])))
    return best <= radius


def png_with_parameters(image: Image.Image, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine():
    return sdkit.load()


@pytest.fixture(scope="module")
def f8_engine(tmp_path_factory):
    """A tiny SD 1.x-shaped model whose VAE factor is 8 (the embedded model's is 4)."""
    import tiny
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    tok = tiny.tokenizer(tmp_path_factory.mktemp("f8") / "tokenizer")
    torch.manual_seed(2)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny.text_encoder(tok),
        tokenizer=tok,
        unet=tiny.unet(),
        scheduler=tiny.scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    model = LoadedModel(
        pipe=pipe,
        spec="tiny-f8",
        name="tiny-f8",
        family="sd1",
        device=torch.device("cpu"),
        dtype=torch.float32,
        defaults={**tiny.TINY_DEFAULTS, "width": 64, "height": 64},
    )
    engine = Engine.from_loaded(model)
    assert engine.vae_factor == 8
    yield engine
    engine.close()


@pytest.fixture
def studio(engine, tmp_path):
    wd = SDWidget(
        engine=engine,
        prompt="a red circle on a blue background",
        num_inference_steps=4,
        seed=11,
        outputs_dir=tmp_path / "outputs",
    )
    yield wd
    wd.cancel()
    wd.wait(60)
    wd.close()


# ----------------------------------------------------------------------------- painter


def test_stroke_is_round_capped_segments_at_image_resolution():
    p = MaskPainter(64, 64, display_size=320)  # 5 canvas px per image px
    assert (p.canvas.width, p.canvas.height) == (320, 320)
    assert p.canvas.layout.width == "320px"
    p.brush_size.value = 6
    # throttled moves: far apart points must still join into one stroke
    pts = [(20.0, 40.0), (150.0, 60.0), (290.0, 250.0)]
    mouse(p, "down", *pts[0])
    mouse(p, "move", *pts[1])
    mouse(p, "up", *pts[2])
    img_pts = [(x / 5, y / 5) for x, y in pts]
    want = expected_stroke((64, 64), img_pts, 3.0)
    got = p.mask > 0
    assert got.sum() > 200
    np.testing.assert_array_equal(got, want)
    assert set(np.unique(p.mask)) == {0, 255}
    assert p.strokes == 1
    # midway between two event points is painted (a line, not dots)
    mx, my = (img_pts[1][0] + img_pts[2][0]) / 2, (img_pts[1][1] + img_pts[2][1]) / 2
    assert p.mask[int(my), int(mx)] == 255
    assert "1 stroke" in p.info.value


def test_events_map_through_canvas_size_to_image_pixels():
    p = MaskPainter(100, 50, display_size=200)  # canvas 200x100, 2 canvas px per image px
    p.set_image(Image.new("RGB", (100, 50), (0, 0, 255)))
    assert (p.canvas.width, p.canvas.height) == (200, 100)
    p.brush_size.value = 1
    mouse(p, "down", 150.0, 60.0)
    mouse(p, "up", 150.0, 60.0)
    ys, xs = np.nonzero(p.mask)
    assert (xs.tolist(), ys.tolist()) == ([75], [30])
    assert p.mask_image().size == (100, 50)


def test_mouse_moves_without_button_do_not_paint_and_out_ends_stroke():
    p = MaskPainter(64, 64)
    mouse(p, "move", 100, 100)
    assert not p.mask.any()
    mouse(p, "down", 100, 100)
    mouse(p, "out", 200, 100)
    mouse(p, "move", 300, 300)  # after leaving the canvas: no painting
    assert p.mask[60, 60] == 0
    assert p.strokes == 1


def test_erase_clear_invert_fill():
    p = MaskPainter(64, 64)
    p.brush_size.value = 10
    p.fill_button.click()
    assert p.mask.all()
    p.tool.value = "erase"
    mouse(p, "down", 160, 160)
    mouse(p, "up", 160, 160)
    assert p.mask[32, 32] == 0 and p.mask[0, 0] == 255
    erased = p.mask == 0
    p.invert_button.click()
    np.testing.assert_array_equal(p.mask == 255, erased)
    p.clear_button.click()
    assert not p.mask.any()


def test_touch_events_paint_too():
    p = MaskPainter(64, 64)
    p.brush_size.value = 2
    frontend_custom(p.canvas, {"event": "touch_start", "touches": [{"x": 10, "y": 10}]})
    frontend_custom(p.canvas, {"event": "touch_move", "touches": [{"x": 300, "y": 10}]})
    frontend_custom(p.canvas, {"event": "touch_end", "touches": [{"x": 300, "y": 10}]})
    assert p.mask[2, 2] == 255 and p.mask[2, 59] == 255 and p.mask[2, 30] == 255
    assert p.strokes == 1


def test_canvas_redraws_when_a_browser_connects(monkeypatch):
    sent: list[tuple] = []
    original = _CanvasManager._send_custom

    def record(self, command, buffers=()):
        sent.append((command, list(buffers)))
        return original(self, command, list(buffers))

    p = MaskPainter(64, 64, display_size=320)
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    image.paste((255, 0, 0), (16, 16, 48, 48))
    p.set_image(image)
    monkeypatch.setattr(_CanvasManager, "_send_custom", record)
    # what a (re)loaded page's canvas model sends once it can draw
    frontend_custom(p.canvas._canvases[-1], {"event": "client_ready"})
    pngs = [Image.open(io.BytesIO(bytes(b))) for _, bufs in sent for b in bufs]
    full = [im for im in pngs if im.size == (320, 320) and im.getextrema()[3] == (255, 255)]
    assert full, "no full-size image was sent on client_ready"
    shown = np.asarray(full[0].convert("RGB"))
    assert tuple(shown[160, 160]) == (255, 0, 0) and tuple(shown[10, 10]) == (0, 0, 255)


# ----------------------------------------------------------------------------- controls


def test_mode_tabs_show_only_their_fields():
    c = RequestControls()
    specs = modes.registered()
    assert [m["name"] for m in c.modes] == [s.name for s in specs]
    assert c.mode_tabs.titles == tuple(s.title for s in specs)
    for index, spec in enumerate(specs):
        c.mode = spec.name
        shown = {n for n, row in c.rows.items() if row.layout.display != "none"}
        # pictures are the painter's; control units are not a row of fields (issue 15.5)
        assert shown == set(spec.fields) - {"image", "mask", "control"}, spec.name
        assert c.mode_tabs.children[index].children == (c.body,)
        assert all(not t.children for i, t in enumerate(c.mode_tabs.children) if i != index)


def test_tabs_and_field_groups_come_from_the_mode_descriptions():
    sketch = {
        "name": "sketch",
        "title": "Sketch",
        "fields": ["prompt", "seed", "image", "strength"],
        "required": ["image"],
        "inputs": ["image"],
    }
    c = RequestControls(modes=[modes.get("txt2img").describe(), sketch])
    assert c.mode_tabs.titles == ("Text to image", "Sketch")
    c.mode = "sketch"
    shown = {n for n, row in c.rows.items() if row.layout.display != "none"}
    assert shown == {"prompt", "seed", "strength"}
    visible = {k for k, g in c.groups.items() if g.layout.display != "none"}
    assert visible == {"prompts", "sampling", "image"}
    c.prompt.value, c.seed.value, c.strength.value = "a star", 3, 0.5
    r = c.request(image=Image.new("RGB", (8, 8)))
    assert (r.mode, r.prompt, r.seed, r.strength) == ("sketch", "a star", 3, 0.5)
    assert r.num_inference_steps is None and r.width is None  # fields it does not read
    with pytest.raises(RequestError, match="allowed: txt2img, sketch"):
        c.mode = "inpaint"


def test_tabs_follow_the_modes_the_engine_serves(ddpm_engine):
    """An unconditional-only model serves one built-in mode: the widget offers only that."""
    wd = SDWidget(engine=ddpm_engine, outputs_dir=None)
    try:
        served = [m["name"] for m in ddpm_engine.info()["modes"]]
        assert [m["name"] for m in wd.controls.modes] == served
        assert "txt2img" not in served and wd.controls.mode == "unconditional"
        assert wd.input_box.layout.display == "none"
        with pytest.raises(RequestError):
            wd.controls.mode = "txt2img"
    finally:
        wd.close()


def test_controls_build_the_request_for_each_mode():
    c = RequestControls()
    c.prompt.value = "a green star on a white background"
    c.negative_prompt.value = "blurry"
    c.num_inference_steps.value = 12
    c.guidance_scale.value = 5.5
    c.width.value, c.height.value = 64, 48
    c.seed.value = 42
    c.scheduler.value = "Euler a"
    c.num_images.value = 2
    c.strength.value = 0.4
    c.mask_blur.value, c.grow.value, c.padding.value = 2, 3, 8
    c.only_masked.value = True
    c.fill.value = "noise"
    r = c.request()
    assert (r.mode, r.prompt, r.negative_prompt, r.num_inference_steps) == (
        "txt2img",
        "a green star on a white background",
        "blurry",
        12,
    )
    assert (r.guidance_scale, r.width, r.height, r.seed, r.scheduler, r.num_images) == (
        5.5,
        64,
        48,
        42,
        "Euler a",
        2,
    )
    assert r.strength == 0.75 and r.mask_blur == 4  # not used by txt2img: defaults
    c.mode = "inpaint"
    r = c.request()
    assert (r.strength, r.mask_blur, r.grow, r.padding, r.only_masked, r.fill) == (
        0.4,
        2,
        3,
        8,
        True,
        "noise",
    )
    c.mode = "unconditional"
    r = c.request()
    assert r.prompt == "" and r.guidance_scale is None and r.num_images == 2
    c.random_seed.value = True
    assert c.request().seed is None


def test_invalid_values_show_the_engine_message_next_to_the_control(studio, engine):
    c = studio.controls
    # The embedded model's VAE factor is 4, but the engine runs multiples of 8 only:
    # the widget used to accept 68 and then fail at submit.
    assert engine.vae_factor == 4 and engine.size_multiple == 8
    c.width.value = 68
    with pytest.raises(RequestError) as info:
        engine.check(Request(prompt="x", width=68))
    assert str(info.value) in _text(c.errors["width"].value)
    studio.generate_button.click()
    assert studio.last_job is None and "width" in _text(studio.status.value)
    c.width.value = 64
    assert c.errors["width"].value == ""
    c.num_images.value = 17
    studio.generate_button.click()
    assert "num_images" in _text(c.errors["num_images"].value)
    assert "not generated" in studio.status.value
    assert studio.last_job is None
    # fixed: Generate works again
    c.num_images.value = 1
    studio.generate_button.click()
    studio.wait(120)
    assert studio.last_job.state == "done"
    assert len(studio.gallery.items) == 1
    assert all(slot.value == "" for slot in c.errors.values())


def test_status_line_clears_its_error_when_the_field_is_fixed(studio):
    c = studio.controls
    c.num_images.value = 17
    studio.generate_button.click()
    assert "sdkit-error" in studio.status.value and "num_images" in studio.status.value
    c.num_inference_steps.value = 5  # another field: the error still stands
    assert "num_images" in studio.status.value
    c.num_images.value = 2
    assert "sdkit-error" not in studio.status.value and "num_images" not in studio.status.value
    assert c.errors["num_images"].value == ""


# Every field, valid and invalid values: (mode, field, value, valid for the embedded model,
# valid for the tiny factor-8 model). Steps are 10 unless the case sets them.
CASES = [
    ("txt2img", "width", 64, True, True),
    ("txt2img", "width", 68, False, False),  # a multiple of the embedded VAE factor 4 only
    ("txt2img", "width", 36, False, False),
    ("txt2img", "width", 0, False, False),
    ("txt2img", "width", -8, False, False),
    ("txt2img", "width", 4104, False, False),
    ("txt2img", "height", 72, True, True),
    ("txt2img", "height", 60, False, False),
    ("txt2img", "num_inference_steps", 1, True, True),
    ("txt2img", "num_inference_steps", 0, False, False),
    ("txt2img", "num_inference_steps", 1000, True, True),
    ("txt2img", "num_inference_steps", 1001, False, False),
    ("txt2img", "guidance_scale", 0.0, True, True),
    ("txt2img", "guidance_scale", 7.5, True, True),
    ("txt2img", "guidance_scale", -1.0, False, False),
    ("txt2img", "guidance_scale", 101.0, False, False),
    ("txt2img", "seed", 0, True, True),
    ("txt2img", "seed", 2**32 - 1, True, True),
    ("txt2img", "seed", -1, False, False),
    ("txt2img", "seed", 2**32, False, False),
    ("txt2img", "num_images", 1, True, True),
    ("txt2img", "num_images", 16, True, True),
    ("txt2img", "num_images", 0, False, False),
    ("txt2img", "num_images", 17, False, False),
    ("txt2img", "scheduler", "Euler a", True, True),
    ("txt2img", "scheduler", "dpm++ 2m karras", True, True),
    ("txt2img", "scheduler", "DDPM", False, False),  # unconditional models only
    ("txt2img", "scheduler", "Warp drive", False, False),
    ("txt2img", "prompt", "", False, False),
    ("txt2img", "clip_skip", 2, True, True),
    ("txt2img", "clip_skip", 12, True, True),
    ("txt2img", "clip_skip", 0, False, False),
    ("txt2img", "clip_skip", 13, False, False),
    ("img2img", "strength", 0.75, True, True),
    ("img2img", "strength", 1.0, True, True),
    ("img2img", "strength", 0.1, True, True),  # 0.1 x 10 steps = one step
    ("img2img", "strength", 0.05, False, False),  # no denoising step left
    ("img2img", "strength", 0.0, False, False),
    ("inpaint", "mask_blur", 0, True, True),
    ("inpaint", "mask_blur", 64, True, True),
    ("inpaint", "mask_blur", -1, False, False),
    ("inpaint", "mask_blur", 65, False, False),
    ("inpaint", "grow", 0, True, True),
    ("inpaint", "grow", 256, True, True),
    ("inpaint", "grow", -2, False, False),
    ("inpaint", "grow", 257, False, False),
    ("inpaint", "padding", 0, True, True),
    ("inpaint", "padding", 512, True, True),
    ("inpaint", "padding", -1, False, False),
    ("inpaint", "padding", 513, False, False),
    ("unconditional", "num_images", 4, True, True),
    ("unconditional", "width", 68, False, False),
]


@pytest.mark.parametrize("which", ["embedded", "tiny-f8"])
def test_widget_validation_agrees_with_engine_check_on_every_field(which, engine, f8_engine):
    eng = engine if which == "embedded" else f8_engine
    wd = SDWidget(engine=eng, prompt="a red circle", outputs_dir=None)
    c = wd.controls
    base = {name: getattr(c, name).value for name in c.rows if name != "scheduler"}
    wd.painter.set_image(Image.new("RGB", (64, 64), (0, 0, 255)))
    wd.painter.fill_all()
    checked = set()
    try:
        for mode, field, value, ok_embedded, ok_f8 in CASES:
            for name, v in base.items():
                getattr(c, name).value = v
            c.num_inference_steps.value = 10
            c.mode = mode
            if field == "scheduler":
                c._set_scheduler(value)
            else:
                getattr(c, field).value = value
            request = wd.request()
            widget_err = c.validate(request)
            try:
                eng.check(request)
                engine_err = None
            except RequestError as err:
                engine_err = err
            case = f"{which} {mode} {field}={value!r}"
            assert (widget_err is None) == (engine_err is None), case
            want_ok = ok_embedded if which == "embedded" else ok_f8
            assert (engine_err is None) == want_ok, f"{case}: {engine_err}"
            if engine_err is not None:
                assert (widget_err.field, str(widget_err)) == (engine_err.field, str(engine_err))
                assert engine_err.field == field, case
                # the live check showed it next to the control just changed
                assert str(engine_err) in _text(c.errors[field].value), case
            else:
                assert c.shown_error is None, case
            checked.add(field)
            c._set_scheduler(eng.defaults["scheduler"])
    finally:
        wd.close()
    assert checked >= {
        "width", "height", "num_inference_steps", "guidance_scale", "strength", "seed",
        "num_images", "mask_blur", "grow", "padding", "scheduler", "clip_skip",
    }  # fmt: skip


def test_a_size_the_widget_accepts_is_accepted_at_submit(f8_engine, tmp_path):
    wd = SDWidget(engine=f8_engine, prompt="a red circle", seed=1, outputs_dir=None)
    try:
        wd.controls.width.value = 72
        wd.controls.num_inference_steps.value = 2
        assert wd.controls.validate(wd.request()) is None
        job = wd.generate()
        assert job is not None
        wd.wait(120)
        assert job.state == "done" and job.result(0).images[0].size == (72, 64)
    finally:
        wd.close()


def test_inpaint_without_image_names_the_image(studio):
    studio.controls.mode = "inpaint"
    studio.generate_button.click()
    assert "image: missing" in _text(studio.controls.errors["image"].value)


def _text(html_value: str) -> str:
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", html_value))


# ----------------------------------------------------------------------------- engine


def test_generate_runs_a_job_with_progress_preview_and_gallery(studio, engine):
    events: list[str] = []
    unsubscribe = engine.subscribe(lambda kind, job, ev: events.append(kind))
    try:
        studio.generate_button.click()
        studio.wait(120)
    finally:
        unsubscribe()
    job = studio.last_job
    assert job.state == "done"
    assert job.request.prompt == "a red circle on a blue background"
    assert job.request.num_inference_steps == 4 and job.request.seed == 11
    assert "progress" in events and events[-1] == "done"
    assert studio.progress.value == studio.progress.max == 4
    assert "s/step" in studio.status.value
    assert studio.preview.value  # the final image
    item = studio.gallery.items[0]
    assert item.seed == 11 and item.source == "widget"
    assert studio.gallery.selected is item
    assert "Seed: 11" in item.infotext
    assert studio.controls.reuse_seed.disabled is False


def test_cancel_stops_a_running_job(studio, engine):
    started = threading.Event()
    unsubscribe = engine.subscribe(
        lambda kind, job, ev: started.set() if kind == "progress" else None
    )
    studio.controls.num_inference_steps.value = 400
    try:
        studio.generate_button.click()
        assert started.wait(120)
        studio.cancel_button.click()
        studio.wait(60)
    finally:
        unsubscribe()
    job = studio.last_job
    assert job.state == "cancelled"
    assert job.progress.step < 400
    assert "cancelled at step" in studio.status.value
    assert studio.gallery.items == []
    assert studio.cancel_button.disabled


def test_gallery_use_as_input_inpaint_rerun_save_and_restore(studio, tmp_path):
    studio.controls.seed.value = 5
    studio.generate_button.click()
    studio.wait(120)
    first = studio.gallery.items[0]

    studio.gallery.use_button.click()
    assert studio.controls.mode == "img2img"
    assert studio.painter.image.tobytes() == first.image.tobytes()

    studio.gallery.inpaint_button.click()
    assert studio.controls.mode == "inpaint"
    p = studio.painter
    p.brush_size.value = 12
    studio.controls.mask_blur.value = 0
    mouse(p, "down", 60, 60)
    mouse(p, "move", 160, 200)
    mouse(p, "up", 260, 200)
    painted = p.mask.copy()
    studio.controls.seed.value = 9
    studio.generate_button.click()
    studio.wait(120)
    job = studio.last_job
    assert job.state == "done"
    np.testing.assert_array_equal(np.asarray(job.request.mask), painted)
    inpainted = studio.gallery.items[0]
    before = np.asarray(first.image.convert("RGB")).astype(int)
    after = np.asarray(inpainted.image.convert("RGB")).astype(int)
    changed = np.abs(after - before).max(axis=2) > 0
    assert changed.any()
    assert not changed[painted == 0].any(), "pixels outside the mask changed"

    # re-run the first txt2img result: same seed, same pixels
    studio.gallery.select(first)
    studio.gallery.rerun_button.click()
    studio.wait(120)
    again = studio.gallery.items[0]
    assert again.seed == 5 and again.request.mode == "txt2img"
    assert again.image.tobytes() == first.image.tobytes()

    # save writes a PNG carrying its parameters
    studio.gallery.save_dir.value = str(tmp_path)
    studio.gallery.save_button.click()
    files = list(tmp_path.glob("*.png"))
    assert len(files) == 1
    assert Request.from_png(files[0]).seed == 5
    assert "saved" in studio.gallery.message.value

    # loading that PNG restores its settings
    c = studio.controls
    c.mode = "unconditional"
    c.num_inference_steps.value = 30
    c.random_seed.value = True
    upload(studio.settings_upload, files[0].name, files[0].read_bytes())
    assert c.mode == "txt2img" and c.num_inference_steps.value == 4
    assert c.seed.value == 5 and c.random_seed.value is False
    assert c.prompt.value == "a red circle on a blue background"


def test_a1111_png_restores_settings(studio):
    text = (
        "a yellow square on a black background\n"
        "Negative prompt: blurry\n"
        "Steps: 17, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 1234, Size: 64x48, "
        "Model hash: 0123abcd, Model: v1-5, Denoising strength: 0.5, Clip skip: 2"
    )
    data = png_with_parameters(Image.new("RGB", (64, 48)), text)
    upload(studio.settings_upload, "a1111.png", data)
    c = studio.controls
    assert c.prompt.value == "a yellow square on a black background"
    assert c.negative_prompt.value == "blurry"
    assert (c.num_inference_steps.value, c.guidance_scale.value, c.seed.value) == (17, 6.0, 1234)
    assert (c.width.value, c.height.value) == (64, 48)
    assert c.scheduler.value == "DPM++ 2M Karras"
    assert c.clip_skip.value == 2 and c.request().clip_skip == 2
    assert "restored" in studio.status.value
    # a PNG without the key means the last layer again: the control is reset, not kept
    data = png_with_parameters(Image.new("RGB", (64, 48)), text.replace(", Clip skip: 2", ""))
    upload(studio.settings_upload, "plain.png", data)
    assert c.clip_skip.value == 1 and c.request().clip_skip is None


def test_png_without_parameters_is_reported_in_the_widget(studio):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    upload(studio.settings_upload, "plain.png", buf.getvalue())
    assert "parameters" in studio.status.value and "sdkit-error" in studio.status.value


def test_uploaded_image_becomes_the_input(studio):
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (0, 200, 0)).save(buf, format="PNG")
    upload(studio.image_upload, "green.png", buf.getvalue())
    assert studio.painter.image.size == (48, 32)
    assert studio.painter.mask.shape == (32, 48)
    assert studio.controls.mode == "img2img"
    assert (studio.controls.width.value, studio.controls.height.value) == (48, 32)
    assert studio.image_upload.value == ()


def test_jobs_from_others_on_the_shared_engine_show_up(studio, engine, tmp_path):
    shown = threading.Event()
    studio.gallery.on("select", lambda item: shown.set())
    job = engine.submit(
        Request(prompt="a blue triangle on a white background", num_inference_steps=3, seed=77)
    )
    job.result(120)
    assert shown.wait(120)
    studio.wait(60)
    item = studio.gallery.items[0]
    assert item.seed == 77 and item.source == "engine"
    assert "elsewhere" in studio.status.value
    assert studio.saved == [] and not (tmp_path / "outputs").exists()  # not ours to keep


# ----------------------------------------------------------------------------- threads


def test_the_widget_never_holds_up_the_engine(studio, engine, monkeypatch):
    """The widget's handling (gallery, PNG encoding, saving) runs on its own thread: while
    it is stuck, the engine finishes the next job; no PNG is ever encoded on an engine thread."""
    release = threading.Event()
    entered = threading.Event()
    encoders: list[str] = []
    original_add = studio.gallery.add_result
    original_png = gallery.png_bytes

    def stuck_add(*args, **kwargs):
        entered.set()
        assert release.wait(120)
        return original_add(*args, **kwargs)

    def recording_png(image):
        encoders.append(threading.current_thread().name)
        return original_png(image)

    monkeypatch.setattr(studio.gallery, "add_result", stuck_add)
    monkeypatch.setattr(gallery, "png_bytes", recording_png)
    monkeypatch.setattr("sdkit.widgets.runpanel.png_bytes", recording_png)
    second_done = threading.Event()
    first = studio.generate()
    assert entered.wait(120), "the first result never reached the gallery"
    try:
        second = engine.submit(
            Request(prompt="a green star on a white background", num_inference_steps=2, seed=4),
            callback=lambda kind, job, ev: second_done.set() if kind == "done" else None,
        )
        # the widget's thread is blocked in the gallery, yet the engine runs the next job
        assert second_done.wait(120), "the engine waited for the widget"
        assert second.state == "done"
    finally:
        release.set()
    studio.wait(120)
    assert first.state == "done"
    assert [i.seed for i in studio.gallery.items] == [4, 11]
    assert encoders and all(name == "sdkit-widget-events" for name in encoders), encoders


def test_generate_returns_its_job_without_waiting_for_events(studio, engine):
    """Our own job is known as ours from its first event, whichever thread delivers it."""
    job = studio.generate()
    studio.wait(120)
    assert job.state == "done"
    assert studio.gallery.items[0].source == "widget"
    assert "elsewhere" not in studio.status.value


def test_progress_bar_resets_when_a_job_starts(studio):
    values: list[int] = []
    studio.progress.observe(lambda ch: values.append(ch["new"]), "value")
    studio.generate_button.click()
    studio.wait(120)
    assert studio.progress.value == studio.progress.max == 4
    values.clear()
    studio.controls.num_inference_steps.value = 3
    studio.generate_button.click()
    studio.wait(120)
    assert values[0] == 0, values  # back to empty before the first step of the new job
    assert values[-1] == 3 and studio.progress.max == 3
    assert values == sorted(values), values


# ----------------------------------------------------------------------------- outputs


def test_every_result_is_saved_with_its_infotext(studio, tmp_path):
    studio.controls.num_images.value = 2
    studio.generate_button.click()
    studio.wait(120)
    folder = tmp_path / "outputs"
    files = sorted(folder.glob("*.png"))
    assert len(files) == 2 and sorted(studio.saved) == files
    seeds = sorted(Request.from_png(f).seed for f in files)
    assert seeds == [11, 12]
    for item in studio.gallery.items:
        assert item.path in files
        assert Image.open(item.path).info["parameters"] == item.infotext
    assert str(studio.gallery.selected.path) in _text(studio.gallery.detail_info.value)
    assert "saved to" in studio.status.value


def test_outputs_default_to_the_env_var_or_the_working_directory(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SDKIT_OUTPUTS", raising=False)
    wd = SDWidget(engine=engine, prompt="a red circle", num_inference_steps=2, seed=1)
    assert wd.outputs_dir == Path("outputs")
    wd.close()
    monkeypatch.setenv("SDKIT_OUTPUTS", str(tmp_path / "from-env"))
    wd = SDWidget(engine=engine, prompt="a red circle", num_inference_steps=2, seed=1)
    try:
        wd.generate()
        wd.wait(120)
    finally:
        wd.close()
    assert [Request.from_png(p).seed for p in (tmp_path / "from-env").glob("*.png")] == [1]


@pytest.mark.parametrize("off", [None, False])
def test_saving_can_be_turned_off(engine, tmp_path, monkeypatch, off):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SDKIT_OUTPUTS", raising=False)
    wd = SDWidget(engine=engine, prompt="a red circle", num_inference_steps=2, outputs_dir=off)
    try:
        wd.generate()
        wd.wait(120)
        assert len(wd.gallery.items) == 1
    finally:
        wd.close()
    assert wd.outputs_dir is None and wd.saved == []
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_written_is_reported_and_the_result_kept(engine, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    wd = SDWidget(engine=engine, prompt="a red circle", num_inference_steps=2, outputs_dir=blocker)
    try:
        wd.generate()
        wd.wait(120)
        assert "could not save" in wd.status.value and "sdkit-error" in wd.status.value
        assert len(wd.gallery.items) == 1
        wd.errors.clear()
    finally:
        wd.close()


# ----------------------------------------------------------------------------- small things


def test_infotext_wraps_at_commas_never_inside_a_word():
    text = (
        "a red circle on a blue background\n"
        "Negative prompt: blurry\n"
        "Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 11, Size: 64x64"
    )
    out = gallery.infotext_html(text)
    assert "word-break:normal" in out and "<pre" not in out
    spans = [
        "Steps: 4", "Sampler: DPM++ 2M Karras", "CFG scale: 5", "Seed: 11", "Size: 64x64"
    ]  # fmt: skip
    assert (
        ", <wbr>".join(
            f"<span class='sdkit-kv' style='white-space:nowrap'>{p}</span>" for p in spans
        )
        in out
    )
    assert "a red circle on a blue background\nNegative prompt: blurry\n" in out
    assert _text(out) == text


def test_upload_buttons_show_their_label_without_a_counter(studio):
    for upload in (studio.image_upload, studio.settings_upload):
        assert "sdkit-upload" in upload._dom_classes
        assert upload.tooltip == upload.description  # the CSS shows the title, not "(0)"
    css = studio.children[0].value
    assert ".sdkit-upload { font-size: 0;" in css and "content: attr(title)" in css


def test_brush_slider_range_follows_the_image_size():
    p = MaskPainter(64, 64)
    assert (p.brush_size.min, p.brush_size.max) == (1, 64)
    p.brush_size.value = 40
    p.set_image(Image.new("RGB", (512, 384)))
    assert p.brush_size.max == 512 and p.brush_size.value == 40
    p.set_image(Image.new("RGB", (24, 16)))
    assert p.brush_size.max == 24 and p.brush_size.value == 24
    p.set_image(None)
    p.resize_blank(96, 32)
    assert p.brush_size.max == 96


def test_model_load_error_is_shown_in_the_widget(tmp_path):
    wd = SDWidget(model=str(tmp_path / "no-such-model"), prompt="a red circle")
    wd.wait(60)
    assert "could not load" in wd.model_status.value
    assert "no-such-model" in wd.model_status.value
    wd.generate_button.click()
    assert "no model loaded" in wd.status.value
    wd.close()


def test_callback_errors_are_caught_by_the_fixture(callback_errors):
    """The guard this suite relies on: ipywidgets swallows and logs callback exceptions."""
    import ipywidgets as widgets

    b = widgets.Button()
    b.on_click(lambda _: 1 / 0)
    b.click()
    assert any("Exception in callback" in r.getMessage() for r in callback_errors)
    callback_errors.clear()


# ----------------------------------------------------------------------------- adapters


def test_adapter_buttons_insert_the_lora_tag_or_the_embedding_word():
    from sdkit.widgets.adapterlist import AdapterList

    prompt = {"text": "a red x"}
    a = AdapterList(lambda text: prompt.update(text=f"{prompt['text']} {text}"))
    assert a.widget.layout.display == "none"  # an engine without adapters: nothing shown
    a.show({"loras": ["sdkcross", "other"], "embeddings": ["sdkdarkgreen"]})
    assert a.widget.layout.display is None
    assert a.names("loras") == ["sdkcross", "other"] and a.names("embeddings") == ["sdkdarkgreen"]
    a.buttons["loras"]["sdkcross"].click()
    a.buttons["embeddings"]["sdkdarkgreen"].click()
    assert prompt["text"] == "a red x <lora:sdkcross:1> sdkdarkgreen"
    a.for_mode(["num_inference_steps", "seed"])  # no prompt: nothing to put them in
    assert a.widget.layout.display == "none"
    a.show({"loras": [], "embeddings": None})  # a server without adapters (or an old one)
    a.for_mode(["prompt"])
    assert a.widget.layout.display == "none" and a.names("loras") == []


def test_the_studio_lists_the_engines_adapters_and_a_click_fills_the_prompt(studio, engine):
    info = engine.info()
    a = studio.adapters
    assert a.names("loras") == list(info.get("loras") or [])
    assert a.names("embeddings") == list(info.get("embeddings") or [])
    if "loras" in info:  # sdkit.adapters: the embedded model ships one LoRA, one embedding
        assert "sdkcross" in a.names("loras") and "sdkdarkgreen" in a.names("embeddings")
        studio.controls.prompt.value = "a cross"
        a.buttons["loras"]["sdkcross"].click()
        a.buttons["loras"]["sdkcross"].click()  # once is enough
        a.buttons["embeddings"]["sdkdarkgreen"].click()
        assert studio.controls.prompt.value == "a cross <lora:sdkcross:1> sdkdarkgreen"
        assert studio.request().prompt == "a cross <lora:sdkcross:1> sdkdarkgreen"


HIRES_MODE = {
    "name": "txt2img",
    "title": "Text to image",
    "fields": [
        "prompt",
        "seed",
        "loras",
        "hires_scale",
        "hires_steps",
        "hires_denoise",
        "hires_upscaler",
    ],
    "required": ["prompt"],
    "inputs": [],
}


def test_hires_rows_show_for_a_mode_whose_spec_has_them():
    c = RequestControls(modes=[HIRES_MODE, modes.get("img2img").describe()])
    shown = {n for n, row in c.rows.items() if row.layout.display != "none"}
    assert {"hires_scale", "hires_steps", "hires_denoise", "hires_upscaler"} <= shown
    assert c.groups["hires"].layout.display is None
    assert c.request().hires_scale is None  # shows 1: no hires fix, as a plain request
    c.prompt.value = "x"
    c.hires_scale.value, c.hires_steps.value, c.hires_denoise.value = 2.0, 3, 0.45
    c.hires_upscaler.value = "Lanczos"
    r = c.request()
    assert (r.hires_scale, r.hires_steps, r.hires_denoise, r.hires_upscaler) == (
        2.0,
        3,
        0.45,
        "Lanczos",
    )
    c.mode = "img2img"  # its spec has no hires fields: no rows, the request's defaults
    assert c.groups["hires"].layout.display == "none"
    assert c.request().hires_scale is None and c.request().hires_steps == 0
    c.mode = "txt2img"
    c.set_request(Request(prompt="y"))  # a request without hires fix resets the rows
    assert (c.hires_scale.value, c.hires_steps.value, c.hires_upscaler.value) == (1.0, 0, "Latent")


def test_the_loras_row_is_the_loras_field_and_its_errors_show_next_to_it():
    c = RequestControls(modes=[HIRES_MODE])
    c.prompt.value = "x"
    c.loras.value = "sdkcross:0.5, other"
    assert c.request().loras == [
        {"name": "sdkcross", "weight": 0.5},
        {"name": "other", "weight": 1.0},
    ]
    c.set_request(Request(prompt="x", loras=[{"name": "a", "weight": 0.25}]))
    assert c.loras.value == "a:0.25"
    for text, field in (("sdkcross:heavy", "loras[0].weight"), ("ok, ../evil:1", "loras[1].name")):
        c.loras.value = text
        err = c.validate(c.request())
        assert err is not None and err.field == field
        c.show_error(err)
        assert field in _text(c.errors["loras"].value)
    c.loras.value = ""
    assert c.request().loras == [] and c.validate(c.request()) is None


def test_a1111_png_with_lora_hires_and_clip_skip_fills_every_field(studio):
    text = (
        "a red x <lora:sdkcross:0.8>, sdkdarkgreen\n"
        "Negative prompt: blurry\n"
        "Steps: 6, Sampler: Euler a, CFG scale: 6, Seed: 77, Size: 64x64, Clip skip: 2, "
        "Hires upscale: 2, Hires steps: 3, Hires upscaler: Lanczos, Denoising strength: 0.45, "
        "Version: v1.10.1"
    )
    data = png_with_parameters(Image.new("RGB", (64, 64)), text)
    upload(studio.settings_upload, "a1111.png", data)
    assert "restored" in studio.status.value
    want, got = Request.from_png(data), studio.request()
    assert got.mode == want.mode == "txt2img"
    for name in studio.controls.spec["fields"]:
        if name not in ("image", "mask", "control"):
            assert getattr(got, name) == getattr(want, name), name
    assert got.prompt == "a red x <lora:sdkcross:0.8>, sdkdarkgreen" and got.clip_skip == 2
    if "hires_scale" in studio.controls.spec["fields"]:  # the hires fix in the txt2img spec
        assert (got.hires_scale, got.hires_steps, got.hires_upscaler) == (2.0, 3, "Lanczos")
        assert got.hires_denoise == 0.45


def test_load_png_settings_reruns_an_a1111_png_with_its_lora(studio, engine):
    """Issue 14.8: an A1111 PNG (LoRA tag with its hash, clip skip, sampler, seed) loaded
    through the button, then Generate: the picture the engine makes from Request.from_png."""
    pytest.importorskip("sdkit.adapters")
    from sdkit.adapters import short_hash
    from sdkit.embedded.train_adapters import ADAPTERS_DIR, LORA_NAME

    digest = short_hash(ADAPTERS_DIR / f"{LORA_NAME}.safetensors", "lora")
    text = (
        f"a red x <lora:{LORA_NAME}:1>\n"
        "Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 21, Size: 64x64, Clip skip: 2, "
        f'Lora hashes: "{LORA_NAME}: {digest}", Version: v1.10.1'
    )
    data = png_with_parameters(Image.new("RGB", (64, 64)), text)
    upload(studio.settings_upload, "a1111.png", data)
    studio.generate_button.click()
    studio.wait(300)
    assert studio.last_job.state == "done", studio.status.value
    got = np.asarray(studio.last_job.result(timeout=0)[0].convert("RGB"))
    request = Request.from_png(data)
    want = engine.generate(request, progress=False)
    assert np.array_equal(got, np.asarray(want[0].convert("RGB")))
    plain = engine.generate(
        dataclasses.replace(request, prompt="a red x", extra={}), progress=False
    )
    assert not np.array_equal(got, np.asarray(plain[0].convert("RGB")))  # the LoRA acted
