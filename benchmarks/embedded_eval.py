"""Measure how well the embedded model follows its prompts: `python benchmarks/embedded_eval.py`.

Every score comes from the pixel-statistics classifier in `sdkit.embedded.shapes`, which
is first checked against the training renderer's own clean images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterable

import numpy as np
from PIL import Image

import sdkit
from sdkit.embedded import shapes


def classifier_accuracy(n: int = 500, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    right = 0
    for _ in range(n):
        scene = shapes.random_scene(rng)
        j = shapes.classify(shapes.render(scene))
        right += (j.colour, j.background, j.shape) == (scene.colour, scene.background, scene.shape)
    return right / n


def vae_round_trip_accuracy(engine, n: int = 200, seed: int = 5) -> dict:
    """The classifier on clean renders sent through the VAE and back: the ceiling that the
    autoencoder alone puts on txt2img scores, whatever the UNet does."""
    import torch

    vae = engine.model.pipe.vae
    rng = np.random.default_rng(seed)
    scenes = [shapes.random_scene(rng) for _ in range(n)]
    x = np.stack([np.asarray(shapes.render(s), dtype=np.float32) for s in scenes]) / 127.5 - 1
    x = torch.from_numpy(x).permute(0, 3, 1, 2).to(vae.device, vae.dtype)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).float().cpu()
    psnr = 10 * np.log10(4 / float(((rec - x.float().cpu()) ** 2).mean()))
    arrays = ((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    tallies = {"colour": 0, "background": 0, "shape": 0}
    for scene, arr in zip(scenes, arrays, strict=True):
        j = shapes.classify(Image.fromarray(arr))
        tallies["colour"] += j.colour == scene.colour
        tallies["background"] += j.background == scene.background
        tallies["shape"] += j.shape == scene.shape
    return {k: v / n for k, v in tallies.items()} | {"psnr_db": round(float(psnr), 2), "n": n}


def prompt_grid(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """A balanced, deterministic sample of (colour, shape, background) triples."""
    combos = [
        (c, s, b)
        for c, s, b in itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.COLOURS)
        if c != b
    ]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    return [combos[i] for i in order[:count]]


def score_txt2img(
    engine, triples: Iterable[tuple[str, str, str]], seeds: list[int], **fields
) -> dict:
    tallies = {"colour": 0, "background": 0, "shape": 0, "all": 0, "n": 0}
    for colour, shape, bg in triples:
        prompt = f"a {colour} {shape} on a {bg} background"
        for seed in seeds:
            result = engine.generate(
                sdkit.Request(prompt=prompt, seed=seed, **fields), progress=False
            )
            j = shapes.classify(result[0])
            ok = (j.colour == colour, j.background == bg, j.shape == shape)
            tallies["colour"] += ok[0]
            tallies["background"] += ok[1]
            tallies["shape"] += ok[2]
            tallies["all"] += all(ok)
            tallies["n"] += 1
    n = tallies.pop("n")
    return {k: v / n for k, v in tallies.items()} | {"n": n}


def score_binding(engine, pairs: int = 8, seed: int = 100) -> dict:
    """Does the text encoder bind each colour to its noun? Each colour pair is asked both ways
    round ("a red circle on a blue background" and "a blue circle on a red background")."""
    rng = np.random.default_rng(4)
    names = list(shapes.COLOURS)
    both, n = 0, 0
    for k in range(pairs):
        a, b = rng.choice(len(names), size=2, replace=False)
        shape = shapes.SHAPES[k % len(shapes.SHAPES)]
        right = 0
        for fg, bg in ((names[a], names[b]), (names[b], names[a])):
            req = sdkit.Request(prompt=f"a {fg} {shape} on a {bg} background", seed=seed + k)
            j = shapes.classify(engine.generate(req, progress=False)[0])
            right += (j.colour, j.background) == (fg, bg)
        both += right == 2
        n += 1
    return {"both_orders_right": both / n, "pairs": n}


def foreground_mask(image: Image.Image, colour: str) -> np.ndarray:
    labels = shapes.nearest_colours(np.asarray(image.convert("RGB")))
    return labels == list(shapes.COLOURS).index(colour)


def score_img2img(engine, n: int = 16, strength: float = 0.5) -> dict:
    """img2img keeps the layout: the shape stays where it was (IoU of shape masks)."""
    rng = np.random.default_rng(7)
    ious = []
    for i in range(n):
        scene = shapes.random_scene(rng)
        source = shapes.render(scene)
        out = engine.generate(
            sdkit.Request(
                mode="img2img",
                prompt=f"a {scene.colour} {scene.shape} on a {scene.background} background",
                image=source,
                strength=strength,
                seed=i,
            ),
            progress=False,
        )[0]
        a, b = foreground_mask(source, scene.colour), foreground_mask(out, scene.colour)
        ious.append((a & b).sum() / max(1, (a | b).sum()))
    return {
        "mean_iou": float(np.mean(ious)),
        "kept_layout": float(np.mean(np.array(ious) > 0.5)),
        "n": n,
    }


def score_inpaint(engine, n: int = 16) -> dict:
    """Repaint a box around the shape in a new colour; nothing outside the mask may change."""
    rng = np.random.default_rng(11)
    changed_outside, followed = 0, 0
    for i in range(n):
        scene = shapes.random_scene(rng)
        source = shapes.render(scene)
        new = [c for c in shapes.COLOURS if c not in (scene.colour, scene.background)][i % 6]
        mask = Image.new("L", source.size, 0)
        r = scene.radius + 3
        box = [int(scene.cx - r), int(scene.cy - r), int(scene.cx + r), int(scene.cy + r)]
        mask.paste(255, box)
        out = engine.generate(
            sdkit.Request(
                mode="inpaint",
                prompt=f"a {new} {scene.shape} on a {scene.background} background",
                image=source,
                mask=mask,
                strength=1.0,
                mask_blur=0,
                seed=i,
            ),
            progress=False,
        )[0]
        outside = np.asarray(mask) == 0
        changed_outside += int((np.asarray(out)[outside] != np.asarray(source)[outside]).any())
        inside = np.asarray(out)[~outside].reshape(-1, 3)
        labels = shapes.nearest_colours(inside[None])[0]
        counts = np.bincount(
            labels[labels != list(shapes.COLOURS).index(scene.background)],
            minlength=len(shapes.COLOURS),
        )
        followed += list(shapes.COLOURS)[int(counts.argmax())] == new
    return {
        "images_with_changes_outside_mask": changed_outside,
        "new_colour_inside": followed / n,
        "n": n,
    }


def score_unconditional(engine, n: int = 16) -> dict:
    result = engine.generate(
        sdkit.Request(mode="unconditional", num_images=n, seed=0), progress=False
    )
    classes = {tuple(shapes.classify(im).__dict__.values()) for im in result}
    colours = {c[0] for c in classes}
    shape_set = {c[2] for c in classes}
    return {
        "distinct_classes": len(classes),
        "distinct_colours": len(colours),
        "distinct_shapes": len(shape_set),
        "n": n,
    }


def time_one_image(engine, repeats: int = 5) -> float:
    req = sdkit.Request(prompt="a red circle on a blue background", seed=1)
    engine.generate(req, progress=False)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.generate(req, progress=False)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def sweep(engine, triples: list, seeds: list[int]) -> None:
    for scheduler in ("DPM++ 2M", "DPM++ 2M Karras", "Euler a", "Euler", "DDIM", "UniPC"):
        for guidance in (3.0, 5.0, 7.5):
            t = time.perf_counter()
            s = score_txt2img(engine, triples, seeds, scheduler=scheduler, guidance_scale=guidance)
            print(
                f"{scheduler:16s} guidance {guidance:4.1f}: colour {s['colour']:.2f} "
                f"background {s['background']:.2f} shape {s['shape']:.2f} all {s['all']:.2f} "
                f"({(time.perf_counter() - t) / s['n']:.2f} s/image)",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a small grid, for a smoke run")
    p.add_argument("--json", help="also write the scores to this file")
    p.add_argument("--model", help="a diffusers folder to judge instead of the shipped model")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="only compare samplers and guidance scales (how the model's defaults were chosen)",
    )
    args = p.parse_args()
    if args.quick:
        args.prompts, args.seeds = 8, 1

    engine = sdkit.load(args.model)
    if args.sweep:
        sweep(engine, prompt_grid(args.prompts), list(range(100, 100 + args.seeds)))
        return
    scores: dict = {"defaults": engine.defaults}
    scores["classifier_on_clean_renders"] = classifier_accuracy()
    print(f"classifier on clean renders: {scores['classifier_on_clean_renders']:.3f}", flush=True)
    scores["vae_round_trip"] = vae_round_trip_accuracy(engine)
    print(f"classifier on VAE round trips (ceiling): {scores['vae_round_trip']}", flush=True)
    triples = prompt_grid(args.prompts)
    seeds = list(range(100, 100 + args.seeds))
    t = time.perf_counter()
    scores["txt2img"] = score_txt2img(engine, triples, seeds)
    print(f"txt2img at defaults: {scores['txt2img']} ({time.perf_counter() - t:.0f} s)", flush=True)
    scores["txt2img_guidance_1"] = score_txt2img(engine, triples, seeds, guidance_scale=1.0)
    print(f"txt2img at guidance 1: {scores['txt2img_guidance_1']}", flush=True)
    scores["binding"] = score_binding(engine)
    print(f"colour binding: {scores['binding']}", flush=True)
    scores["img2img"] = score_img2img(engine)
    print(f"img2img strength 0.5: {scores['img2img']}", flush=True)
    scores["inpaint"] = score_inpaint(engine)
    print(f"inpaint: {scores['inpaint']}", flush=True)
    scores["unconditional"] = score_unconditional(engine)
    print(f"unconditional: {scores['unconditional']}", flush=True)
    scores["seconds_per_image_at_defaults"] = time_one_image(engine)
    print(
        f"one image at the default steps: {scores['seconds_per_image_at_defaults']:.2f} s",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=2)


if __name__ == "__main__":
    main()
