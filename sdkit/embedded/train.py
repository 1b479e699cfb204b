"""Train the embedded default model on this CPU: `python -m sdkit.embedded.train`.

Three phases, each resumable from its checkpoint in the work folder:
1. a byte-level CLIP tokenizer over the caption words;
2. the VAE (AutoencoderKL, factor 4: 64x64x3 -> 16x16x4) on freshly drawn scenes;
3. the UNet and the CLIP text encoder together, on latents of a fixed drawn set.
The result is an ordinary diffusers Stable Diffusion folder (fp16 safetensors).
Every batch is drawn from an RNG seeded by (seed, phase, step), so a run is
deterministic given its seed and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sdkit.embedded import shapes
from sdkit.embedded.tokenizer import build_tokenizer

MODEL_DIR = Path(__file__).parent / "model"
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    # As in Stable Diffusion's own config: DDIM/DDPM would otherwise clip predicted latents to
    # [-1, 1] (their pixel-space default), which wrecks every DDIM image of a latent model.
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    # Sample from t = 999 down. Stable Diffusion's "leading" spacing starts 12 steps at
    # t = 914, so the sampler never sees the pure-noise end where the shape is decided:
    # shape accuracy 0.72 with it and 0.86 without (96 images, same seeds, step 8000 of the
    # UNet). "Common Diffusion Noise Schedules and Sample Steps Are Flawed" (Lin et al. 2024).
    "timestep_spacing": "trailing",
}
# Chosen on the 6000-step model (leading spacing) with `benchmarks/embedded_eval.py --sweep`:
# of DPM++ 2M (plain and Karras), Euler a, Euler, DDIM and UniPC at guidance 3, 5 and 7.5,
# Euler a at 5 followed shapes best; 12 steps scored within one image of 20 on 32 prompts
# and keep one image under a second on a 2-core CPU (0.7-1.0 s on the shipped model).
DEFAULTS = {
    "width": 64,
    "height": 64,
    "num_inference_steps": 12,
    "guidance_scale": 5.0,
    "scheduler": "Euler a",
}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def clipped_step(opt: torch.optim.Optimizer, params, loss: torch.Tensor) -> None:
    """One optimiser step of every run here: backward, gradient norm clipped at 1, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


class LossLog:
    """The running loss average a run logs and checkpoints, and its progress line every
    `every` steps (`<name> step S/T loss L<extra> (s/step)`)."""

    def __init__(
        self, name: str, total: int, avg: float | None, *, every: int = 25, keep: float = 0.98
    ) -> None:
        self.name, self.total, self.avg, self.every, self.keep = name, total, avg, every, keep
        self._t0 = time.time()

    def add(self, step: int, loss: float, extra: str = "") -> float:
        self.avg = loss if self.avg is None else self.keep * self.avg + (1 - self.keep) * loss
        if step % self.every == 0:
            per_step = (time.time() - self._t0) / self.every
            log(
                f"{self.name} step {step}/{self.total} loss {self.avg:.4f}{extra} "
                f"({per_step:.2f} s/step)"
            )
            self._t0 = time.time()
        return self.avg


def rng_for(seed: int, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, step])


def images_to_tensor(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def make_text_encoder(vocab_size: int, eos_id: int, bos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        pad_token_id=eos_id,
        projection_dim=128,
    )
    return CLIPTextModel(cfg)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=32,
        norm_num_groups=16,
    )


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ------------------------------------------------------------------ phase 2


def edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between image gradients: plain pixel losses let the VAE round off corners."""
    return F.l1_loss(
        rec[..., 1:, :] - rec[..., :-1, :], x[..., 1:, :] - x[..., :-1, :]
    ) + F.l1_loss(rec[..., 1:] - rec[..., :-1], x[..., 1:] - x[..., :-1])


def train_vae(args, work: Path):
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=1e-4)
    ckpt = work / "vae.pt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"vae: resumed at step {step}")
    if step >= args.vae_steps:
        return vae, state.get("loss", float("nan"))
    vae.train()
    t0, loss_avg = time.time(), None
    while step < args.vae_steps:
        rng = rng_for(args.seed, 2, step)
        x = images_to_tensor(
            [shapes.render(shapes.random_scene(rng)) for _ in range(args.vae_batch)]
        )
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, 1e-3)
        torch.manual_seed(args.seed * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (
            F.l1_loss(rec, x)
            + F.mse_loss(rec, x)
            + 0.5 * edge_loss(rec, x)
            + 1e-6 * post.kl().mean()
        )
        clipped_step(opt, vae.parameters(), loss)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 50 == 0 or step == args.vae_steps:
            mse = F.mse_loss(rec.clamp(-1, 1), x).item() / 4  # in [0,1] units
            psnr = 10 * math.log10(1 / max(mse, 1e-10))
            log(
                f"vae step {step}/{args.vae_steps} loss {loss_avg:.4f} psnr {psnr:.1f} dB ({(time.time() - t0) / 50:.2f} s/step)"
            )
            t0 = time.time()
        if step % 250 == 0 or step == args.vae_steps:
            torch.save(
                {
                    "model": vae.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "loss": loss_avg,
                },
                ckpt,
            )
    return vae, loss_avg


def save_checkpoint(state: dict, path: Path) -> None:
    """Write through a temporary file, so a run stopped mid-write keeps its last checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------ phase 3


@torch.no_grad()
def encode_dataset(args, vae, work: Path):
    cache = work / f"latents_{args.dataset}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    log(f"drawing and encoding {args.dataset} scenes")
    rng = rng_for(args.seed, 3, 0)
    scenes = [shapes.random_scene(rng) for _ in range(args.dataset)]
    vae.eval()
    latents: Any = []  # the encoded batches, then their concatenation
    for i in range(0, len(scenes), 256):
        x = images_to_tensor([shapes.render(s) for s in scenes[i : i + 256]])
        latents.append(vae.encode(x).latent_dist.mean)
    latents = torch.cat(latents)
    scaling = float(1.0 / latents.std())
    data = {"latents": latents, "scenes": scenes, "scaling_factor": scaling}
    torch.save(data, cache)
    log(f"latents {tuple(latents.shape)}, scaling factor {scaling:.4f}")
    return data


