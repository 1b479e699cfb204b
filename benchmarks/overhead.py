"""sdkit's overhead over a plain diffusers call, and the cost of switching modes.

1. Overhead: `engine.txt2img(...)` against the plain diffusers pipeline call on the same
   components (same scheduler, seed and parameters), alternating which goes first, for
   `--pairs` pairs; prints the median time ratio sdkit / plain (target <= 1.02).
2. Switching: txt2img -> img2img -> inpaint on one engine; prints the extra time of the
   first call in each new mode over a warm call of that mode, and the resident-memory
   growth (target: no reload, <= 5 %).

Prints numbers; never fails. Run: `python benchmarks/overhead.py [--model SPEC]`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="Euler")
    args = ap.parse_args()

    import sdkit
    from sdkit.schedulers import make_scheduler

    engine = sdkit.load(args.model, device=args.device)
    w, h = engine.defaults["width"], engine.defaults["height"]
    prompt = "a red circle on a blue background"
    print(
        f"model {engine.model.name} ({engine.family}) on {engine.device} {engine.dtype}, {w}x{h}, "
        f"{args.steps} steps, {args.scheduler}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )

    pipe = engine.pipeline("txt2img")
    scheduler = make_scheduler(args.scheduler, engine._scheduler_config)

    def plain(seed: int) -> Image.Image:
        pipe.scheduler = scheduler
        return pipe(
            prompt,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            width=w,
            height=h,
            generator=[torch.Generator("cpu").manual_seed(seed)],
        ).images[0]

    def ours(seed: int) -> Image.Image:
        return engine.txt2img(
            prompt,
            seed=seed,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            width=w,
            height=h,
            scheduler=args.scheduler,
            progress=False,
        )[0]

    a, b = ours(1), plain(1)  # warm-up, and the outputs must agree
    same = np.array_equal(np.asarray(a), np.asarray(b))
    ratios = []
    for i in range(args.pairs):
        times = {}
        for name in ("plain", "sdkit") if i % 2 == 0 else ("sdkit", "plain"):
            fn = plain if name == "plain" else ours
            gc.collect()
            t0 = time.perf_counter()
            fn(100 + i)
            times[name] = time.perf_counter() - t0
        ratios.append(times["sdkit"] / times["plain"])
        print(
            f"  pair {i + 1:2d}: plain {times['plain'] * 1000:7.1f} ms  sdkit {times['sdkit'] * 1000:7.1f} ms  "
            f"ratio {ratios[-1]:.3f}"
        )
    print(
        f"overhead: median ratio sdkit/plain = {statistics.median(ratios):.3f} over {len(ratios)} pairs "
        f"(target <= 1.02); identical output: {same}"
    )

    # Mode switching on a fresh engine (no from_pipe pipelines built yet).
    sdkit.api.unload_all()
    pipe = engine = None
    gc.collect()
    engine = sdkit.load(args.model, device=args.device)
    image = a.convert("RGB")
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
    calls = {
        "txt2img": lambda: engine.txt2img(
            prompt, seed=1, num_inference_steps=args.steps, progress=False
        ),
        "img2img": lambda: engine.img2img(
            image, prompt, seed=1, num_inference_steps=args.steps, progress=False
        ),
        "inpaint": lambda: engine.inpaint(
            image, mask, prompt, seed=1, num_inference_steps=args.steps, progress=False
        ),
    }
    calls["txt2img"]()
    gc.collect()
    rss0 = rss_mib()
    for mode, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
        gc.collect()
        print(
            f"  {mode:8s}: first call {first * 1000:7.1f} ms, warm {warm * 1000:7.1f} ms, "
            f"switch cost {(first - warm) * 1000:+7.1f} ms, RSS {rss_mib():.0f} MiB"
        )
    rss1 = rss_mib()
    t2i, i2i, inp = (engine.pipeline(m) for m in ("txt2img", "img2img", "inpaint"))
    shared = t2i.unet is i2i.unet is inp.unet and t2i.vae is i2i.vae is inp.vae
    print(
        f"switching: RSS {rss0:.0f} -> {rss1:.0f} MiB ({(rss1 / rss0 - 1) * 100:+.1f} %, target <= 5 %); "
        f"components shared: {shared}"
    )


if __name__ == "__main__":
    main()
