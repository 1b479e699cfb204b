"""GPU benchmark: plain diffusers vs sdkit default vs sdkit fast, on the real SD 1.5 and SDXL
architectures with random weights (no downloads: the configs below are the published ones,
written out).

Every model is built on the meta device and materialised on the target device
(`to_empty` + each layer's own `reset_parameters`), so an SDXL UNet never exists on the
host. In one process and on the same weights it times

* ``plain``   the diffusers pipeline as diffusers sets it up (fp16, SDPA), the baseline;
* ``default`` the same weights after `sdkit.fast.apply_speed_options(...)`;
* ``fast-<mode>`` the same with ``compile=<mode>`` (``--compile``; default cudagraphs),

alternating the configurations round by round, and prints it/s (denoising only), the
ratio to the baseline, seconds per N-step image (with VAE decode), peak GPU memory of
that configuration alone, warm-up time (compile, for the fast path) and host syncs per
step (CUDA only, from ``torch.cuda.set_sync_debug_mode``).

    python benchmarks/gpu.py                     # SD 1.5 at 512x512 and SDXL at 1024x1024
    python benchmarks/gpu.py --models sd15 --compile regional,cudagraphs
    python benchmarks/gpu.py --tiny              # same code, tiny configs, on the CPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdkit import fast  # noqa: E402
from sdkit.embedded.tokenizer import build_tokenizer  # noqa: E402

# ------------------------------------------------------------------ published configs

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=[
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)

# Tiny stand-ins with the same block types, for --tiny on the CPU.
TINY_UNET = dict(
    SD15_UNET,
    sample_size=8,
    block_out_channels=[32, 64, 64, 64],
    norm_num_groups=16,
    cross_attention_dim=32,
    attention_head_dim=4,
    layers_per_block=1,
)
TINY_VAE = dict(
    SD_VAE,
    block_out_channels=[16, 32, 32, 32],
    norm_num_groups=16,
    layers_per_block=1,
    sample_size=64,
)
TINY_CLIP = dict(
    CLIP_L,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
)
TINY_XL_UNET = dict(
    SDXL_UNET,
    sample_size=8,
    block_out_channels=[32, 64, 64],
    norm_num_groups=16,
    cross_attention_dim=64,
    attention_head_dim=[2, 4, 4],
    transformer_layers_per_block=[1, 1, 2],
    layers_per_block=1,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)
TINY_XL_VAE = dict(TINY_VAE, force_upcast=True)


@dataclass
class Arch:
    name: str
    unet: dict
    vae: dict
    text: list[dict]
    size: int
    xl: bool = False


ARCHS = {
    "sd15": Arch("SD 1.5", SD15_UNET, SD_VAE, [CLIP_L], 512),
    "sdxl": Arch("SDXL", SDXL_UNET, SDXL_VAE, [CLIP_L, CLIP_BIGG], 1024, xl=True),
}
TINY = {
    "sd15": Arch("tiny SD 1.5", TINY_UNET, TINY_VAE, [TINY_CLIP], 64),
    "sdxl": Arch("tiny SDXL", TINY_XL_UNET, TINY_XL_VAE, [TINY_CLIP, TINY_CLIP], 64, xl=True),
}

# ------------------------------------------------------------------------ building


@torch.no_grad()
def materialise(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """Allocate a meta-device module on `device` and give it fresh random weights."""
    module.to_empty(device=device)
    for p in module.parameters():
        p.fill_(float("nan"))
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset) and m is not module:
            reset()
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
        else:
            raise RuntimeError(f"materialise: no recipe for buffer {name!r}")
    for name, p in module.named_parameters():
        if torch.isnan(p).any():
            raise RuntimeError(f"materialise: parameter {name!r} was not initialised")
    return module.to(dtype=dtype).eval()


def build_components(
    arch: Arch, device: torch.device, dtype: torch.dtype, tokenizer_dir: Path
) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        texts = []
        for i, cfg in enumerate(arch.text):
            config = CLIPTextConfig(**cfg)
            cls = CLIPTextModelWithProjection if (arch.xl and i == 1) else CLIPTextModel
            texts.append(cls(config))
    parts: dict[str, Any] = {
        "unet": materialise(unet, device, dtype),
        "vae": materialise(vae, device, dtype),
        "text_encoder": materialise(texts[0], device, dtype),
        "tokenizer": tokenizer,
    }
    if arch.xl:
        parts["text_encoder_2"] = materialise(texts[1], device, dtype)
        parts["tokenizer_2"] = tokenizer
    return parts


def make_pipeline(arch: Arch, parts: dict, *, copy_unet_vae: bool) -> Any:
    """A pipeline on `parts`; the UNet and VAE are copied when a configuration will modify them."""
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    parts = dict(parts)
    if copy_unet_vae:
        parts["unet"] = copy.deepcopy(parts["unet"])
        parts["vae"] = copy.deepcopy(parts["vae"])
    if arch.xl:
        scheduler = EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(scheduler=scheduler, **parts)
    else:
        scheduler = PNDMScheduler(**SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False)
        pipe = StableDiffusionPipeline(
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(arch: Arch) -> dict[str, int]:
    """Parameter counts of the architecture, built on the meta device (checks the configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**arch.unet), "vae": AutoencoderKL(**arch.vae)}
        for i, cfg in enumerate(arch.text):
            cls = CLIPTextModelWithProjection if (arch.xl and i == 1) else CLIPTextModel
            models[f"text_encoder{'_2' if i else ''}"] = cls(CLIPTextConfig(**cfg))
    return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


