"""The `sdkit` command line and the scripting functions: outputs, `info`, and every
validation error, through both faces."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import sdkit
from sdkit.cli import main
from sdkit.request import Request, RequestError

A1111_TEXT = (
    "a cat, (masterpiece:1.2), best quality\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
    'Model hash: abc123, Model: v1-5-pruned, Lora hashes: "x: 1, y: 2", Version: v1.6.0'
)


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-files")
    Image.new("RGB", (32, 32), (200, 20, 20)).save(d / "in.png")
    Image.new("L", (32, 32), 255).save(d / "mask.png")
    Image.new("L", (16, 16), 255).save(d / "small-mask.png")
    (d / "broken.png").write_bytes(b"not a png at all")
    return {"model": str(tiny_models["sd"]), "dir": d}


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_txt2img_writes_pngs_and_prints_their_paths(files, tmp_path, capsys):
    code, out, err = run(
        [
            "txt2img",
            "a red circle",
            "--model",
            files["model"],
            "--device",
            "cpu",
            "--seed",
            "3",
            "--num-inference-steps",
            "2",
            "--num-images",
            "2",
            "--scheduler",
            "Euler a",
            "--clip-skip",
            "2",
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    paths = out.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    req = Request.from_png(paths[1])
    assert (req.prompt, req.seed, req.num_inference_steps, req.scheduler, req.clip_skip) == (
        "a red circle",
        4,
        2,
        "Euler a",
        2,
    )
    # `sdkit info` prints the parameters back
    code, out, _ = run(["info", paths[0]], capsys)
    assert code == 0 and "Seed: 3" in out and out.startswith("a red circle")
    code, out, _ = run(["info", paths[0], "--json"], capsys)
    assert code == 0 and '"seed": 3' in out


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "unconditional"])
def test_clip_skip_is_a_flag_of_every_prompted_mode(mode, capsys):
    with pytest.raises(SystemExit):
        main([mode, "--help"])
    assert ("--clip-skip" in capsys.readouterr().out) == (mode != "unconditional")


def test_cli_modes_match_the_api(files, tmp_path, capsys):
    d = files["dir"]
    common = [
        "--model",
        files["model"],
        "--device",
        "cpu",
        "--seed",
        "5",
        "--num-inference-steps",
        "2",
        "--quiet",
    ]
    code, out, err = run(
        [
            "img2img",
            str(d / "in.png"),
            "a blue star",
            "--strength",
            "0.5",
            "--out",
            str(tmp_path / "a"),
            *common,
        ],
        capsys,
    )
    assert code == 0, err
    api = sdkit.img2img(
        d / "in.png",
        "a blue star",
        model=files["model"],
        seed=5,
        num_inference_steps=2,
        strength=0.5,
        progress=False,
    )
    assert np.array_equal(np.asarray(Image.open(out.strip()).convert("RGB")), np.asarray(api[0]))
    code, out, err = run(
        [
            "inpaint",
            str(d / "in.png"),
            str(d / "mask.png"),
            "a blue star",
            "--grow",
            "1",
            "--fill",
            "noise",
            "--no-only-masked",
            "--out",
            str(tmp_path / "b"),
            *common,
        ],
        capsys,
    )
    assert code == 0, err
    code, out, err = run(["unconditional", "--out", str(tmp_path / "c"), *common], capsys)
    assert code == 0, err
    assert "CFG scale: 1" in Request.from_png(out.strip()).to_infotext()


def test_info_reads_a1111_images_and_keeps_unknown_keys(tmp_path, capsys):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_TEXT)
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    code, out, _ = run(["info", str(tmp_path / "a1111.png")], capsys)
    assert code == 0 and out.strip() == A1111_TEXT
    code, out, _ = run(["info", str(tmp_path / "a1111.png"), "--json"], capsys)
    assert code == 0 and '"Model hash": "abc123"' in out and '"seed": 1234' in out


def test_info_without_parameters_is_an_error(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code, _, err = run(["info", str(tmp_path / "plain.png")], capsys)
    assert code == 2 and err.startswith("error: parameters:")


# (argv after the subcommand's own positional arguments, API call kwargs, field at fault)
CASES = [
    ("txt2img", ["   "], {}, "prompt"),
    (
        "txt2img",
        ["x", "--num-inference-steps", "0"],
        {"num_inference_steps": 0},
        "num_inference_steps",
    ),
    (
        "txt2img",
        ["x", "--num-inference-steps", "1001"],
        {"num_inference_steps": 1001},
        "num_inference_steps",
    ),
    ("txt2img", ["x", "--guidance-scale", "-1"], {"guidance_scale": -1.0}, "guidance_scale"),
    ("txt2img", ["x", "--width", "30"], {"width": 30}, "width"),
    ("txt2img", ["x", "--height", "0"], {"height": 0}, "height"),
    ("txt2img", ["x", "--num-images", "17"], {"num_images": 17}, "num_images"),
    ("txt2img", ["x", "--scheduler", "Nope"], {"scheduler": "Nope"}, "scheduler"),
    ("txt2img", ["x", "--clip-skip", "13"], {"clip_skip": 13}, "clip_skip"),
    ("img2img", ["{in}", "x", "--clip-skip", "0"], {"clip_skip": 0}, "clip_skip"),
    ("img2img", ["{in}", "x", "--strength", "1.5"], {"strength": 1.5}, "strength"),
    ("img2img", ["{in}", "x", "--strength", "0"], {"strength": 0.0}, "strength"),
    ("img2img", ["{missing}", "x"], {}, "image"),
    ("img2img", ["{broken}", "x"], {}, "image"),
    ("inpaint", ["{in}", "{small}", "x"], {}, "mask"),
    ("inpaint", ["{in}", "{mask}", "x", "--fill", "paint"], {"fill": "paint"}, "fill"),
    ("inpaint", ["{in}", "{mask}", "x", "--grow", "-1"], {"grow": -1}, "grow"),
]


def _argv(files, parts):
    d = files["dir"]
    names = {
        "in": d / "in.png",
        "mask": d / "mask.png",
        "small": d / "small-mask.png",
        "broken": d / "broken.png",
        "missing": d / "missing.png",
    }
    return [p.format(**{k: str(v) for k, v in names.items()}) for p in parts]


@pytest.mark.parametrize("mode,parts,kwargs,field", CASES)
def test_validation_errors_through_the_cli(files, capsys, tmp_path, mode, parts, kwargs, field):
    argv = [
        mode,
        *_argv(files, parts),
        "--model",
        files["model"],
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.startswith(f"error: {field}: "), err
    assert out == "" and not list(tmp_path.iterdir())


@pytest.mark.parametrize("mode,parts,kwargs,field", CASES)
def test_validation_errors_through_the_api(files, mode, parts, kwargs, field):
    positional = _argv(files, parts)
    fn = getattr(sdkit, mode)
    if mode == "txt2img":
        args = [positional[0]]
    elif mode == "img2img":
        args = positional[:2]
    else:
        args = positional[:3]
    with pytest.raises(RequestError) as err:
        fn(*args, model=files["model"], progress=False, **kwargs)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


def test_unknown_keyword_is_a_request_error(files):
    with pytest.raises(RequestError) as err:
        sdkit.txt2img("x", model=files["model"], steps=3, progress=False)
    assert err.value.field == "steps" and "num_inference_steps" in str(err.value)


def test_missing_model_is_reported(tmp_path, capsys):
    code, _, err = run(["txt2img", "x", "--model", str(tmp_path / "nope"), "--quiet"], capsys)
    assert code == 1 and err.startswith("error: model:")


def test_importing_the_cli_never_imports_the_bridge():
    code = "import sys, sdkit, sdkit.cli, sdkit.api; print(any(m.startswith(('sdkit.bridge', 'zmq')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_other_parts_register_subcommands(tmp_path, monkeypatch, capsys):
    (tmp_path / "sdkit_test_ext.py").write_text(
        textwrap.dedent(
            """
            def register(subparsers):
                p = subparsers.add_parser("hello")
                p.add_argument("--name", default="world")
                p.set_defaults(func=lambda args: print("hello", args.name) or 7)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import sdkit.cli as cli

    monkeypatch.setattr(cli, "EXTENSIONS", ("sdkit_test_ext", "sdkit_missing_ext"))
    code, out, _ = run(["hello", "--name", "sdkit"], capsys)
    assert code == 7 and out.strip() == "hello sdkit"