def noise_schedule():
    """The training scheduler and its min-SNR-5 loss weight per timestep."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        **{
            k: v
            for k, v in SCHEDULER_CONFIG.items()
            if k not in ("skip_prk_steps", "set_alpha_to_one")
        }
    )
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    return sched, torch.clamp(snr, max=5.0) / snr


def denoising_loss(
    unet,
    cond,
    x0,
    sched,
    weight,
    g: torch.Generator,
    offset_noise: float,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
):
    """Epsilon-prediction loss with offset noise and min-SNR weighting (shared with the
    adapter trainers in `train_adapters.py`). With `uncond`, the loss is on the prediction
    as classifier-free guidance at `guidance` combines it, so an adapter learns what is
    sampled at that scale, not only the conditional half of it."""
    noise = torch.randn(x0.shape, generator=g) + offset_noise * torch.randn(
        (x0.shape[0], x0.shape[1], 1, 1), generator=g
    )
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    xt = sched.add_noise(x0, noise, t)
    pred = unet(xt, t, encoder_hidden_states=cond).sample
    if uncond is not None:
        base = unet(xt, t, encoder_hidden_states=uncond).sample
        pred = base + guidance * (pred - base)
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    return (per * weight[t]).mean()


def train_unet(args, work: Path, tokenizer, data):
    unet = make_unet()
    te = make_text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    ema_unet, ema_te = (
        make_unet(),
        make_text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id),
    )
    ema_unet.load_state_dict(unet.state_dict())
    ema_te.load_state_dict(te.state_dict())
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ckpt = work / "unet.pt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["te"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_te.load_state_dict(state["ema_te"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"unet: resumed at step {step}")
    sched, weight = noise_schedule()
    latents = data["latents"] * data["scaling_factor"]
    scenes = data["scenes"]
    token_cache: dict[str, torch.Tensor] = {}

    def tokens(text: str) -> torch.Tensor:
        if text not in token_cache:
            ids = tokenizer(
                text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids[0]
            token_cache[text] = ids
        return token_cache[text]

    if step >= args.unet_steps:  # finished earlier: export again (e.g. after the exporter changed)
        yield step, ema_unet, ema_te, state.get("loss")
        return
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    unet.train()
    te.train()
    losses = LossLog(
        "unet", args.unet_steps, state.get("loss") if ckpt.exists() else None, every=50, keep=0.99
    )
    while step < args.unet_steps:
        rng = rng_for(args.seed, 4, step)
        idx = rng.integers(len(scenes), size=args.batch)
        ids = torch.stack([tokens(shapes.caption(scenes[i], rng)) for i in idx])
        x0 = latents[torch.from_numpy(idx)]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.lr)
        cond = te(ids).last_hidden_state
        loss = denoising_loss(unet, cond, x0, sched, weight, g, args.offset_noise)
        clipped_step(opt, params, loss)
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params, strict=True):
                e.lerp_(p, 1 - decay)
        loss_avg = losses.add(step, loss.item())
        if step % 250 == 0 or step == args.unet_steps:
            state = {
                "unet": unet.state_dict(),
                "te": te.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_te": ema_te.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "loss": loss_avg,
            }
            save_checkpoint(state, ckpt)
        if step % args.export_every == 0 or step == args.unet_steps:
            yield step, ema_unet, ema_te, loss_avg


# ------------------------------------------------------------------ export


def latent_rgb_factors(data, n: int = 512) -> dict:
    """A linear latent -> RGB map for cheap previews, fitted on the training set.

    Applied to latents as the UNet sees them (already multiplied by the VAE scaling factor);
    gives RGB in [-1, 1] at latent resolution.
    """
    lat = data["latents"][:n] * data["scaling_factor"]
    imgs = images_to_tensor([shapes.render(s) for s in data["scenes"][:n]])
    small = F.avg_pool2d(imgs, imgs.shape[-1] // lat.shape[-1])
    x = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    y = small.permute(0, 2, 3, 1).reshape(-1, 3)
    w = torch.linalg.lstsq(x, y).solution
    return {"latent_rgb_factors": w[:-1].tolist(), "latent_rgb_bias": w[-1].tolist()}


def export(
    out: Path, vae, unet, te, tokenizer_dir: Path, scaling: float, training: dict, preview: dict
) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    # Keep configs at float32: weights are stored fp16 to stay small, but CPUs compute fp32.
    cfg_path = tmp / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (tmp / "sdkit.json").write_text(
        json.dumps({"defaults": DEFAULTS, "preview": preview, "training": training}, indent=2)
    )
    card = out / "README.md"
    if card.exists():
        shutil.copy(card, tmp / "README.md")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--work", type=Path, default=Path("runs/embedded"), help="checkpoints (resumable)"
    )
    p.add_argument("--out", type=Path, default=MODEL_DIR, help="the diffusers folder to write")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--dataset", type=int, default=40_000)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--offset-noise", type=float, default=0.15)
    p.add_argument("--export-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--note", default="", help="how this run relates to earlier ones (model card)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    tok_dir = args.work / "tokenizer"
    build_tokenizer(list(shapes.VOCABULARY), tok_dir)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    for w in shapes.VOCABULARY:
        n = len(tokenizer(w, add_special_tokens=False).input_ids)
        assert n == 1, f"tokenizer splits {w!r} into {n} tokens"
    log(f"tokenizer: {len(tokenizer)} entries")

    vae, vae_loss = train_vae(args, args.work)
    for q in vae.parameters():
        q.requires_grad_(False)
    data = encode_dataset(args, vae, args.work)
    preview = latent_rgb_factors(data)
    for step, ema_unet, ema_te, loss in train_unet(args, args.work, tokenizer, data):
        training = {
            "command": shlex.join(
                ["python", "-m", "sdkit.embedded.train", *(sys.argv[1:] if argv is None else argv)]
            ),
            "seed": args.seed,
            "vae_steps": args.vae_steps,
            "vae_final_loss": vae_loss,
            "unet_steps": step,
            "unet_final_loss": loss,
            "batch": args.batch,
            "offset_noise": args.offset_noise,
            "wall_seconds_this_run": round(time.time() - started),
            "torch": torch.__version__,
        } | ({"note": args.note} if args.note else {})
        export(args.out, vae, ema_unet, ema_te, tok_dir, data["scaling_factor"], training, preview)
        log(f"exported {args.out} at unet step {step}")
    log(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
