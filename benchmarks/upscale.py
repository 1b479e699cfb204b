"""Tiled upscale: time per output megapixel and peak RSS as the input size doubles.

Each size runs in a fresh Python process (peak RSS is a per-process high-water mark), on the
embedded model by default, on the CPU. Printed as ratios to the smallest size: time per
megapixel should stay about flat (time linear in pixels: the work is tiles x steps; the
tile count per megapixel varies a little with the layout, so s/tile is the cleaner unit),
and peak RSS should stay about flat (one tile in flight; only a float accumulator grows).

    python benchmarks/upscale.py                       # 64, 128, 256 px inputs, x4
    python benchmarks/upscale.py --sizes 128 256 --factor 4 --steps 4 --strength 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(size: int, factor: float, steps: int, strength: float, overlap: int, model: str) -> dict:
    """Run in the measuring process: load, upscale one `size` px picture, report."""
    import resource

    from PIL import Image

    import sdkit
    from sdkit import tiled_upscale

    engine = sdkit.load(None if model == "embedded" else model, device="cpu")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = _picture(size)
    # Warm-up (builds the img2img pipeline, first-call costs): not part of the measurement.
    engine.upscale(image.resize((16, 16)), "", factor=1, strength=1, num_inference_steps=1,
                   progress=False)  # fmt: skip
    start = time.perf_counter()
    result = engine.upscale(
        image,
        "a red circle on a blue background",
        factor=factor,
        strength=strength,
        num_inference_steps=steps,
        tile_overlap=overlap,
        seed=1,
        progress=False,
    )
    seconds = time.perf_counter() - start
    w, h = result[0].size
    assert isinstance(result[0], Image.Image)
    tiles = tiled_upscale.layout(w, h, *tiled_upscale.tile_size(engine, w, h), overlap)
    return {
        "size": size,
        "output": [w, h],
        "tiles": len(tiles),
        "seconds": seconds,
        "megapixels": w * h / 1e6,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_after_load_kib": rss_loaded,
    }


def _picture(size: int):
    """A circle on a background: something with edges and flat areas."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (40, 60, 200))
    ImageDraw.Draw(image).ellipse(
        (size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 30)
    )
    return image


def measure(
    size: int,
    *,
    factor: float = 4,
    steps: int = 4,
    strength: float = 0.25,
    overlap: int = 8,
    model: str = "embedded",
    timeout: float = 1800,
) -> dict:
    """One size in a fresh process (so its peak RSS is its own)."""
    cmd = [
        sys.executable, __file__, "--child", str(size), "--factor", str(factor),
        "--steps", str(steps), "--strength", str(strength), "--overlap", str(overlap),
        "--model", model,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--factor", type=float, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--strength", type=float, default=0.25)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--model", default="embedded")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.child, a.factor, a.steps, a.strength, a.overlap, a.model)))
        return 0
    rows = [
        measure(s, factor=a.factor, steps=a.steps, strength=a.strength, overlap=a.overlap,
                model=a.model)
        for s in a.sizes
    ]  # fmt: skip
    base = rows[0]
    per_mpx0 = base["seconds"] / base["megapixels"]
    print(f"tiled upscale x{a.factor:g}, {a.steps} steps at strength {a.strength}, "
          f"overlap {a.overlap}, {a.model} on CPU")  # fmt: skip
    print(
        f"{'input':>6} {'output':>10} {'tiles':>6} {'s':>8} {'s/tile':>7} {'s/Mpx':>8} {'x':>6} "
        f"{'peak RSS MiB':>13} {'x':>6}"
    )
    for r in rows:
        per_mpx = r["seconds"] / r["megapixels"]
        print(
            f"{r['size']:>6} {r['output'][0]:>4}x{r['output'][1]:<5} {r['tiles']:>6} "
            f"{r['seconds']:>8.1f} {r['seconds'] / r['tiles']:>7.3f} {per_mpx:>8.1f} {per_mpx / per_mpx0:>6.2f} {r['peak_rss_kib'] / 1024:>13.0f} "
            f"{r['peak_rss_kib'] / base['peak_rss_kib']:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