def test_size_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    """`sdkit txt2img x --width 37` on the embedded model (VAE factor 4, sizes in steps of 8):
    refused with the right multiple before any weights load or a progress bar starts."""
    import sdkit.api

    loads = []
    monkeypatch.setattr(sdkit.api, "load", lambda *a, **k: loads.append(a) or 1 / 0)
    code, out, err = run(["txt2img", "x", "--width", "37", "--out", str(tmp_path)], capsys)
    assert code == 2 and loads == [] and out == ""
    assert err.startswith("error: width: must be a positive multiple of 8 up to 4096"), err
    assert "try 32 or 40" in err and "VAE factor is 8" not in err


def test_engine_check_runs_before_the_progress_bar(files, capsys, tmp_path):
    # 3 steps x strength 0.2 leaves no step: only the loaded model's defaults tell
    argv = [*_argv(files, ["img2img", "{in}", "x"]), "--strength", "0.2", "--model"]
    argv += [
        files["model"],
        "--device",
        "cpu",
        "--num-inference-steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: strength: "), err  # nothing (no bar) before the error


def test_importing_modes_stays_light():
    code = "import sys, sdkit.modes, sdkit.request; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_console_script_prints_paths_and_a_summary_without_loading_noise(tmp_path):
    """What `bash scripts/demo.sh` shows a newcomer: the image path, a one-line summary and
    the generation's own progress; no torchvision warnings or loading bars."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "sdkit.cli", "txt2img", "a red circle", "--seed", "7"]
    argv += ["--num-inference-steps", "2", "--device", "cpu", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(".png") and len(done.stdout.split()) == 1
    lines = [ln for ln in done.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1].startswith("txt2img: 1 image(s) 64x64, seed 7, 2 steps"), lines
    noise = [ln for ln in lines if "torchvision" in ln or "Loading" in ln or "[transformers]" in ln]
    assert noise == [], noise
    assert any("2/2" in ln for ln in lines)  # the generation's own bar stays


# ------------------------------------------------------------------ adapters (issue 14.8)


def _parsed(argv):
    from sdkit.cli import _request_from_args, build_parser

    return _request_from_args(build_parser().parse_args(argv))


def test_lora_flags_become_the_loras_field():
    req = _parsed(["txt2img", "x", "--lora", "sdkcross:0.5", "--lora", "other"])
    assert req.loras == [{"name": "sdkcross", "weight": 0.5}, {"name": "other", "weight": 1.0}]
    req = _parsed(["img2img", "in.png", "x", "--lora", "a:2"])
    assert req.loras == [{"name": "a", "weight": 2.0}]
    assert _parsed(["txt2img", "x"]).loras == []


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "unconditional"])
def test_lora_and_folder_flags_are_offered_where_they_mean_something(mode, capsys):
    with pytest.raises(SystemExit):
        main([mode, "--help"])
    text = capsys.readouterr().out
    assert ("--lora NAME[:WEIGHT]" in text) == (mode != "unconditional")
    assert "--loras" not in text  # the list field has its own per-item flag
    for flag in ("--lora-dir", "--embedding-dir", "--control-dir"):
        assert flag in text


@pytest.mark.parametrize(
    "value,field",
    [
        ("../evil:1", "loras[0].name"),  # never a path: a name the folders hold
        ("C:\\loras\\x", "loras[0].name"),
        ("x:heavy", "loras[0].weight"),
        ("x:9", "loras[0].weight"),  # out of LORA_WEIGHTS
        ("x:-1", "loras[0].weight"),
    ],
)
def test_bad_lora_flags_are_refused_before_the_model_loads(value, field, monkeypatch, capsys):
    import sdkit.api

    loads = []
    monkeypatch.setattr(sdkit.api, "load", lambda *a, **k: loads.append(a) or 1 / 0)
    code, out, err = run(["txt2img", "x", "--lora", value, "--quiet"], capsys)
    assert code == 2 and loads == [] and out == ""
    assert err.startswith(f"error: {field}: "), err


def test_folder_flags_reach_the_engine_load(monkeypatch, capsys, tmp_path):
    import sdkit.api

    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(kwargs)
        raise RequestError("model", "stop here")

    monkeypatch.setattr(sdkit.api, "load", fake_load)
    argv = ["txt2img", "x", "--lora-dir", "a", "--lora-dir", "b", "--control-dir", "c"]
    code, _, err = run([*argv, "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 2 and "stop here" in err
    assert seen["lora_dirs"] == ["a", "b"] and seen["control_dirs"] == ["c"]
    assert "embedding_dirs" not in seen  # not given: the engine's own folders only
    seen.clear()
    code, _, _ = run(["list", "--embedding-dir", "e"], capsys)
    assert code == 2 and seen["embedding_dirs"] == ["e"]


def _control_mode():
    """A registered mode whose spec takes control units (the unit parsing, without ControlNet)."""
    from sdkit import modes

    fields = ("prompt", "control", "num_inference_steps", "seed")
    return modes.ModeSpec(
        "test-control", "Test control", fields, ("prompt",), (), {}, lambda ctx: []
    )


@pytest.fixture
def control_mode():
    from sdkit import modes

    spec = modes.register(_control_mode())
    yield spec
    modes.unregister(spec.name)


def test_control_flags_become_units_with_their_images(control_mode, files):
    d = files["dir"]
    req = _parsed(
        [
            "test-control",
            "x",
            "--control",
            f"{d / 'in.png'}:scribbler:0.6",
            "--control",
            f"{d / 'mask.png'}:edges",
        ]
    )
    first, second = req.control
    assert (first["model"], first["weight"], second["model"]) == ("scribbler", 0.6, "edges")
    assert "weight" not in second  # the unit's default applies
    assert first["image"].size == (32, 32) and first["image"].getpixel((0, 0)) == (200, 20, 20)


@pytest.mark.parametrize(
    "value,field",
    [
        ("{in}", "control[0]"),  # no model
        ("{missing}:scribbler", "control[0].image"),
        ("{broken}:scribbler:0.5", "control[0].image"),
    ],
)
def test_bad_control_flags_name_the_unit(control_mode, files, capsys, value, field):
    argv = ["test-control", "x", "--control", *_argv(files, [value]), "--quiet"]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {field}: "), err


def test_control_on_a_mode_without_control_units_is_a_clear_error(files, capsys):
    from sdkit import modes

    spec = modes.register(
        modes.ModeSpec("test-plain", "Plain", ("prompt",), ("prompt",), (), {}, lambda ctx: [])
    )
    try:
        argv = ["test-plain", "x", "--control", *_argv(files, ["{in}:scribbler"]), "--quiet"]
        code, out, err = run(argv, capsys)
    finally:
        modes.unregister(spec.name)
    assert code == 2 and out == ""
    assert err.startswith("error: control: test-plain takes no control units"), err
    takers = [str(s.name) for s in modes.registered() if "control" in s.fields]
    assert all(name in err for name in takers)


# The embedded model ships the example LoRA sdkcross (sdkit/embedded/adapters).
EMBEDDED_FAST = ["--seed", "3", "--num-inference-steps", "2", "--device", "cpu", "--quiet"]


def test_lora_flag_runs_the_lora_as_the_api_does(tmp_path, capsys):
    pytest.importorskip("sdkit.adapters")
    code, out, err = run(
        ["txt2img", "a red x", "--lora", "sdkcross:1", *EMBEDDED_FAST, "--out", str(tmp_path)],
        capsys,
    )
    assert code == 0, err
    cli = np.asarray(Image.open(out.strip()).convert("RGB"))
    engine = sdkit.load(device="cpu")
    fast = {"seed": 3, "num_inference_steps": 2, "progress": False}
    api = engine.txt2img("a red x", loras=[{"name": "sdkcross", "weight": 1.0}], **fast)
    plain = engine.txt2img("a red x", **fast)
    assert np.array_equal(cli, np.asarray(api[0]))
    assert not np.array_equal(cli, np.asarray(plain[0]))  # the LoRA did something
    assert "sdkcross" in Request.from_png(out.strip()).to_infotext()


def test_an_unknown_lora_names_it_and_the_folders_searched(tmp_path, capsys):
    pytest.importorskip("sdkit.adapters")
    argv = ["txt2img", "x", "--lora", "nope", "--lora-dir", str(tmp_path), *EMBEDDED_FAST]
    code, out, err = run([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: loras") and "'nope'" in err and str(tmp_path) in err, err


def test_list_prints_the_adapters_the_folders_hold(tmp_path, capsys):
    pytest.importorskip("sdkit.adapters")
    from sdkit.embedded.train_adapters import ADAPTERS_DIR, LORA_NAME

    (tmp_path / "mine.safetensors").write_bytes(
        (ADAPTERS_DIR / f"{LORA_NAME}.safetensors").read_bytes()
    )
    code, out, err = run(["list", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "LoRAs (1):\n  sdkcross\n" in out and "  sdkdarkgreen\n" in out
    code, out, err = run(
        ["loras", "--device", "cpu", "--lora-dir", str(tmp_path), "--json"], capsys
    )
    assert code == 0, err
    import json

    found = json.loads(out)
    assert set(found) == {"loras", "embeddings", "controls"}
    assert {"mine", "sdkcross"} <= set(found["loras"]) and "sdkdarkgreen" in found["embeddings"]
    assert str(tmp_path) not in out  # names, never paths


def test_hires_flags_run_the_hires_fix_as_the_api_does(files, tmp_path, capsys):
    if "hires_scale" not in modes_fields("txt2img"):
        pytest.skip("the hires fix is not in the txt2img spec yet")
    hires = ["--hires-scale", "2", "--hires-steps", "2", "--hires-denoise", "0.5"]
    argv = ["txt2img", "a red circle", *hires, "--hires-upscaler", "Lanczos", "--model"]
    argv += [files["model"], "--device", "cpu", "--seed", "4", "--num-inference-steps", "2"]
    code, out, err = run([*argv, "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    cli = Image.open(out.strip())
    req = Request.from_png(out.strip())
    assert (req.hires_scale, req.hires_steps, req.hires_denoise, req.hires_upscaler) == (
        2.0,
        2,
        0.5,
        "Lanczos",
    )
    api = sdkit.txt2img(
        "a red circle",
        model=files["model"],
        seed=4,
        num_inference_steps=2,
        hires_scale=2.0,
        hires_steps=2,
        hires_denoise=0.5,
        hires_upscaler="Lanczos",
        progress=False,
    )
    assert cli.size == api[0].size == (64, 64)  # the tiny model's 32 x 32, twice
    assert np.array_equal(np.asarray(cli.convert("RGB")), np.asarray(api[0]))
    code, _, err = run(["txt2img", "x", "--hires-scale", "5", "--quiet"], capsys)
    assert code == 2 and err.startswith("error: hires_scale: "), err
    code, _, err = run(["txt2img", "x", "--hires-upscaler", "ESRGAN", "--quiet"], capsys)
    assert code == 2 and err.startswith("error: hires_upscaler: "), err


def modes_fields(mode: str) -> tuple[str, ...]:
    from sdkit import modes

    return modes.get(mode).fields


def test_control_flag_runs_a_controlnet_unit_as_the_api_does(files, tmp_path, capsys):
    """`--control FILE:MODEL:WEIGHT` with `--control-dir`: the unit the API runs (issue 15.5)."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from tests.test_control import tiny_controlnet

    unet = UNet2DConditionModel.from_pretrained(Path(files["model"]) / "unet")
    tiny_controlnet(unet, 1).save_pretrained(tmp_path / "cn" / "tinycn")
    scribble = tmp_path / "scribble.png"
    drawing = Image.new("RGB", (32, 32), (0, 0, 0))
    drawing.paste((255, 255, 255), (8, 8, 24, 24))
    drawing.save(scribble)
    folders = ["--control-dir", str(tmp_path / "cn"), "--model", files["model"]]
    argv = ["txt2img", "a red circle", "--control", f"{scribble}:tinycn:0.8", *folders]
    argv += ["--device", "cpu", "--seed", "4", "--num-inference-steps", "2", "--quiet"]
    code, out, err = run([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    cli = np.asarray(Image.open(out.strip()).convert("RGB"))
    engine = sdkit.load(files["model"], device="cpu", control_dirs=[str(tmp_path / "cn")])
    fast = {"seed": 4, "num_inference_steps": 2, "progress": False}
    unit = {"image": Image.open(scribble), "model": "tinycn", "weight": 0.8}
    api = engine.txt2img("a red circle", control=[unit], **fast)
    plain = engine.txt2img("a red circle", **fast)
    assert np.array_equal(cli, np.asarray(api[0]))
    assert not np.array_equal(cli, np.asarray(plain[0]))  # the unit steered the result
    code, out, err = run([*argv, "--control", f"{scribble}:nocn", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("error: control"), err
    assert "'nocn'" in err
