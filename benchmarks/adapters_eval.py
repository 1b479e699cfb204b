"""Score the embedded model's example adapters: `python benchmarks/adapters_eval.py`.

Loads the shipped LoRA and embedding through diffusers' own loaders (`load_lora_weights`,
`set_adapters`, `load_textual_inversion`) into the embedded `StableDiffusionPipeline`, and
judges every image with `sdkit.embedded.shapes.classify`, the new shape and colour added to
its candidates. Seeds here are never used in training (training draws no samples), and the
colour pairs cycle through all of them. Prints; never fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from sdkit.embedded import shapes
from sdkit.embedded.train import MODEL_DIR
from sdkit.embedded.train_adapters import (
    ADAPTERS_DIR,
    LORA_NAME,
    LORA_WORD,
    NEW_COLOUR,
    NEW_SHAPE,
    TI_NAME,
)

ALL_SHAPES = shapes.SHAPES + shapes.EXTRA_SHAPES
ALL_COLOURS = tuple(shapes.COLOURS) + tuple(shapes.EXTRA_COLOURS)
SEED0 = 50_000


def load_pipeline(model_dir: Path = MODEL_DIR):
    """The embedded model as plain diffusers, with sdkit's default sampler (Euler a)."""
    from diffusers import StableDiffusionPipeline

    from sdkit.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    defaults = json.loads((model_dir / "sdkit.json").read_text())["defaults"]
    pipe.scheduler = make_scheduler(defaults["scheduler"], pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.sdkit_defaults = defaults
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], batch: int = 16) -> list:
    d = pipe.sdkit_defaults
    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = list(prompts[i : i + batch]), seeds[i : i + batch]
        out += pipe(
            prompt=ps,
            generator=[torch.Generator().manual_seed(s) for s in ss],
            num_inference_steps=d["num_inference_steps"],
            guidance_scale=d["guidance_scale"],
            width=d["width"],
            height=d["height"],
        ).images
    return out


def colour_pairs(n: int, seed: int = 3) -> list[tuple[str, str]]:
    pairs = [(a, b) for a, b in itertools.permutations(shapes.COLOURS, 2)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[order[i % len(pairs)]] for i in range(n)]


def shape_cases(n: int) -> list[tuple[str, int]]:
    """`n` (prompt, seed) pairs asking for the new shape."""
    return [
        (f"a {fg} {LORA_WORD} on a {bg} background", SEED0 + i)
        for i, (fg, bg) in enumerate(colour_pairs(n))
    ]


def colour_cases(n: int, word: str = TI_NAME) -> list[tuple[str, int]]:
    """`n` (prompt, seed) pairs asking for a shape in the new colour, named by `word`."""
    backgrounds = list(shapes.COLOURS)
    return [
        (f"a {word} {shapes.SHAPES[i % 4]} on a {backgrounds[(i // 4) % 8]} background", SEED0 + i)
        for i in range(n)
    ]


def ordinary_cases(n: int) -> list[tuple[tuple[str, str, str], int]]:
    """`n` ((colour, shape, background), seed) pairs the base model knows."""
    return [
        ((fg, shapes.SHAPES[i % 4], bg), SEED0 + 1000 + i)
        for i, (fg, bg) in enumerate(colour_pairs(n, seed=9))
    ]


def judge(image):
    return shapes.classify(image, shapes=ALL_SHAPES, colours=ALL_COLOURS)


def new_shape_rate(pipe, n: int) -> float:
    prompts, seeds = zip(*shape_cases(n), strict=True)
    return float(np.mean([judge(im).shape == NEW_SHAPE for im in generate(pipe, prompts, seeds)]))


def new_colour_rate(pipe, n: int, word: str = TI_NAME) -> float:
    prompts, seeds = zip(*colour_cases(n, word), strict=True)
    return float(np.mean([judge(im).colour == NEW_COLOUR for im in generate(pipe, prompts, seeds)]))


