"""The widget's control canvas (issue 15.5) on the embedded model and its scribble ControlNet.

A circle drawn with the pointer handlers (canvas pixels, as ipycanvas reports them) is the
control image of the request's one unit; the generated shape lands on the scribble's side.
The embedded ControlNet is still being trained: judged with a margin (left vs right half).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from sdkit.widgets import SDWidget

import sdkit
from sdkit.embedded import scribbles

PROMPT = "a red circle on a green background"
SCALE = 5  # display_size 320 over the 64 px image


@pytest.fixture(scope="module")
def engine():
    engine = sdkit.load()
    yield engine
    engine.close()


@pytest.fixture
def studio(engine):
    s = SDWidget(engine, outputs_dir=None, prompt=PROMPT, seed=1, display_size=64 * SCALE)
    yield s
    s.close()


def draw_circle(painter, cx: float, cy: float, r: float = 12) -> None:
    """One stroke through the pointer handlers, in canvas pixels."""
    pts = [
        (SCALE * (cx + r * math.cos(t)), SCALE * (cy + r * math.sin(t)))
        for t in np.linspace(0, 2 * math.pi, 30)
    ]
    painter._on_down(*pts[0])
    for p in pts[1:]:
        painter._on_move(*p)
    painter._on_up(*pts[-1])


def test_canvas_shows_for_modes_with_control_and_sends_nothing_undrawn(studio):
    c = studio.control
    assert list(c.model.options) == ["sdkscribble"]
    assert c.widget.layout.display is None  # txt2img takes control
    assert studio.request().control == [] and not c.enabled.value
    studio.controls.mode = "unconditional"
    assert c.widget.layout.display == "none"
    studio.controls.mode = "txt2img"
    studio.controls.width.value = 48
    assert c.painter.size == (48, 64)  # the sheet follows the request's size


def test_a_drawn_scribble_is_the_units_image_and_steers_the_shape(studio):
    c = studio.control
    c.weight.value, c.end.value = 1.5, 0.8
    centres = {}
    for side, cx in (("left", 18), ("right", 46)):
        c.painter.clear()
        draw_circle(c.painter, cx, 32)
        request = studio.request()
        (unit,) = request.control
        assert c.enabled.value  # drawing turned control on
        assert (unit["model"], unit["weight"], unit["start"], unit["end"], unit["module"]) == (
            "sdkscribble",
            1.5,
            0.0,
            0.8,
            "none",
        )
        drawn = np.asarray(unit["image"])
        assert drawn.shape == (64, 64, 3)
        np.testing.assert_array_equal(drawn[..., 0] > 0, c.painter.mask > 0)  # white on black
        job = studio.generate()
        studio.wait(300)
        assert job.state == "done", job.error
        assert "ControlNet 0" in job.result().infotexts[0]
        ys, xs = np.nonzero(scribbles.blob(job.result().images[0]))
        centres[side] = (xs.mean(), ys.mean())
    assert centres["left"][0] < 28 and centres["right"][0] > 36, centres
    c.enabled.value = False
    assert studio.request().control == []


def test_a_gallery_picture_under_the_strokes(studio):
    c = studio.control
    picture = Image.new("RGB", (64, 64), (0, 0, 0))
    picture.paste((255, 255, 255), (40, 20, 56, 36))
    c.use_picture(picture)
    assert c.enabled.value
    np.testing.assert_array_equal(np.asarray(c.units()[0]["image"]), np.asarray(picture))
    draw_circle(c.painter, 16, 16, 6)
    image = np.asarray(c.units()[0]["image"])
    assert (image[c.painter.mask > 0] == 255).all()
    np.testing.assert_array_equal(
        image[c.painter.mask == 0], np.asarray(picture)[c.painter.mask == 0]
    )
    job = studio.generate()  # the gallery's selected result becomes the next control image
    studio.wait(300)
    c.use_gallery_image()
    np.testing.assert_array_equal(np.asarray(c.painter.image), np.asarray(job.result().images[0]))


def test_a_bad_unit_is_refused_naming_its_field(studio):
    c = studio.control
    draw_circle(c.painter, 32, 32)
    c.start.value, c.end.value = 0.9, 0.5
    assert studio.generate() is None
    assert "control[0].start" in studio.status.value and "below end" in studio.status.value
    c.start.value, c.end.value = 0.0, 1.0
    assert studio.controls.validate(studio.request()) is None
