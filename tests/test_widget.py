"""SDWidget without a browser: widgets driven from Python with the messages the front end sends.

A real engine (the embedded model) runs every generation. Exceptions raised in widget
callbacks (which ipywidgets and the engine only log) fail the test.
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import pytest
from ipycanvas.canvas import _CanvasManager
from PIL import Image, PngImagePlugin
from sdkit.widgets import SDWidget
from sdkit.widgets.controls import FIELDS_BY_MODE, RequestControls
from sdkit.widgets.painter import MaskPainter

import sdkit
from sdkit.request import MODES, Request, RequestError

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


@pytest.fixture
def studio(engine):
    wd = SDWidget(
        engine=engine, prompt="a red circle on a blue background", num_inference_steps=4, seed=11
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
    for mode in MODES:
        c.mode = mode
        shown = {n for n, row in c.rows.items() if row.layout.display != "none"}
        assert shown == set(FIELDS_BY_MODE[mode]) - {"image", "mask"}, mode
        index = MODES.index(mode)
        assert c.mode_tabs.children[index].children == (c.body,)
        assert all(not t.children for i, t in enumerate(c.mode_tabs.children) if i != index)


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


def test_invalid_values_show_the_core_message_next_to_the_control(studio):
    c = studio.controls
    c.width.value = 66  # the embedded model's VAE factor is 4
    expected = Request(prompt="x", width=66)
    with pytest.raises(RequestError) as info:
        expected.validate(vae_factor=studio.engine.vae_factor)
    assert str(info.value) in _text(c.errors["width"].value)
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
        "Model hash: 0123abcd, Model: v1-5, Denoising strength: 0.5"
    )
    data = png_with_parameters(Image.new("RGB", (64, 48)), text)
    upload(studio.settings_upload, "a1111.png", data)
    c = studio.controls
    assert c.prompt.value == "a yellow square on a black background"
    assert c.negative_prompt.value == "blurry"
    assert (c.num_inference_steps.value, c.guidance_scale.value, c.seed.value) == (17, 6.0, 1234)
    assert (c.width.value, c.height.value) == (64, 48)
    assert c.scheduler.value == "DPM++ 2M Karras"
    assert "restored" in studio.status.value


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


def test_jobs_from_others_on_the_shared_engine_show_up(studio, engine):
    job = engine.submit(
        Request(prompt="a blue triangle on a white background", num_inference_steps=3, seed=77)
    )
    job.result(120)
    # the subscriber ran on the worker before result() returned? wait for the gallery
    for _ in range(200):
        if studio.gallery.items:
            break
        threading.Event().wait(0.05)
    item = studio.gallery.items[0]
    assert item.seed == 77 and item.source == "engine"
    assert "elsewhere" in studio.status.value


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
