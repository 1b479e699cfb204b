"""sdkit.grid (issue 17.4): cell count and geometry, each cell equal to its own image, the
labels drawn in, axis values checked with errors naming the axis and field, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdkit
from sdkit.cli import main
from sdkit.grid import parse_axis
from sdkit.request import Request, RequestError

X = ("guidance_scale", [1, 4, 9])
Y = ("scheduler", ["Euler a", "DPM++ 2M"])


def blank(region: Image.Image) -> bool:
    return bool((np.asarray(region.convert("L")) == 255).all())


def test_grid_cells_sit_in_a_labelled_lattice_and_equal_their_own_images(sd_engine, tmp_path):
    req = Request(prompt="a red circle", num_inference_steps=3, seed=11)
    g = sdkit.grid(req, x=X, y=Y, executor=sd_engine, out=tmp_path)
    assert len(g.images) == len(g.boxes) == 6
    w, h = g.images[0].size
    lefts = sorted({b[0] for b in g.boxes})
    tops = sorted({b[1] for b in g.boxes})
    assert len(lefts) == 3 and len(tops) == 2
    assert np.diff(lefts).tolist() == [w, w] and np.diff(tops).tolist() == [h]
    assert g.image.size == (lefts[0] + 3 * w, tops[0] + 2 * h)  # labels left and on top only
    assert lefts[0] > 0 and tops[0] > 0
    files = sorted(p for p in tmp_path.glob("0*.png"))
    assert len(files) == 6 and (tmp_path / "grid.png").exists()
    for n, (box, image, path) in enumerate(zip(g.boxes, g.images, files, strict=True)):
        crop = g.image.crop(box)
        assert crop.tobytes() == image.convert("RGB").tobytes()
        with Image.open(path) as saved:
            assert saved.convert("RGB").tobytes() == crop.tobytes()
        cell = Request.from_png(path)  # x varies fastest, then y
        assert cell.guidance_scale == X[1][n % 3] and cell.scheduler == Y[1][n // 3]
        assert cell.seed == 11
    assert len({im.tobytes() for im in g.images}) == 6  # the axes changed the pictures
    # the label strips carry ink: the column labels above, the row labels at left
    for left, _, right, _ in g.boxes[:3]:
        assert not blank(g.image.crop((left, 0, right, tops[0])))
    for _, top, _, bottom in g.boxes[::3]:
        assert not blank(g.image.crop((0, top, lefts[0], bottom)))
    assert blank(g.image.crop((0, 0, lefts[0], tops[0])))  # the corner stays empty


def test_a_z_axis_gives_one_titled_grid_per_value(sd_engine):
    g = sdkit.grid(
        "a red circle",
        x=("guidance_scale", ["2", "6"]),
        z=("num_inference_steps", [2, 3]),
        executor=sd_engine,
        seed=4,
    )
    assert len(g.images) == 4
    tops = {b[1] for b in g.boxes}
    assert len(tops) == 1 and min(tops) > 0  # title and column labels above one row
    lefts = sorted(b[0] for b in g.boxes)
    assert lefts[1] - lefts[0] == g.images[0].width and lefts[2] - lefts[1] > g.images[0].width
    assert [it.request.num_inference_steps for it in g.items] == [2, 2, 3, 3]
    assert all(it.request.seed == 4 for it in g.items)  # one seed for every cell


@pytest.mark.parametrize(
    ("axes", "field", "words"),
    [
        ({"x": ("guidance_scale", [3, 500])}, "guidance_scale", "axis x value 500"),
        ({"x": X, "y": ("scheduler", ["Euler a", "Nope"])}, "scheduler", "axis y value 'Nope'"),
        ({"x": ("colour", ["red"])}, "colour", "axis x value 'red'"),
        ({"z": ("num_inference_steps", ["two"])}, "num_inference_steps", "axis z value 'two'"),
        ({"x": ("guidance_scale", [])}, "guidance_scale", "axis x has no values"),
    ],
)
def test_bad_axis_values_name_the_axis_and_field_before_anything_runs(
    sd_engine, axes, field, words
):
    class Refuse:
        check = staticmethod(sd_engine.check)

        def submit(self, request):
            raise AssertionError("a cell ran before every axis value was checked")

    with pytest.raises(RequestError) as err:
        sdkit.grid("a red circle", executor=Refuse(), **axes)
    assert err.value.field == field and words in str(err.value)


def test_parse_axis():
    assert parse_axis("scheduler=Euler a, DPM++ 2M", "y") == ("scheduler", ["Euler a", "DPM++ 2M"])
    with pytest.raises(RequestError, match="^x: expected FIELD=V1,V2"):
        parse_axis("guidance_scale", "x")


def test_sdkit_grid_cli_writes_the_grid_and_its_cells(tiny_models, tmp_path, capsys):
    argv = [
        "grid",
        "a red circle",
        "--x",
        "guidance_scale=3,5,7",
        "--y",
        "scheduler=Euler a,DPM++ 2M",
    ]
    argv += ["--out", str(tmp_path), "--set", "num_inference_steps=2", "--set", "seed=3"]
    argv += ["--model", str(tiny_models["sd"]), "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "grid.png")
    assert "grid: 6 cells" in out.err
    assert len(list(tmp_path.glob("0*.png"))) == 6
    bad = argv[:3] + ["guidance_scale=3,x"] + argv[4:]
    assert main(bad) == 2
    assert "error: guidance_scale: axis x value 'x'" in capsys.readouterr().err


def test_the_studio_grid_panel_puts_the_labelled_grid_in_the_gallery(sd_engine, tmp_path):
    from sdkit.widgets.studio import SDWidget

    wd = SDWidget(engine=sd_engine, prompt="a red circle", seed=5, outputs_dir=tmp_path)
    wd.controls.num_inference_steps.value = 2
    panel = wd.grid_panel
    panel.x_field.value, panel.x_values.value = "guidance_scale", "2, 6"
    panel.y_field.value, panel.y_values.value = "scheduler", "Euler a, DPM++ 2M"
    assert panel.run() is not None
    panel.wait(300)
    g = panel.result
    assert g is not None and len(g.images) == 4, panel.status.value
    assert "4 cells" in panel.status.value
    shown = wd.gallery.selected.image
    assert shown.size == g.image.size and shown.tobytes() == g.image.tobytes()
    assert Request.from_png(wd.saved[-1]).seed == 5  # saved with the request's infotext
    panel.y_values.value = " "
    assert panel.run() is None and "axis y" in panel.status.value
    wd.close()