# ------------------------------------------------------------------------- timing


@dataclass
class Config:
    name: str
    pipe: Any
    info: dict | None = None
    warmup_s: float = 0.0
    its: list[float] = field(default_factory=list)
    image_s: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    syncs_per_step: float | None = None
    weight_bytes: int = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: Config, arch: Arch, steps: int, size: int, output_type: str) -> float:
    g = torch.Generator("cpu").manual_seed(0)
    device = cfg.pipe.unet.device
    sync(device)
    t0 = time.perf_counter()
    cfg.pipe(
        "a red circle on a blue background",
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=size,
        width=size,
        generator=g,
        output_type=output_type,
    )
    sync(device)
    return time.perf_counter() - t0


def count_syncs(cfg: Config, arch: Arch, steps: int, size: int) -> float | None:
    """Host-device syncs per denoising step, as CUDA's sync debug mode reports them."""
    device = cfg.pipe.unet.device
    if device.type != "cuda":
        return None
    counts = []
    for n in (steps, 2 * steps):  # the difference cancels the syncs outside the loop
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(cfg, arch, n, size, "latent")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message).lower() for w in caught))
    return (counts[1] - counts[0]) / steps


def weight_bytes(pipe: Any) -> int:
    seen, total = set(), 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            for t in [*comp.parameters(), *comp.buffers()]:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def bench_arch(
    arch: Arch, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tok: Path
) -> list[Config]:
    size = args.size or arch.size
    parts = build_components(arch, device, dtype, tok)
    configs = [Config("plain", make_pipeline(arch, parts, copy_unet_vae=False))]
    default = make_pipeline(arch, parts, copy_unet_vae=True)
    configs.append(
        Config("default", default, fast.apply_speed_options(default, device=device, dtype=dtype))
    )
    for mode in args.compile:
        pipe = make_pipeline(arch, parts, copy_unet_vae=True)
        info = fast.apply_speed_options(
            pipe,
            device=device,
            dtype=dtype,
            compile=mode,
            compile_sizes=[(size, size)],
            compile_batches=[2],
        )
        configs.append(Config(f"fast-{mode}", pipe, info))
    for cfg in configs:
        cfg.weight_bytes = weight_bytes(cfg.pipe)
        cfg.warmup_s = run(cfg, arch, args.warmup_steps, size, "latent")
        run(cfg, arch, args.warmup_steps, size, "np")  # the decode path too (VAE kernels, compile)
    for _ in range(args.rounds):  # alternate configurations, so drift hits all of them alike
        for cfg in configs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t = run(cfg, arch, args.steps, size, "latent")
            cfg.its.append(args.steps / t)
            cfg.image_s.append(run(cfg, arch, args.steps, size, "np"))
            if device.type == "cuda":
                extra = torch.cuda.max_memory_allocated(device) - before
                cfg.peak.append(extra + cfg.weight_bytes)
    for cfg in configs:
        cfg.syncs_per_step = count_syncs(cfg, arch, 4, size)
        cfg.warmup_s -= args.warmup_steps / statistics.median(cfg.its)  # compile, not the steps
    return configs


def print_table(arch: Arch, configs: list[Config], args: argparse.Namespace, size: int) -> None:
    base = statistics.median(configs[0].its)
    print(
        f"\n## {arch.name} {size}x{size}, CFG 7.5, {args.steps} steps, {args.rounds} rounds (medians)"
    )
    print(
        f"| config | it/s | x plain | s/{args.steps}-step image | peak GiB | warm-up s | syncs/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for cfg in configs:
        its = statistics.median(cfg.its)
        peak = f"{max(cfg.peak) / 2**30:.2f}" if cfg.peak else "n/a"
        syncs = "n/a" if cfg.syncs_per_step is None else f"{cfg.syncs_per_step:.1f}"
        print(
            f"| {cfg.name} | {its:.2f} | {its / base:.2f} | {statistics.median(cfg.image_s):.3f} "
            f"| {peak} | {max(cfg.warmup_s, 0.0):.1f} | {syncs} |"
        )
    for cfg in configs[1:]:
        print(f"{cfg.name}: {cfg.info}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tiny", action="store_true", help="tiny configs on the CPU (checks the script)"
    )
    p.add_argument("--models", default="sd15,sdxl", help="comma list of: sd15, sdxl")
    p.add_argument(
        "--compile", default=None, help="comma list of fast modes: regional, full, cudagraphs, none"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps per timed image (default 50; tiny 4)",
    )
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: native)")
    p.add_argument(
        "--params", action="store_true", help="print parameter counts of the configs and exit"
    )
    args = p.parse_args(argv)

    archs = TINY if args.tiny else ARCHS
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in archs:
            p.error(f"--models: unknown {n!r}; choose from {', '.join(archs)}")
    if args.params:
        for n in names:
            print(n, count_params(archs[n]))
        return 0
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --tiny to check the script on the CPU")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    if args.compile is None:
        args.compile = "regional" if args.tiny else "cudagraphs"
    args.compile = [m for m in args.compile.split(",") if m and m != "none"]
    if args.steps is None:
        args.steps = 4 if args.tiny else 50

    import diffusers

    print(
        f"# benchmarks/gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"date {time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, dtype {dtype}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer"
        words = "a an the on of red green blue yellow white black orange purple circle square triangle star background".split()
        build_tokenizer(words, tok)
        for n in names:
            arch = archs[n]
            configs = bench_arch(arch, args, device, dtype, tok)
            print_table(arch, configs, args, args.size or arch.size)
            del configs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
