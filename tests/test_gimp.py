"""The GIMP 3 plug-in inside a real GIMP 3 against a live server.

Debian 12 has GIMP 2.10 only, so GIMP 3 lives in a Debian 13 chroot that
scripts/setup-editors.sh builds (default .cache/gimp3-chroot, or $SDKIT_GIMP_CHROOT).
The plug-in is installed into a GIMP user folder inside the chroot, GIMP registers it
at start-up, and tests/editors/gimp_scenario.py calls its procedures through the PDB;
the server runs out here (the chroot shares the loopback interface).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from sdkit.bridge import plugins

from tests.editors import checks

pytestmark = [pytest.mark.editor, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CHROOT = Path(os.environ.get("SDKIT_GIMP_CHROOT", REPO / ".cache" / "gimp3-chroot"))
SCENARIO = Path(__file__).parent / "editors" / "gimp_scenario.py"
W, H = 101, 77


@pytest.fixture(scope="module")
def chroot():
    if not (CHROOT / ".sdkit-ready").exists() or not (CHROOT / "usr/bin/gimp-console-3.0").exists():
        pytest.skip(f"no GIMP 3 chroot at {CHROOT}: run scripts/setup-editors.sh")
    if os.geteuid() != 0:
        pytest.skip("running GIMP 3 in its chroot needs root (chroot, mount)")
    mounted = []
    for name in ("proc", "dev"):
        target = CHROOT / name
        if subprocess.run(["mountpoint", "-q", str(target)]).returncode != 0:
            cmd = ["mount", "-t", "proc", "proc", str(target)]
            if name == "dev":
                cmd = ["mount", "--bind", "/dev", str(target)]
            subprocess.run(cmd, check=True)
            mounted.append(target)
    yield CHROOT
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


def _only_needed_system_plugins(chroot: Path, work: Path, inside: str, config: Path) -> None:
    """Start GIMP with just the python-eval system plug-in (plus ours).

    A fresh GIMP profile queries every installed plug-in at start-up, which takes
    minutes on a busy machine; the batch interpreter is all this test needs.
    """
    (system,) = chroot.glob("usr/lib/*/gimp/3.0/plug-ins/python-eval")
    needed = work / "system-plug-ins"
    needed.mkdir()
    (needed / "python-eval").symlink_to("/" + str(system.relative_to(chroot)))
    (config / "gimprc").write_text(
        f'(plug-in-path "${{gimp_dir}}/plug-ins:{inside}/system-plug-ins")\n'
    )


@pytest.fixture(scope="module")
def gimp_run(chroot):
    work = Path(tempfile.mkdtemp(prefix="sdkit-gimp-", dir=chroot / "tmp"))
    inside = "/" + str(work.relative_to(chroot))
    try:
        home = work / "home"
        config = home / ".config" / "GIMP" / "3.0"
        installed = plugins.install("gimp", config / "plug-ins")
        _only_needed_system_plugins(chroot, work, inside, config)
        out = work / "out"
        out.mkdir()
        shutil.copy(SCENARIO, work / "scenario.py")
        with checks.live_server() as address:
            cmd = [
                "chroot",
                str(chroot),
                "env",
                f"HOME={inside}/home",
                f"XDG_CONFIG_HOME={inside}/home/.config",
                f"SDKIT_ADDRESS={address}",
                f"SDKIT_DEAD_ADDRESS={checks.dead_address()}",
                f"SDKIT_OUT={inside}/out",
                "gimp-console-3.0",
                "-i",
                "--batch-interpreter=python-fu-eval",
                "-b",
                f"exec(open('{inside}/scenario.py').read())",
                "--quit",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        assert (out / "report.json").exists(), (
            f"GIMP exited {proc.returncode} without a report:\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
        yield installed, out, checks.load_report(out), proc.stdout + proc.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_installer_makes_a_runnable_gimp_plugin(gimp_run):
    installed, _, _, _ = gimp_run
    script = installed / "sdkit-gimp.py"
    assert installed.name == "sdkit-gimp" and script.is_file()
    assert os.access(script, os.X_OK)
    for name in plugins.SHARED_MODULES:
        assert (installed / name).is_file()


def test_inpaint_selection_adds_a_layer_at_the_selection_and_changes_only_it(gimp_run):
    _, out, report, log = gimp_run
    status, error = report["inpaint"]
    assert status == "success", f"{error}\n{log[-3000:]}"
    mask_bounds = checks.judge_inpaint(out, W, H)
    sel = report["selection_bounds"]
    assert sel == [mask_bounds.x, mask_bounds.y, mask_bounds.width, mask_bounds.height]
    layers = report["layers_after_inpaint"]
    assert layers[0] == ["[sdkit] a red circle (11)", *sel]  # on top, at the selection
    assert len(layers) == 2


def test_generate_adds_a_layer_of_the_requested_size(gimp_run):
    _, _, report, log = gimp_run
    status, error = report["txt2img"]
    assert status == "success", f"{error}\n{log[-3000:]}"
    x, y = report["selection_bounds"][:2]
    assert report["layers"][0] == ["[sdkit] a blue square (5)", x, y, 64, 48]


def test_dead_server_fails_clearly_and_adds_nothing(gimp_run):
    _, _, report, log = gimp_run
    status, error = report["dead_server"]
    assert status == "execution-error"
    assert report["layers_after_dead"] == 1
    # GIMP passes the plug-in's message on (or at least logs it).
    assert "no sdkit server answers" in ((error or "") + log)


def test_the_mode_argument_is_checked_against_the_servers_hello(gimp_run):
    _, _, report, log = gimp_run
    status, error = report["unknown_mode"]
    assert status == "execution-error"
    message = (error or "") + log
    assert "does not offer 'outpaint-v9'" in message and "txt2img" in message


def test_the_plugin_offers_the_servers_lora_list(gimp_run):
    """Issue 14.8: sdkit-loras returns hello's ``loras`` (the embedded model's shipped
    sdkcross); a LoRA chosen by name runs, one the server lacks is refused naming the list."""
    _, _, report, log = gimp_run
    loras = report["loras"]
    assert loras["status"] == "success", f"{loras['error']}\n{log[-3000:]}"
    import sdkit

    assert loras["names"] == sdkit.load().info()["loras"]
    assert "sdkcross" in loras["names"]
    status, error = report["lora_generate"]
    assert status == "success", f"{error}\n{log[-3000:]}"
    assert report["lora_top_layer"][0].startswith("[sdkit] a red x")
    status, error = report["unknown_lora"]
    assert status == "execution-error"
    message = (error or "") + log
    assert "no LoRA '../nope'" in message and "sdkcross" in message


def test_expand_canvas_grows_the_image_and_the_old_pixels_stay(gimp_run):
    """Issue 15.5: sdkit-expand grows the image by the chosen sides and adds the new area
    (and the seam) as one layer; outside the seam the old pixels are exactly as they were.
    A request the server refuses, or one with nothing to add, changes nothing."""
    import numpy as np

    _, out, report, log = gimp_run
    expand = report["expand"]
    for refused in expand["refused"]:
        assert refused["status"] == "execution-error", refused
        assert refused["size"] == [W, H] and refused["layers"] == 1 and refused["pixels_same"]
    assert "at least one side" in ((expand["refused"][0]["error"] or "") + log)
    assert "right" in (expand["refused"][1]["error"] or "")
    status, error = expand["result"]
    assert status == "success", f"{error}\n{log[-3000:]}"
    left, right, top, bottom = expand["sides"]
    new_w, new_h = W + left + right, H + top + bottom
    assert expand["size"] == [new_w, new_h]
    assert expand["layers"][0] == ["[sdkit] a red circle (3)", 0, 0, new_w, new_h]
    assert len(expand["layers"]) == 2
    before = np.frombuffer((out / "expand_before.bin").read_bytes(), np.uint8).reshape(H, W, 4)
    after = np.frombuffer((out / "expand_after.bin").read_bytes(), np.uint8)
    after = after.reshape(new_h, new_w, 4)
    seam = expand["seam"]
    old = after[top : top + H, left : left + W]
    assert np.array_equal(old[: H - seam, seam:], before[: H - seam, seam:])
    new = np.ones((new_h, new_w), bool)
    new[top : top + H, left : left + W] = False
    assert (after[new][:, 3] == 255).all() and after[new][:, :3].std() > 5


def test_control_layer_steers_where_the_shape_is_generated(gimp_run):
    """Issue 15.5: Generate's control-layer argument names a (hidden) layer with a white ring;
    its pixels travel as the control frame and the embedded model's shape lands on the ring's
    side (the embedded ControlNet is still training: judged by halves). A layer the image
    lacks is refused, naming it, and adds nothing."""
    import numpy as np
    from PIL import Image

    from sdkit.embedded import scribbles

    _, out, report, log = gimp_run
    control = report["control"]
    centres = {}
    for side in ("left", "right"):
        status, error = control[side]["status"]
        assert status == "success", f"{error}\n{log[-3000:]}"
        assert control[side]["layer"][1:] == [0, 0, 64, 64]
        assert control[side]["layer"][0].startswith("[sdkit] a red circle")
        rgba = np.frombuffer((out / f"control_{side}.bin").read_bytes(), np.uint8)
        picture = Image.fromarray(rgba.reshape(64, 64, 4)[..., :3])
        ys, xs = np.nonzero(scribbles.blob(picture))
        centres[side] = xs.mean()
    assert centres["left"] < 28 and centres["right"] > 36, centres
    status, error = control["missing"]
    assert status == "execution-error"
    assert "no layer 'gone'" in ((error or "") + log)
    assert control["layers_added_when_missing"] == 0


@pytest.fixture(scope="module")
def gimp_live(chroot):
    """tests/editors/gimp_live_scenario.py in GIMP 3 against a live server; its report."""
    work = Path(tempfile.mkdtemp(prefix="sdkit-gimp-live-", dir=chroot / "tmp"))
    inside = "/" + str(work.relative_to(chroot))
    try:
        config = work / "home" / ".config" / "GIMP" / "3.0"
        plugins.install("gimp", config / "plug-ins")
        _only_needed_system_plugins(chroot, work, inside, config)
        out = work / "out"
        out.mkdir()
        shutil.copy(SCENARIO.with_name("gimp_live_scenario.py"), work / "scenario.py")
        with checks.live_server() as address:
            cmd = [
                "chroot", str(chroot), "env", f"HOME={inside}/home",
                f"XDG_CONFIG_HOME={inside}/home/.config", f"SDKIT_ADDRESS={address}",
                f"SDKIT_OUT={inside}/out", "gimp-console-3.0", "-i",
                "--batch-interpreter=python-fu-eval",
                "-b", f"exec(open('{inside}/scenario.py').read())", "--quit",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        log = proc.stdout + proc.stderr
        (REPO / "artifacts").mkdir(exist_ok=True)
        (REPO / "artifacts" / "gimp-live.log").write_text(log)
        assert (out / "report.json").exists(), f"GIMP exited {proc.returncode}:\n{log[-3000:]}"
        report = checks.load_report(out)
        assert "exception" not in report, report["exception"]
        yield report, log
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_live_redraws_the_layer_into_one_locked_live_layer_and_apply_keeps_it(gimp_live):
    """Issue 16.4 in GIMP: sdkit-live polls the layer in a GLib loop and writes the frame
    (img2img; inpaint of the selection) in place into one content-locked [sdkit live] layer;
    sdkit-live-apply copies it into a normal layer. A script cannot paint while sdkit-live
    runs (a PDB call from a plug-in is synchronous: gimp_live.py), so each run shows one
    frame: the layer as it is, after a scripted stroke, with a selection."""
    report, log = gimp_live
    runs = report["runs"]
    for run in runs:
        assert run["status"] == "success", f"{run}\n{log[-3000:]}"
        assert run["frames"] == 1 and run["live_layers"] == 1 and run["locked"], run
    assert len({run["id"] for run in runs}) == 1, "the live layer should be updated in place"
    assert len({run["crc"] for run in runs}) == 3, "every run should show a new frame"
    assert runs[0]["alpha_bounds"] == [0, 0, 64, 64]
    assert runs[2]["alpha_bounds"] == [20, 20, 24, 24]  # the selection, inpainted
    apply = report["apply"]
    assert apply["status"] == "success", apply
    assert apply["layers"] == ["[sdkit live]", "[sdkit] live frame", "bg"], apply
    assert apply["same_pixels"] and not apply["locked"], apply
    status, error = report["apply_without_live"]
    assert status == "execution-error" and "no [sdkit live] layer" in ((error or "") + log)
