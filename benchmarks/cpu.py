"""CPU benchmark: which speed options help on this CPU?

Times, on the embedded model (``sdkit/embedded/model``) and on the tiny SD 1.5 / SDXL
configs of ``benchmarks/gpu.py``:

* ``plain``          the diffusers pipeline as loaded (fp32, SDPA), the baseline;
* ``default``        after ``sdkit.fast.apply_speed_options(pipe, device="cpu", dtype=float32)``;
* ``no-channels-last`` default with the UNet and VAE left contiguous (NCHW);
* ``fused-qkv``      default + fused QKV projections (on by default on CUDA only);
* ``bf16-autocast``  default under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
* ``fast-regional``  default + ``compile="regional"`` (only with ``--compile``: minutes of C++).

Configurations alternate within each round; the ratio printed is the median over rounds
of (plain time / configuration time in the same round), so > 1 is faster; this shrugs
off the drift of a machine shared with other work. Both wall time and the process's CPU
time are shown: when another job holds the cores, CPU time is the steadier measure of
the work a configuration needs. Seconds per image are medians.

    nice -n 10 python benchmarks/cpu.py                 # embedded + tiny, 20 steps, 5 rounds
    nice -n 10 python benchmarks/cpu.py --model PATH    # another diffusers folder
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402  (benchmarks/gpu.py: tiny configs, pipeline building)

from sdkit import fast  # noqa: E402

EMBEDDED = ROOT / "sdkit" / "embedded" / "model"


def load_folder(path: Path) -> tuple[Any, int]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        path, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe, size


def variants(pipe: Any, compile_mode: bool) -> list[tuple[str, Any, Any]]:
    """(name, pipeline, context factory) for each configuration, on copies of the same weights."""

    def fresh(**opts: Any) -> Any:
        p = copy.deepcopy(pipe)
        fast.apply_speed_options(p, device="cpu", dtype=torch.float32, **opts)
        return p

    out = [
        ("plain", pipe, contextlib.nullcontext),
        ("default", fresh(), contextlib.nullcontext),
        ("no-channels-last", fresh(channels_last=False), contextlib.nullcontext),
        ("fused-qkv", fresh(fused_qkv=True), contextlib.nullcontext),
        ("bf16-autocast", fresh(), lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    ]
    if compile_mode:
        out.append(("fast-regional", fresh(compile="regional"), contextlib.nullcontext))
    return out


def time_one_image(pipe: Any, ctx: Any, steps: int, size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one image."""
    g = torch.Generator().manual_seed(0)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode(), ctx():
        pipe(
            "a red circle on a blue background",
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=7.5,
            generator=g,
            output_type="np",
        )
    return time.perf_counter() - t0, time.process_time() - c0


def time_unet(pipe: Any, ctx: Any, steps: int, size: int) -> tuple[float, float]:
    """(wall, CPU seconds) of `steps` UNet calls as one CFG step makes them (batch 2)."""
    g = torch.Generator().manual_seed(0)
    side = size // pipe.vae_scale_factor
    sample = torch.randn(2, pipe.unet.config.in_channels, side, side, generator=g)
    cond = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode(), ctx():
        for i in range(steps):
            pipe.unet(
                sample, torch.tensor(999 - 40 * i), encoder_hidden_states=cond, return_dict=False
            )
    return time.perf_counter() - t0, time.process_time() - c0


def bench(title: str, pipe: Any, size: int, args: argparse.Namespace) -> dict[str, float]:
    configs = variants(pipe, args.compile)
    time_image = time_unet if args.unet_only else time_one_image
    for _name, p, ctx in configs:  # warm-up (and compile)
        time_image(p, ctx, 2, size)
    wall: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]  # alternate, in pairs around plain
        for name, p, ctx in order:
            w, c = time_image(p, ctx, args.steps, size)
            wall[name].append(w)
            cpu[name].append(c)
    what = "UNet calls (batch 2, as CFG)" if args.unet_only else "steps per image, CFG 7.5"
    unit = f"{args.steps} calls" if args.unet_only else "image"
    print(f"\n## {title} {size}x{size}, {args.steps} {what}, {args.rounds} rounds")
    print(f"| config | wall s/{unit} | x plain (wall) | CPU s/{unit} | x plain (CPU time) |")
    print("|---|---|---|---|---|")
    ratios = {}
    for name in wall:
        rw = statistics.median(b / t for b, t in zip(wall["plain"], wall[name], strict=True))
        rc = statistics.median(b / t for b, t in zip(cpu["plain"], cpu[name], strict=True))
        ratios[name] = rc
        print(
            f"| {name} | {statistics.median(wall[name]):.3f} | {rw:.2f} "
            f"| {statistics.median(cpu[name]):.3f} | {rc:.2f} |"
        )
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"diffusers folder (default {EMBEDDED.relative_to(ROOT)})",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny SD 1.5 / SDXL configs")
    p.add_argument(
        "--unet-only", action="store_true", help="time UNet calls only (the denoising cost)"
    )
    p.add_argument(
        "--compile", action="store_true", help="also time compile='regional' (slow to build)"
    )
    args = p.parse_args(argv)
    model = args.model or EMBEDDED
    if not (model / "model_index.json").exists():
        p.error(f"--model: no diffusers pipeline at {model} (model_index.json missing)")

    import diffusers

    load = os.getloadavg()
    print(
        f"# benchmarks/cpu.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"date {time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
        f"load average {load[0]:.1f}"
    )
    pipe, size = load_folder(model)
    bench(f"embedded model ({model.name})", pipe, size, args)
    if not args.no_tiny:
        with tempfile.TemporaryDirectory() as tmp:
            tok = Path(tmp) / "tok"
            gpu.build_tokenizer("a red blue circle on background".split(), tok)
            for key in ("sd15", "sdxl"):
                arch = gpu.TINY[key]
                parts = gpu.build_components(arch, torch.device("cpu"), torch.float32, tok)
                bench(
                    arch.name, gpu.make_pipeline(arch, parts, copy_unet_vae=False), arch.size, args
                )
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
