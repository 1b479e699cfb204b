"""ControlNet step overhead: the time of one denoising step with a control unit over one
without, on the embedded model (or `--model SPEC`).

Each job is timed at `--steps` and at twice as many steps (median of `--rounds`); the step
time is the slope between the two, so loading, the text encoder, the VAE and building the
ControlNet pipeline (`from_pipe`) drop out. Prints the plain and the controlled step time,
their ratio, and what building the ControlNet pipeline (`from_pipe`) would cost a job if
sdkit did not keep it per engine. The control
model is `--control NAME` from the engine's control folders, else a `ControlNetModel.from_unet`
copy of the model's UNet (the same compute as a trained one). Prints numbers; never fails.
Run: `python benchmarks/control.py`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def untrained_control(engine, folder: Path) -> str:
    """A ControlNet copied from the engine's UNet, its conditioning downsampled like the VAE."""
    from diffusers import ControlNetModel

    n = max(1, int(engine.vae_factor).bit_length() - 1)  # stride-2 convolutions
    channels = (16, 32, 96, 256)[: n + 1] if n <= 3 else (16,) * (n + 1)
    cn = ControlNetModel.from_unet(
        engine.model.pipe.unet, conditioning_embedding_out_channels=channels
    )
    cn.save_pretrained(folder / "bench-control")
    return "bench-control"


def build_pipeline(engine, name: str) -> None:
    """The pipeline's ControlNet twin, built afresh (sdkit caches it: this is what it saves)."""
    import diffusers

    from sdkit import control

    model = control.load_model(engine, name)  # cached after the warm-up
    base = engine.pipeline("txt2img")
    from sdkit.models import quiet_loading

    cls = getattr(diffusers, control._CONTROL_CLASS[type(base).__name__])
    with quiet_loading():
        cls.from_pipe(base, controlnet=model, dtype=engine.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--control", default=None, help="a control model name (default: untrained)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=None, help="width = height (default: model's)")
    args = ap.parse_args()

    from PIL import Image, ImageDraw

    import sdkit

    with tempfile.TemporaryDirectory() as tmp:
        engine = sdkit.load(args.model, device=args.device, control_dirs=[tmp])
        try:
            name = args.control or untrained_control(engine, Path(tmp))
            size = args.size or engine.defaults["width"]
            scribble = Image.new("RGB", (size, size))
            ImageDraw.Draw(scribble).ellipse(
                (size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline="white", width=3
            )
            unit = {"model": name, "image": scribble}

            def job(steps: int, control: list) -> None:
                engine.txt2img(
                    "a red circle on a blue background",
                    seed=1,
                    num_inference_steps=steps,
                    width=size,
                    height=size,
                    control=control,
                    progress=False,
                )

            job(2, [unit])  # warm-up: loads the ControlNet, first calls
            job(2, [])
            s1, s2 = args.steps, 2 * args.steps
            t = {
                (c, s): median_time(lambda c=c, s=s: job(s, [unit] if c else []), args.rounds)
                for c in (False, True)
                for s in (s1, s2)
            }
            fixed = median_time(lambda: build_pipeline(engine, name), args.rounds)
        finally:
            engine.close()
    plain = (t[False, s2] - t[False, s1]) / (s2 - s1)
    ctrl = (t[True, s2] - t[True, s1]) / (s2 - s1)
    print(f"model: {engine.model.name} ({engine.family}) on {engine.device}, {size}x{size}")
    print(f"control model: {name}")
    print(f"step, plain:        {plain * 1000:8.1f} ms")
    print(f"step, with control: {ctrl * 1000:8.1f} ms")
    print(f"ratio (control / plain step): {ctrl / plain:.2f}")
    print(f"from_pipe (ControlNet pipeline), saved by the cache: {fixed * 1000:.1f} ms")


if __name__ == "__main__":
    main()