def ordinary_scores(pipe, n: int) -> dict:
    """The base model's own prompts, judged as `embedded_eval.py` judges them."""
    cases = ordinary_cases(n)
    prompts = [f"a {fg} {s} on a {bg} background" for (fg, s, bg), _ in cases]
    images = generate(pipe, prompts, [seed for _, seed in cases])
    js = [shapes.classify(im) for im in images]
    right = [
        (j.colour == fg, j.background == bg, j.shape == s)
        for j, ((fg, s, bg), _) in zip(js, cases, strict=True)
    ]
    arr = np.array(right, dtype=float)
    return {
        "colour": arr[:, 0].mean(),
        "background": arr[:, 1].mean(),
        "shape": arr[:, 2].mean(),
        "all": arr.all(1).mean(),
        "images": [np.asarray(im) for im in images],
    }


def identical(a: dict, b: dict) -> float:
    """The share of images two `ordinary_scores` runs drew bit for bit alike."""
    pairs = zip(a["images"], b["images"], strict=True)
    return float(np.mean([np.array_equal(x, y) for x, y in pairs]))


def load_lora(pipe, path: Path = ADAPTERS_DIR / f"{LORA_NAME}.safetensors") -> None:
    pipe.load_lora_weights(str(path), adapter_name=LORA_NAME)


def load_embedding(pipe, path: Path = ADAPTERS_DIR / f"{TI_NAME}.pt") -> None:
    pipe.load_textual_inversion(str(path), token=TI_NAME)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=48, help="images per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["lora", "ti"])
    p.add_argument("--lora", type=Path, default=None, help="another LoRA file (a checkpoint)")
    p.add_argument("--quick", action="store_true", help="LoRA: only the cross rates at --weights")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.5], help="with --quick")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows: dict[str, float] = {}

    def show(name: str, value: float) -> None:
        rows[name] = round(value, 3)
        print(f"{name:58s} {value:.3f}   ({time.time() - t0:.0f} s)", flush=True)

    if "lora" not in args.skip and args.quick:
        pipe = load_pipeline()
        load_lora(pipe, args.lora or ADAPTERS_DIR / f"{LORA_NAME}.safetensors")
        for w in args.weights:
            pipe.set_adapters([LORA_NAME], [w])
            show(f"{NEW_SHAPE} rate, LoRA weight {w}", new_shape_rate(pipe, args.n))
    elif "lora" not in args.skip:
        pipe = load_pipeline()
        base = ordinary_scores(pipe, args.n)
        show("ordinary prompts, all three right, no LoRA", base["all"])
        show(f"{NEW_SHAPE} rate, no LoRA (target <= 0.05)", new_shape_rate(pipe, args.n))
        load_lora(pipe, args.lora or ADAPTERS_DIR / f"{LORA_NAME}.safetensors")
        for w, note in ((1.0, " (target >= 0.80)"), (0.5, " (between)"), (0.0, "")):
            pipe.set_adapters([LORA_NAME], [w])
            show(f"{NEW_SHAPE} rate, LoRA weight {w}{note}", new_shape_rate(pipe, args.n))
        zero = ordinary_scores(pipe, args.n)
        same = identical(zero, base)
        show("ordinary prompts, all three right, LoRA weight 0", zero["all"])
        show("  images identical to no LoRA at weight 0", float(same))
        pipe.set_adapters([LORA_NAME], [1.0])
        show(
            "ordinary prompts, all three right, LoRA weight 1", ordinary_scores(pipe, args.n)["all"]
        )
        pipe.unload_lora_weights()
        after = ordinary_scores(pipe, args.n)
        same = identical(after, base)
        show("  images identical to no LoRA after unload_lora_weights", float(same))
    if "ti" not in args.skip:
        pipe = load_pipeline()
        show(f"{NEW_COLOUR} rate, '{TI_NAME}' without the embedding", new_colour_rate(pipe, args.n))
        show(
            f"{NEW_COLOUR} rate, plain word '{NEW_COLOUR}'",
            new_colour_rate(pipe, args.n, NEW_COLOUR),
        )
        load_embedding(pipe)
        show(
            f"{NEW_COLOUR} rate, '{TI_NAME}' with the embedding (target >= 0.80)",
            new_colour_rate(pipe, args.n),
        )
        show(
            "ordinary prompts, all three right, embedding loaded",
            ordinary_scores(pipe, args.n)["all"],
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
