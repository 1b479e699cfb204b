"""sdkit.batch (issue 17.3): rows from files, stable names, resume verified by the saved
parameters, failures named by row and field, and `sdkit batch` stopped by SIGINT and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import sdkit
from sdkit.batch import Batch, row_seed
from sdkit.batch_rows import RowError, read_rows
from sdkit.request import Request


def params(path: Path) -> str:
    with Image.open(path) as im:
        return im.info["parameters"]


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


class Counting:
    """The tiny engine, counting what it is asked to run (to see what a rerun skips)."""

    def __init__(self, engine):
        self.engine = engine
        self.submitted: list[Request] = []

    def check(self, request):
        return self.engine.check(request)

    def submit(self, request):
        self.submitted.append(request)
        return self.engine.submit(request, preview_every=0)


def test_txt_rows_run_lazily_save_infotext_and_a_rerun_skips_them(sd_engine, tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("a red circle\n\n# a comment\na blue square\na red circle\n")
    runner = Counting(sd_engine)
    out = tmp_path / "out"
    run = sdkit.batch(src, out=out, executor=runner, num_inference_steps=2)
    assert runner.submitted == [] and not out.exists()  # lazy: nothing before iteration
    items = list(run)
    assert [i.status for i in items] == ["done"] * 3
    assert [i.label for i in items] == [
        "prompts.txt line 1",
        "prompts.txt line 4",
        "prompts.txt line 5",
    ]
    files = pngs(out)
    assert [p.name[:6] for p in files] == ["00001-", "00002-", "00003-"]
    for item in items:
        (path,) = item.paths
        assert params(path) == item.result.infotexts[0]
        parsed = Request.from_png(path)
        assert (parsed.prompt, parsed.num_inference_steps) == (item.request.prompt, 2)
    # the same prompt twice: two rows, two seeds (derived from the row), two pictures
    assert items[0].request.seed != items[2].request.seed
    assert str(run.summary) == "3 done, 0 skipped, 0 failed"

    again = Counting(sd_engine)
    rerun = sdkit.batch(src, out=out, executor=again, num_inference_steps=2)
    assert [i.status for i in rerun] == ["skipped"] * 3 and again.submitted == []
    assert pngs(out) == files


def test_a_changed_row_and_a_tampered_file_are_regenerated(sd_engine, tmp_path):
    src = tmp_path / "rows.jsonl"
    rows = [{"prompt": "a red circle", "seed": 1}, {"prompt": "a blue square", "seed": 2}]
    rows.append({"prompt": "a green star", "seed": 3})
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    first = list(sdkit.batch(src, out=out, executor=sd_engine, num_inference_steps=2))
    # row 2 changes its prompt; row 3's file keeps its name but its parameters were edited
    rows[1]["prompt"] = "a blue circle"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    third = first[2].paths[0]
    with Image.open(third) as im:
        im.save(third, format="PNG", pnginfo=_info("a forged text"))
    runner = Counting(sd_engine)
    items = list(sdkit.batch(src, out=out, executor=runner, num_inference_steps=2))
    assert [i.status for i in items] == ["skipped", "done", "done"]
    assert [r.prompt for r in runner.submitted] == ["a blue circle", "a green star"]
    files = pngs(out)
    assert len(files) == 3 and first[1].paths[0] not in files  # the old row 2 is gone
    assert items[1].paths[0] in files and params(third) == first[2].result.infotexts[0]


def _info(text):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def test_csv_and_png_folder_rows(sd_engine, tmp_path):
    src = tmp_path / "grid.csv"
    src.write_text(
        "prompt,guidance_scale,seed,scheduler\n"
        "a red circle,3,5,\n"
        '"a blue square, on white",7.5,6,DPM++ 2M\n'
    )
    rows = read_rows(src, {"num_inference_steps": "2"})
    assert [r.label for r in rows] == ["grid.csv row 1", "grid.csv row 2"]
    assert rows[0].request.guidance_scale == 3.0 and rows[0].request.scheduler is None
    assert rows[1].request.prompt == "a blue square, on white"
    assert rows[1].request.num_inference_steps == 2
    out = tmp_path / "first"
    made = list(sdkit.batch(src, out=out, executor=sd_engine, num_inference_steps=2))
    assert made[1].request.scheduler == "DPM++ 2M"
    # a folder of those PNGs re-runs each from its infotext: the same pixels
    again = list(sdkit.batch(out, out=tmp_path / "second", executor=sd_engine))
    assert [i.label for i in again] == [f"first/{p.name}" for p in pngs(out)]
    for a, b in zip(made, again, strict=True):
        assert a.result.infotexts == b.result.infotexts
        assert a.result[0].tobytes() == b.result[0].tobytes()


@pytest.mark.parametrize(
    ("name", "text", "row", "field"),
    [
        ("bad.csv", "prompt,guidance_scale\na,3\nb,lots\n", "bad.csv row 2", "guidance_scale"),
        ("bad.csv", "prompt,colour\na,red\n", "bad.csv header", "colour"),
        (
            "bad.jsonl",
            '{"prompt": "a"}\n{"prompt": "b", "stepz": 3}\n',
            "bad.jsonl line 2",
            "stepz",
        ),
        ("bad.jsonl", '{"prompt": "a"}\n\n[1, 2]\n', "bad.jsonl line 3", "request"),
        ("bad.csv", "prompt,only_masked\na,maybe\n", "bad.csv row 1", "only_masked"),
    ],
)
def test_bad_rows_name_the_row_and_the_field(tmp_path, name, text, row, field):
    src = tmp_path / name
    src.write_text(text)
    with pytest.raises(RowError) as err:
        read_rows(src)
    assert (err.value.row, err.value.field) == (row, field)
    assert str(err.value).startswith(f"{row}: {field}: ")


def test_a_refused_row_fails_alone_and_the_summary_names_it(sd_engine, tmp_path):
    rows = ["a red circle", {"prompt": "a blue square", "scheduler": "Nope"}, "a star"]
    run = sdkit.batch(rows, out=tmp_path, executor=sd_engine, num_inference_steps=2)
    assert [i.status for i in run] == ["done", "failed", "done"]
    assert run.summary.failed == [("request 2", run.summary.failed[0][1])] and run.summary.failed[
        0
    ][1].startswith("scheduler: unknown scheduler 'Nope'")
    assert str(run.summary).startswith("2 done, 0 skipped, 1 failed\n  request 2: scheduler: ")
    assert len(pngs(tmp_path)) == 2


def test_closing_a_batch_cancels_what_is_in_flight(sd_engine, tmp_path):
    runner = Counting(sd_engine)
    run = Batch(
        read_rows(["a red circle"] * 4, {"num_inference_steps": 2}), runner, tmp_path, 3, True
    )
    first = next(run)
    assert first.status == "done" and len(runner.submitted) == 3
    run.close()  # leaves the loop: the two waiting jobs are cancelled, never saved
    assert list(run) == [] and run.summary.remaining == 3
    assert len(pngs(tmp_path)) == 1 and not list(tmp_path.glob(".*"))


# ------------------------------------------------------------------ the CLI, SIGINT, resume

PROMPTS = [
    f"a {c} {s}"
    for c in ("red", "green", "blue", "yellow", "white")
    for s in (
        "circle",
        "square",
        "triangle",
        "star",
        "circle on black",
        "square on white",
        "triangle on blue",
        "star on red",
        "circle and star",
        "square and circle",
    )
]
FLAGS = [
    "--set",
    "width=32",
    "--set",
    "height=32",
    "--set",
    "num_inference_steps=2",
    "--device",
    "cpu",
]


@pytest.mark.slow
def test_sdkit_batch_stopped_by_sigint_and_rerun_makes_exactly_fifty_images(tmp_path):
    assert len(set(PROMPTS)) == 50
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sdkit.cli", "batch", str(src), "--out", str(out), *FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # Ctrl-C as in a terminal: a suite started in the background by a non-interactive
        # shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while len(pngs(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for files to appear, bounded by a deadline
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: " in err and "rerun to resume" in err
    saved = pngs(out)
    assert 3 <= len(saved) < 50  # stopped part way
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written file
    for p in saved:
        Image.open(p).load()  # every saved file is complete

    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = done.stderr.strip().splitlines()[-1]
    assert summary == f"{50 - len(saved)} done, {len(saved)} skipped, 0 failed"
    assert "img/s" in done.stderr  # the bar's rate
    files = pngs(out)
    assert len(files) == 50 and set(saved) <= set(files)
    assert sorted(int(p.name[:5]) for p in files) == list(range(1, 51))  # none duplicated
    rows = read_rows(src, {"width": 32, "height": 32, "num_inference_steps": 2})
    for row, path in zip(rows, files, strict=True):
        got = Request.from_png(path)
        assert (got.prompt, got.seed) == (row.request.prompt, row_seed(row))
        assert (got.width, got.height, got.num_inference_steps) == (32, 32, 2)


def test_sdkit_batch_cli_refuses_a_bad_row_before_loading_and_reports_failures(
    tiny_models, tmp_path, capsys
):
    from sdkit.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,num_inference_steps\na red circle,2\na star,two\n")
    argv = ["batch", str(bad), "--out", str(tmp_path / "out"), "--model", "/nonexistent"]
    assert main(argv) == 2  # the row is named before the (missing) model is looked for
    err = capsys.readouterr().err
    assert err.startswith("error: bad.csv row 2: num_inference_steps: 'two' is not a number")
    assert not (tmp_path / "out").exists()

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red circle"}\n{"prompt": "a star", "guidance_scale": 500}\n')
    argv = ["batch", str(rows), "--out", str(tmp_path / "out"), "--set", "num_inference_steps=2"]
    argv += ["--model", str(tiny_models["sd"]), "--device", "cpu"]
    assert main(argv) == 1  # a row failed
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert lines[-2:] == [
        "1 done, 0 skipped, 1 failed",
        "  rows.jsonl line 2: guidance_scale: must be a number in 0..100, got 500",
    ]
    assert len(pngs(tmp_path / "out")) == 1


@pytest.mark.slow
def test_a_batch_on_two_ray_replicas_makes_the_local_engines_files(tmp_path):
    """`--ray`: rows spread over replicas; the same names, parameters and pixels as locally,
    so a batch started on Ray resumes on a laptop and the other way round."""
    pytest.importorskip("ray")
    RayEngines = pytest.importorskip("sdkit.bridge.ray_engines").RayEngines  # noqa: N806

    prompts = ["a red circle", "a blue square", "a star", "a green circle", "a white star"]
    fields = {"width": 32, "height": 32, "num_inference_steps": 2}
    replicas = RayEngines(None, 2, address="local", num_cpus=2)
    try:
        ray_items = list(sdkit.batch(prompts, out=tmp_path / "ray", executor=replicas, **fields))
    finally:
        replicas.close()
    local = list(sdkit.batch(prompts, out=tmp_path / "local", model=sdkit.load(None), **fields))
    assert [i.status for i in ray_items] == ["done"] * 5
    assert [p.name for p in pngs(tmp_path / "ray")] == [p.name for p in pngs(tmp_path / "local")]
    for a, b in zip(ray_items, local, strict=True):
        (pa,), (pb,) = a.paths, b.paths
        assert params(pa) == params(pb)
        with Image.open(pa) as ia, Image.open(pb) as ib:
            assert ia.tobytes() == ib.tobytes()
    rerun = sdkit.batch(prompts, out=tmp_path / "ray", model=sdkit.load(None), **fields)
    assert [i.status for i in rerun] == ["skipped"] * 5
