"""Score the embedded scribble ControlNet: `python -m benchmarks.control_eval`.

Held-out scenes (`scribbles.heldout`, a seed no training run draws from) are drawn as
scribbles and given, with the scene's full caption, to diffusers' own
`StableDiffusionControlNetPipeline` built from the embedded model's components and the
shipped ControlNet (sdkit's defaults: Euler a, 12 steps, guidance 5). The project's classifier
finds the drawn shape's blob; a case counts when its centre is within 3 px of the scribble's
and its IoU with the scribble's filled shape is >= 0.6 (`scribbles.Placement.ok`). The same
prompts and seeds without control give the baseline. Prints; never fails.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.adapters_eval import load_pipeline
from sdkit.embedded import scribbles
from sdkit.embedded.train_control import CONTROL_DIR

SEED0 = 70_000  # sampling seeds; the scenes come from scribbles.HELDOUT_SEED


def control_pipeline(pipe, folder: Path = CONTROL_DIR):
    """The embedded pipeline's own components plus the ControlNet, in float32."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    net = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32)
    cp = StableDiffusionControlNetPipeline(**pipe.components, controlnet=net)
    cp.set_progress_bar_config(disable=True)
    cp.sdkit_defaults = pipe.sdkit_defaults
    return cp


def images(pipe, cases, scale: float | None = 1.0, batch: int = 8) -> list:
    """One image per (scene, scribble, caption) case, seed SEED0 + i; `scale` None: no control."""
    d = pipe.sdkit_defaults
    out = []
    for i in range(0, len(cases), batch):
        chunk = cases[i : i + batch]
        kwargs = {}
        if scale is not None:
            kwargs = {"image": [c[1] for c in chunk], "controlnet_conditioning_scale": scale}
        out += pipe(
            prompt=[c[2] for c in chunk],
            generator=[torch.Generator().manual_seed(SEED0 + i + k) for k in range(len(chunk))],
            num_inference_steps=d["num_inference_steps"],
            guidance_scale=d["guidance_scale"],
            width=d["width"],
            height=d["height"],
            **kwargs,
        ).images
    return out


def score(results, cases) -> dict:
    placed = [scribbles.placement(im, c[0]) for im, c in zip(results, cases, strict=True)]
    centres = np.array([p.centre_px for p in placed])
    return {
        "placement_rate": float(np.mean([p.ok for p in placed])),
        "centre_within_3px": float(np.mean(centres <= scribbles.MAX_CENTRE_PX)),
        "iou_at_least_0.6": float(np.mean([p.iou >= scribbles.MIN_IOU for p in placed])),
        "median_centre_px": float(np.median(centres)),
        "mean_iou": float(np.mean([p.iou for p in placed])),
        "n": len(placed),
    }


def cases_for(n: int, prompt: str) -> list:
    """Held-out cases with the full caption, no shape word, or an empty prompt."""
    out = []
    for i in range(n):
        scene, image, caption = scribbles.heldout(i)
        if prompt == "noshape":
            caption = f"a {scene.colour} on a {scene.background} background"
        elif prompt == "empty":
            caption = ""
        out.append((scene, image, caption))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=100, help="held-out cases")
    p.add_argument("--control", type=Path, default=CONTROL_DIR)
    p.add_argument("--prompts", nargs="+", default=["full"], choices=["full", "noshape", "empty"])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", type=Path, help="write a grid of scribbles and results here (png)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plain = load_pipeline()
    cp = control_pipeline(plain, args.control)
    report = {}
    for prompt in args.prompts:
        cases = cases_for(args.n, prompt)
        for scale in args.scales:
            t = time.perf_counter()
            out = images(cp, cases, scale)
            report[f"{prompt} control {scale}"] = score(out, cases) | {
                "s_per_image": round((time.perf_counter() - t) / len(cases), 2)
            }
            print(json.dumps({f"{prompt} control {scale}": report[f"{prompt} control {scale}"]}))
            if args.save:
                save_grid(cases, out, args.save.with_name(f"{args.save.stem}_{prompt}.png"))
        if not args.no_baseline:
            out = images(plain, cases, None)
            report[f"{prompt} no control"] = score(out, cases)
            print(json.dumps({f"{prompt} no control": report[f"{prompt} no control"]}))
    print(json.dumps(report, indent=2))


def save_grid(cases, results, path: Path, cols: int = 16) -> None:
    from PIL import Image

    pairs = [im for c, r in zip(cases, results, strict=True) for im in (c[1], r)][: 4 * cols]
    grid = Image.new("RGB", (64 * cols, 64 * ((len(pairs) + cols - 1) // cols)))
    for k, im in enumerate(pairs):
        grid.paste(im, ((k % cols) * 64, (k // cols) * 64))
    grid.save(path)


if __name__ == "__main__":
    main()
