"""The benchmark scripts run (tiny configs, CPU) and print their tables; no timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu.py"
CPU = ROOT / "benchmarks" / "cpu.py"


def run_script(*args: str, timeout: float = 1800) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(out: str, title: str) -> dict[str, list[str]]:
    """Rows of the markdown table under the heading that starts with `title`."""
    section = out.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| config") and len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_published_architectures_are_the_real_ones():
    # Built on the meta device: parameter counts of the published SD 1.5 and SDXL models.
    out = run_script(str(GPU), "--params")
    assert "'unet': 859520964" in out and "'text_encoder': 123060480" in out
    assert "'unet': 2567463684" in out and "'text_encoder_2': 694659840" in out
    assert out.count("'vae': 83653863") == 2


def test_gpu_script_tiny_prints_the_table():
    out = run_script(str(GPU), "--tiny", "--compile", "none", "--steps", "2", "--rounds", "1")
    assert "torch " in out and "device cpu" in out
    for title in ("tiny SD 1.5 64x64", "tiny SDXL 64x64"):
        rows = table_rows(out, title)
        assert set(rows) == {"plain", "default"}
        assert rows["plain"][1] == "1.00"  # the baseline's ratio to itself
        for cells in rows.values():
            its, ratio, image_s = (float(c) for c in cells[:3])
            assert its > 0 and ratio > 0 and image_s > 0
    assert "'sync_free': True" in out


def test_gpu_script_rejects_unknown_model():
    proc = subprocess.run(
        [sys.executable, str(GPU), "--tiny", "--models", "sd3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "--models: unknown 'sd3'" in proc.stderr


@pytest.mark.slow
def test_gpu_script_tiny_with_regional_compile():
    out = run_script(str(GPU), "--tiny", "--models", "sd15", "--steps", "2", "--rounds", "1")
    rows = table_rows(out, "tiny SD 1.5 64x64")
    assert set(rows) == {"plain", "default", "fast-regional"}
    assert re.search(r"'mode': 'regional'.*'dynamic': False", out)


@pytest.mark.slow
def test_cpu_script_on_a_saved_pipeline(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu
    import torch

    tok = tmp_path / "tok"
    gpu.build_tokenizer("a red circle".split(), tok)
    arch = gpu.TINY["sd15"]
    parts = gpu.build_components(arch, torch.device("cpu"), torch.float32, tok)
    gpu.make_pipeline(arch, parts, copy_unet_vae=False).save_pretrained(tmp_path / "model")
    out = run_script(
        str(CPU), "--model", str(tmp_path / "model"), "--no-tiny", "--steps", "2", "--rounds", "2"
    )
    rows = table_rows(out, "embedded model (model)")
    assert set(rows) == {"plain", "default", "no-channels-last", "fused-qkv", "bf16-autocast"}
    assert rows["plain"][1] == "1.00" and rows["plain"][3] == "1.00"
