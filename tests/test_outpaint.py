"""Outpainting (issue 15.3): the canvas grows, the new area is painted, the original stays
exact outside the seam band, also beyond the model's native size (tiles)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

import sdkit
from sdkit import modes, outpainting
from sdkit.cli import main
from sdkit.jobs import JobCancelled
from sdkit.request import MAX_SIZE, Request, RequestError

PROMPT = "a red circle on a blue background"


def _image(w: int = 32, h: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _kept(image: Image.Image, out: Image.Image, req: Request) -> np.ndarray:
    """Boolean map over `image`: pixels outside the seam band (the promise: unchanged)."""
    ext = outpainting.sides(req)
    _, area = outpainting.extend(image, ext, "stretch", 0)
    soft = np.asarray(outpainting.seam_mask(area, req.seam, req.mask_blur))
    x, y = ext["left"], ext["top"]
    return soft[y : y + image.height, x : x + image.width] == 0


# ------------------------------------------------------------------------ geometry (no model)


def test_extend_fills():
    image = _image(8, 6)
    arr = np.asarray(image)
    ext = {"left": 3, "right": 2, "top": 1, "bottom": 4}
    stretch, area = outpainting.extend(image, ext, "stretch", 0)
    s = np.asarray(stretch)
    assert stretch.size == (13, 11) and area.size == (13, 11)
    assert np.array_equal(s[1:7, 3:11], arr)
    assert np.array_equal(s[1:7, 0], arr[:, 0]) and np.array_equal(s[1:7, 12], arr[:, -1])
    assert np.array_equal(s[0, 3:11], arr[0]) and np.array_equal(s[10, 3:11], arr[-1])
    a = np.asarray(area)
    assert (a[1:7, 3:11] == 0).all() and a.sum() == 255 * (13 * 11 - 8 * 6)
    colour, _ = outpainting.extend(image, ext, "colour", 0)
    c = np.asarray(colour)
    edges = np.concatenate([arr[:, 0], arr[:, -1], arr[0], arr[-1]])
    assert np.array_equal(c[1:7, 3:11], arr)
    assert (c[a > 0] == np.rint(edges.mean(axis=0))).all()
    noise, _ = outpainting.extend(image, ext, "noise", 5)
    again, _ = outpainting.extend(image, ext, "noise", 5)
    other, _ = outpainting.extend(image, ext, "noise", 6)
    n = np.asarray(noise)
    assert np.array_equal(n[1:7, 3:11], arr) and np.array_equal(n, np.asarray(again))
    assert not np.array_equal(n, np.asarray(other)) and n[a > 0].std() > 50


def test_seam_mask_is_soft_inside_the_band_and_zero_beyond():
    area = Image.new("L", (40, 20), 0)
    area.paste(255, (0, 0, 10, 20))  # 10 new columns on the left
    for seam, blur in ((0, 4), (6, 4), (16, 4), (16, 0)):
        m = np.asarray(outpainting.seam_mask(area, seam, blur)).astype(int)
        assert (m[:, :10] == 255).all() and (m[:, 10 + seam :] == 0).all()
        row = m[10, 10 : 10 + seam]
        assert (np.diff(row) <= 0).all()  # falls off towards the inside
        if seam and blur:
            assert ((row > 0) & (row < 255)).sum() >= 2  # soft, not a hard step


def test_plan_fits_in_one_pass_or_tiles_the_border_only():
    area = Image.new("L", (40, 24), 0)
    area.paste(255, (0, 0, 8, 24))
    soft = outpainting.seam_mask(area, 4, 1)
    (one,) = outpainting.plan(soft, (8, 0, 40, 24), (64, 64), 8)
    assert one.box == (0, 0, 40, 24) and one.size == (40, 24)
    # 64 + 64 + 64 wide at native 64: tiles cover only what has to be repainted
    wide = Image.new("L", (192, 64), 255)
    wide.paste(0, (64, 0, 128, 64))
    soft = outpainting.seam_mask(wide, 8, 2)
    tiles = outpainting.plan(soft, (64, 0, 128, 64), (64, 64), 8)
    covered = np.zeros((64, 192), bool)
    for t in tiles:
        assert t.size == (64, 64) and t.box[2] - t.box[0] == 64
        covered[t.box[1] : t.box[3], t.box[0] : t.box[2]] |= np.asarray(t.mask) > 0
    assert np.array_equal(covered, np.asarray(soft) > 0)
    assert all(t.box[0] >= 64 or t.box[2] <= 128 for t in tiles)  # none over the kept middle
    # a ramp into earlier tiles' pixels ends inside the box: 0 on its inner edges there
    done = np.zeros((64, 192), bool)
    for t in tiles:
        x0, _, x1, _ = t.box
        m, before = np.asarray(t.mask), done[:, x0:x1]
        for col, inner in ((0, x0 > 0), (-1, x1 < 192)):
            if inner:
                assert (m[:, col][before[:, col]] == 0).all(), t.box
        done[:, x0:x1] |= m > 0
    # 2-D: tiles centred nearest the original first (the middle one of a 3x3 picture)
    ring = Image.new("L", (192, 192), 255)
    ring.paste(0, (64, 64, 128, 128))
    order = outpainting.plan(outpainting.seam_mask(ring, 8, 2), (64, 64, 128, 128), (64, 64), 8)
    assert order[0].box == (48, 48, 112, 112) and len(order) == 16


# ------------------------------------------------------------------------ tiny real pipelines


@pytest.mark.parametrize("fill", ["stretch", "noise", "colour"])
def test_original_exact_outside_the_seam(sd_engine, fill):
    image = _image()
    result = sdkit.outpaint(
        image, PROMPT, model=sd_engine, progress=False, left=16, top=8, seam=6, seed=3,
        extend_fill=fill,
    )  # fmt: skip
    out, req = result[0], result.request
    assert out.size == (48, 40) and (req.width, req.height) == (48, 40)
    inner = np.asarray(out)[8:40, 16:48]
    kept = _kept(image, out, req)
    # kept: all beyond the 6 px band; repainted (softly): at least its outer half
    assert kept[6:, 6:].all() and not kept[:, :3].any() and not kept[:3].any()
    assert np.array_equal(inner[kept], np.asarray(image)[kept])
    filled_canvas, area = outpainting.extend(image, outpainting.sides(req), fill, 3)
    new = np.asarray(area) > 0
    assert not np.array_equal(np.asarray(out)[new], np.asarray(filled_canvas)[new])  # painted


def test_each_fill_changes_the_result(sd_engine):
    made = {
        fill: np.asarray(
            sdkit.outpaint(
                _image(),
                PROMPT,
                model=sd_engine,
                progress=False,
                right=16,
                seed=1,
                extend_fill=fill,
            )[0]
        )  # fmt: skip
        for fill in ("stretch", "noise", "colour")
    }
    assert not np.array_equal(made["stretch"], made["noise"])
    assert not np.array_equal(made["stretch"], made["colour"])


def test_size_that_is_not_a_multiple_still_comes_out_exact(sd_engine):
    image = _image(30, 27)
    result = sd_engine.outpaint(image, PROMPT, progress=False, right=5, bottom=3, seam=2)
    assert result[0].size == (35, 30)
    assert (result.request.width, result.request.height) == (32, 24)  # the model's size step
    assert np.array_equal(np.asarray(result[0])[:25, :28], np.asarray(image)[:25, :28])


def test_beyond_native_size_tiles_progress_and_exactness(sd_engine):
    """Native 32 px: 32 + 40 + 40 wide and 24 higher runs as tiles; progress counts them all."""
    image = _image(seed=4)
    events = []
    req = Request(mode="outpaint", image=image, prompt=PROMPT, left=40, right=40, bottom=24)
    req.seam, req.seed, req.num_images = 4, 9, 2
    job = sd_engine.submit(req, callback=lambda k, j, ev: events.append((k, ev)))
    result = job.result(timeout=300)
    assert job.wait_delivered(30)
    out = result[0]
    assert out.size == (112, 56) and len(result) == 2
    assert not np.array_equal(np.asarray(result[0]), np.asarray(result[1]))
    for made in result:
        inner = np.asarray(made)[:32, 40:72]
        kept = _kept(image, made, result.request)
        assert kept[:28, 4:28].all()
        assert np.array_equal(inner[kept], np.asarray(image)[kept])
    checked = sd_engine.check(req)
    area = outpainting.extend(image, outpainting.sides(checked), "stretch", 0)[1]
    soft = outpainting.seam_mask(area, 4, 4)
    tiles = outpainting.plan(soft, (40, 0, 72, 32), (32, 32), 8)
    steps = [ev.step for k, ev in events if k == "progress"]
    per_tile = 3  # 4 steps x strength 0.75
    assert len(tiles) > 4 and steps == list(range(1, len(tiles) * per_tile + 1))
    assert {ev.total for k, ev in events if k == "progress"} == {len(tiles) * per_tile}
    # the new area is painted everywhere, not left as the stretched edge
    canvas, area = outpainting.extend(image, outpainting.sides(checked), "stretch", 9)
    new = np.asarray(area) > 0
    changed = np.abs(np.asarray(out, int) - np.asarray(canvas, int)).sum(axis=2)[new] > 0
    assert changed.mean() > 0.9


def test_nine_channel_and_sdxl_engines(inpaint_engine, sdxl_engine):
    image = _image(seed=2)
    for engine in (inpaint_engine, sdxl_engine):
        result = engine.outpaint(image, PROMPT, progress=False, top=16, seam=4, seed=1)
        out = np.asarray(result[0])
        assert result[0].size == (32, 48)
        assert np.array_equal(out[20:], np.asarray(image)[4:])


def test_cancel_between_and_within_tiles(sd_engine):
    """Cancelled in the second tile's first step: no step of a later tile runs."""
    image = _image(seed=5)
    steps, at_cancel, stopped = [], [], threading.Event()

    def on_event(kind, job, ev):
        if kind == "progress":
            steps.append(ev.step)
            if ev.step == 4:  # tile 2, step 1 (3 steps per tile)
                at_cancel.append(job.progress.step)
                job.cancel()
        elif kind == "cancelled":
            stopped.set()

    req = Request(mode="outpaint", image=image, prompt=PROMPT, left=64, right=64, seed=1)
    job = sd_engine.submit(req, callback=on_event)
    with pytest.raises(JobCancelled):
        job.result(timeout=120)
    assert stopped.wait(30) and job.state == "cancelled"
    total = job.progress.total
    assert total >= 15 and max(steps) <= at_cancel[0] + 1 < total


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({}, "left", "by 0 on every side"),
        ({"right": MAX_SIZE - 20}, "right", f"at most {MAX_SIZE}"),
        ({"left": 4000, "right": 100}, "left", "wide"),
        ({"top": MAX_SIZE}, "top", "high"),
        ({"left": 3000, "bottom": 3000, "num_images": 2}, "left", "pixels"),
        ({"left": -1}, "left", "0..4096"),
        ({"left": 8, "extend_fill": "mirror"}, "extend_fill", "stretch, noise, colour"),
        ({"left": 8, "seam": 300}, "seam", "0..256"),
    ],
)
def test_bad_input_names_the_field(sd_engine, fields, field, words):
    with pytest.raises(RequestError) as err:
        sd_engine.check(Request(mode="outpaint", image=_image(), **fields))
    assert err.value.field == field and words in err.value.message


