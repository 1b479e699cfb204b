"""Widget live mode (issue 16.3) without a browser: strokes and control changes driven from
Python with the messages the front end sends, a real engine (the embedded model) generating.

What must not happen (an older frame after a newer one, a frame in the gallery) is checked
on everything recorded once the widget is idle; waits are on events with timeouts.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image
from sdkit.widgets import SDWidget
from sdkit.widgets.gallery import png_bytes
from test_widget import callback_errors, mouse  # noqa: F401  (the fixture fails on swallowed errors)

import sdkit
from sdkit.live import LIVE_DEFAULTS

SIZE = 64


@pytest.fixture(scope="module")
def engine():
    engine = sdkit.load()
    yield engine
    engine.close()


def _picture() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (20, 40, 200))
    image.paste((250, 250, 250), (40, 6, 58, 24))
    return image


@pytest.fixture
def studio(engine, tmp_path):
    wd = SDWidget(
        engine=engine,
        prompt="a red circle on a blue background",
        num_inference_steps=4,
        seed=11,
        width=SIZE,
        height=SIZE,
        outputs_dir=tmp_path / "outputs",
    )
    wd.painter.set_image(_picture())
    wd.painter.brush_size.value = 6
    shown: list[tuple[int, bytes]] = []  # (frame number on screen, picture) in display order
    wd.preview.observe(lambda ch: shown.append((wd.live._shown, ch["new"])), "value")
    wd.shown = shown
    yield wd
    wd.live.set_on(False)
    wd.cancel()
    wd.wait(120)
    wd.close()


def _strictly_increasing(values: list[int]) -> bool:
    return all(a < b for a, b in zip(values, values[1:], strict=False))


def test_a_burst_of_changes_is_one_replace_job_and_its_frame_replaces_the_preview(studio, engine):
    live = studio.live
    live.debounce = 1.0  # generous: the burst below is a few Python calls
    live.set_on(True)
    studio.painter.paint_stroke([(10, 10), (30, 30)])
    studio.controls.prompt.value = "a green circle on a blue background"
    studio.painter.paint_stroke([(40, 50), (50, 60)])
    studio.controls.strength.value = 0.6
    studio.wait(300)
    assert len(live.submitted) == 1, live.submitted
    job = live.submitted[0]
    assert job.policy == "replace" and job.source == live.source and job.state == "done"
    req = job.request
    assert req.mode == "inpaint" and req.strength == 0.6 and req.seed == 11
    assert req.prompt == "a green circle on a blue background"
    np.testing.assert_array_equal(np.asarray(req.mask) > 0, studio.painter.mask > 0)
    assert studio.gallery.items == [] and studio.saved == []  # a frame is not a result
    assert studio.preview.value == png_bytes(job.result(timeout=0).images[0])
    assert live.frames == 1 and not live.keep_button.disabled


def test_live_loads_the_few_step_preset_into_the_controls(studio):
    studio.live.set_on(True)
    request = studio.live.request()
    assert request.num_inference_steps == LIVE_DEFAULTS["num_inference_steps"]
    assert request.guidance_scale == LIVE_DEFAULTS["guidance_scale"]
    assert request.scheduler == LIVE_DEFAULTS["scheduler"]
    assert request.strength == studio.controls.strength.value  # the user's


def test_without_a_mask_it_is_img2img_and_the_random_seed_stays_fixed(studio):
    live = studio.live
    studio.controls.random_seed.value = True
    live.set_on(True)
    first = live.submit()
    studio.controls.prompt.value = "another prompt"
    second = live.submit()
    studio.wait(300)
    assert first.request.mode == second.request.mode == "img2img"
    assert first.request.mask is None
    assert first.request.seed == second.request.seed == live.seed is not None


def test_frames_show_in_submission_order_and_the_last_equals_a_fresh_run(studio, engine):
    live = studio.live
    live.debounce = 0.5  # the debounced frame comes after the six explicit ones
    live.set_on(True)
    for i in range(6):
        studio.painter.paint_stroke([(5 + 8 * i, 5), (5 + 8 * i, 60)])
        live.submit()
    studio.wait(300)
    jobs = live.submitted
    assert len(jobs) == 7 and jobs[-1].state == "done"
    superseded = [j for j in jobs if j.superseded]
    assert all(j.state == "cancelled" for j in superseded)
    assert not any(j.state == "failed" for j in jobs)
    numbers = [n for n, _ in studio.shown]
    assert _strictly_increasing(numbers) and numbers[-1] >= 6, numbers  # 7: the same picture
    assert live.frame is jobs[-1].result(timeout=0)  # the newest is on screen
    fresh = engine.generate(jobs[-1].request, progress=False)
    assert studio.shown[-1][1] == png_bytes(fresh.images[0])
    np.testing.assert_array_equal(np.asarray(live.frame.images[0]), np.asarray(fresh.images[0]))


def test_keep_puts_the_current_frame_into_the_gallery(studio):
    live = studio.live
    live.set_on(True)
    studio.wait(300)
    assert live.frames == 1 and studio.gallery.items == []
    live.keep_button.click()
    assert len(studio.gallery.items) == 1 and len(studio.saved) == 1
    np.testing.assert_array_equal(
        np.asarray(studio.gallery.items[0].image), np.asarray(live.frame.images[0])
    )


def test_strokes_are_taken_at_once_while_a_frame_is_generating(studio, engine):
    live = studio.live
    live.debounce = 0.5
    started = threading.Event()
    gate = threading.Event()  # holds the first frame inside its first UNet call until the
    # stroke's frame is submitted, so "replaced while running" does not depend on timing
    unet = engine.pipeline("img2img").unet
    hold = unet.register_forward_pre_hook(lambda module, args: gate.wait(120) and None)
    unsubscribe = engine.subscribe(lambda kind, job, event: kind == "started" and started.set())
    try:
        live.set_on(True)  # loads the live preset
        assert started.wait(120), "no live frame started"
        running = [j for j in live.submitted if j.state == "running"]
        before = len(live.submitted)
        mouse(studio.painter, "down", 20, 20)  # canvas pixels; 320 px shows 64 image px
        mouse(studio.painter, "move", 200, 200)
        mouse(studio.painter, "up", 200, 200)
        # the stroke is in the mask the moment the front end's message is handled
        assert studio.painter.strokes == 1 and studio.painter.mask[20, 20] == 255
        deadline = time.monotonic() + 60
        while len(live.submitted) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(live.submitted) > before, "the stroke submitted no frame"
    finally:
        gate.set()
        hold.remove()
        unsubscribe()
    studio.wait(300)
    assert running and running[0].state == "cancelled"  # replaced by the stroke's frame
    last = live.submitted[-1]
    assert last.state == "done" and last.request.mode == "inpaint"
    np.testing.assert_array_equal(np.asarray(last.request.mask) > 0, studio.painter.mask > 0)


def test_live_off_cancels_and_submits_nothing_more(studio):
    live = studio.live
    live.debounce = 0.01
    live.set_on(True)
    live.set_on(False)
    studio.painter.paint_stroke([(10, 10), (30, 30)])
    studio.wait(300)
    assert all(j.state in ("cancelled", "done") for j in live.submitted)
    count = len(live.submitted)
    studio.controls.prompt.value = "changed while off"
    studio.wait(60)
    assert len(live.submitted) == count


def test_switching_the_model_stops_the_stream_with_a_message(studio, engine):
    live = studio.live
    live.debounce = 0.01
    live.set_on(True)
    studio.use_engine(engine)  # what a model load ends with
    assert not live.on and not live.toggle.value
    assert "live stopped: the model changed" in studio.status.value
    studio.wait(300)
    count = len(live.submitted)
    studio.painter.paint_stroke([(10, 10), (30, 30)])
    studio.wait(60)
    assert len(live.submitted) == count