def test_missing_image_and_unserved_family(sd_engine, ddpm_engine):
    with pytest.raises(RequestError) as err:
        sd_engine.check(Request(mode="outpaint", left=8))
    assert err.value.field == "image"
    with pytest.raises(RequestError) as err:
        ddpm_engine.check(Request(mode="outpaint", image=_image(), left=8))
    assert err.value.field == "mode"


def test_registered_and_described():
    spec = modes.get("outpaint")
    assert spec.name == modes.Mode.OUTPAINT == "outpaint"
    assert {"left", "right", "top", "bottom", "extend_fill", "seam", "mask_blur"} <= set(
        spec.fields
    )
    assert "width" not in spec.fields and spec.inputs == ("image",)


def test_cli_outpaint(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["outpaint", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--left", "--right", "--top", "--bottom", "--extend-fill", "--seam"):
        assert flag in help_text
    _image().save(tmp_path / "in.png")
    argv = ["outpaint", str(tmp_path / "in.png"), PROMPT, "--left", "8", "--bottom", "16"]
    argv += ["--seed", "2", "--model", str(tiny_models["sd"]), "--device", "cpu"]
    code = main([*argv, "--out", str(tmp_path / "o"), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    made = Image.open(out.out.strip())
    assert made.size == (40, 48)
    code = main([*argv[:3], "--out", str(tmp_path / "p"), "--model", str(tiny_models["sd"])])
    assert code != 0 and "left" in capsys.readouterr().err


# ------------------------------------------------------------------------ the embedded model


@pytest.mark.slow
def test_embedded_model_beyond_its_native_size():
    """64x64 model, a 64x64 picture extended by 64 left and right: 192 wide; the original
    outside the seam stays exact and the blue background carries on into the new area."""
    from sdkit.embedded import shapes

    image = shapes.render(shapes.Scene("circle", "red", "blue", 32, 32, 18, 0))
    result = sdkit.outpaint(image, PROMPT, left=64, right=64, seam=8, seed=1, progress=False)
    out = np.asarray(result[0])
    assert result[0].size == (192, 64)
    assert np.array_equal(out[:, 72:120], np.asarray(image)[:, 8:56])
    for side in (out[:, :56], out[:, -56:]):
        names = np.array(list(shapes.COLOURS))[shapes.nearest_colours(side.astype(float))]
        assert (names == "blue").mean() > 0.5


# ------------------------------------------------------------------------ the widget


def test_widget_extend_buttons_outpaint_the_current_image(sd_engine, ddpm_engine):
    from sdkit.widgets import SDWidget

    wd = SDWidget(engine=sd_engine, prompt=PROMPT, seed=4, outputs_dir=None)
    try:
        wd.extend_buttons.buttons["left"].click()  # no picture yet: the error names it
        assert wd.last_job is None and "image" in wd.status.value
        image = _image(seed=6)
        wd.painter.set_image(image)
        wd.extend_buttons.pixels.value = 16
        wd.controls.seam.value = 8
        wd.extend_buttons.buttons["bottom"].click()
        job = wd.last_job
        assert job is not None and job.request.mode == "outpaint"
        wd.wait(120)
        made = wd.gallery.items[0].image
        assert made.size == (32, 48) and job.state == "done"
        assert wd.controls.mode == "outpaint" and wd.controls.bottom.value == 16
        assert wd.controls.left.value == wd.controls.top.value == wd.controls.right.value == 0
        assert job.request.seam == 8
        assert np.array_equal(np.asarray(made)[:24], np.asarray(image)[:24])
        # the next click extends what the last one made (its result is the selection)
        wd.extend_buttons.buttons["right"].click()
        wd.wait(120)
        assert wd.gallery.items[0].image.size == (48, 48)
        made = wd.gallery.items[0].image
        # no input picture: the gallery's selected image
        wd.painter.set_image(None)
        wd.extend_buttons.pixels.value = 8
        wd.extend_buttons.buttons["top"].click()
        wd.wait(120)
        assert wd.gallery.items[0].image.size == (48, 56)
        assert np.array_equal(np.asarray(wd.gallery.items[0].image)[16:], np.asarray(made)[8:])
    finally:
        wd.close()
    other = SDWidget(engine=ddpm_engine, outputs_dir=None)
    try:  # a model that cannot outpaint shows no extend buttons
        assert other.extend_buttons.widget.layout.display == "none"
    finally:
        other.close()


# ------------------------------------------------------------------------ the editors' side


@pytest.fixture(scope="module")
def bridge(sd_engine):
    from sdkit.bridge import serve

    handle = serve(sd_engine, bind="tcp://127.0.0.1:0")
    yield handle.address
    handle.stop()


def test_expand_canvas_action_through_a_real_server(bridge):
    """The plug-ins' Expand canvas (stdlib side): hello offers outpaint, the request carries
    the sides, the layer covers the grown canvas and is opaque only where the server may
    have repainted (new area + seam band); the rest of the original shows through."""
    from sdkit.bridge import editor_actions as ea
    from sdkit.bridge import editor_connection as ec
    from sdkit.bridge import editor_expand as ex
    from sdkit.bridge import editor_geometry as geo

    w, h = 29, 21  # not multiples of 8
    image = _image(w, h, seed=8)
    rgba = image.convert("RGBA").tobytes()
    conn = ec.Connection(bridge)
    conn.wait_ready()
    try:
        mode = conn.mode("outpaint")
        assert {"left", "right", "top", "bottom", "seam"} <= set(mode.fields)
        params = ea.Params(prompt=PROMPT, num_inference_steps=4, seed=2)
        sides = ex.Sides(left=8, top=4, bottom=11)
        with pytest.raises(geo.EditorError, match="at least one side"):
            ex.plan_expand(mode, params, ex.Sides(), (w, h), lambda r: rgba)
        action = ex.plan_expand(
            mode, params, sides, (w, h), lambda r: geo.crop(rgba, w, h, r, 4), seam=4
        )
        assert action.request_kwargs()["request"]["left"] == 8
        placement = ea.run_blocking(conn, action, timeout=120)
        big = ex.plan_expand(mode, params, ex.Sides(right=4096), (w, h), lambda r: rgba)
        with pytest.raises(geo.EditorError, match="right"):
            ea.run_blocking(conn, big, timeout=60)  # the server's error names the side
    finally:
        conn.close()
    assert (placement.x, placement.y, placement.width, placement.height) == (0, 0, 37, 36)
    assert placement.name == f"[sdkit] {PROMPT} (2)"
    layer = np.frombuffer(placement.rgba, np.uint8).reshape(36, 37, 4)
    kept = action.kept_rect()
    assert (kept.x, kept.y, kept.width, kept.height) == (12, 8, 25, 13)
    alpha = layer[..., 3]
    assert (alpha[8:21, 12:37] == 0).all()
    opaque = np.ones_like(alpha, bool)
    opaque[8:21, 12:37] = False
    assert (alpha[opaque] == 255).all()
    # what shows through (the original) is what the server left exact
    assert np.array_equal(layer[8:21, 12:37, :3], np.asarray(image)[4:17, 4:29])


def test_infotext_round_trip_keeps_the_sides(sd_engine, tmp_path):
    result = sd_engine.outpaint(
        _image(), PROMPT, progress=False, left=8, bottom=16, extend_fill="noise", seam=6, seed=2
    )
    text = result.request.to_infotext()
    assert "Outpaint left: 8" in text and "Outpaint right" not in text
    back = Request.from_infotext(text)
    assert back.mode == "outpaint" and not back.extra
    assert (back.left, back.right, back.top, back.bottom) == (8, 0, 0, 16)
    assert (back.extend_fill, back.seam, back.mask_blur) == ("noise", 6, 4)
    path = result.save(tmp_path)[0]
    assert Request.from_png(path).bottom == 16
    # keys for a mode that does not read them are kept, not dropped
    other = Request.from_infotext(text.replace("Mode: outpaint, ", ""))
    assert other.left == 0 and other.extra["Outpaint left"] == "8"
