"""Train the embedded model's scribble ControlNet: `python -m sdkit.embedded.train_control`.

A diffusers `ControlNetModel.from_unet` copy of the shipped UNet's encoder learns to turn a
rough scribble (`scribbles.scribble`: white strokes on black) into the scene's shape drawn at
that place and size; the UNet, VAE and text encoder stay frozen. The conditioning embedding
has three channel stages, so two stride-2 convolutions take a 64x64 control image to the
16x16 latent grid (the VAE factor is 4; diffusers' default four stages would give 8x8).

Captions are the scene's usual ones (`shapes.caption`, 10 % empty), plus 15 % with the shape
word dropped and 10 % more empty, so the scribble alone must carry place and size. Loss and
noise are `train.denoising_loss`'s on cached latents of the shipped VAE, as for the adapters.
Resumable from its checkpoint in the work folder; exports a fp16 diffusers folder every
`--export-every` steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdkit.embedded import scribbles, shapes
from sdkit.embedded.train import (
    LossLog,
    clipped_step,
    denoising_loss,
    images_to_tensor,
    log,
    lr_at,
    noise_schedule,
    rng_for,
    save_checkpoint,
)
from sdkit.embedded.train_adapters import dataset, load_base, token_ids

CONTROL_DIR = Path(__file__).parent / "control" / "sdkscribble"
EMBEDDING_CHANNELS = (16, 32, 64)  # 3 stages: 2 stride-2 convs, 64 px -> 16 latent px


class Controlled(torch.nn.Module):
    """The frozen UNet steered by the ControlNet, callable like a UNet, so that
    `train.denoising_loss` trains it unchanged."""

    def __init__(self, unet, controlnet, control: torch.Tensor):
        super().__init__()
        self.unet, self.controlnet, self.control = unet, controlnet, control

    def forward(self, sample, t, encoder_hidden_states):
        down, mid = self.controlnet(
            sample,
            t,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=self.control,
            return_dict=False,
        )
        return self.unet(
            sample,
            t,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )


def control_caption(scene: shapes.Scene, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < 0.10:
        return ""
    text = shapes.caption(scene, rng)
    if u < 0.25:  # no shape word: the scribble says what and where
        text = " ".join(w for w in text.split(" ") if w.rstrip(",") != scene.shape)
    return text


def control_tensor(images) -> torch.Tensor:
    """Control images as diffusers' ControlNet pipelines feed them: RGB in [0, 1]."""
    return (images_to_tensor(images) + 1) / 2


def make_controlnet(unet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)


def train(args) -> None:
    base = load_base()
    unet, te, tok = base["unet"], base["te"], base["tokenizer"]
    net = make_controlnet(unet)
    net.train()
    params = list(net.parameters())
    log(f"controlnet: {sum(p.numel() for p in params)} trainable parameters")
    data = dataset("control", shapes.random_scene, args.dataset, args.seed, base["vae"], args.work)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ckpt, step, loss_avg = args.work / "control.pt", 0, None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, loss_avg = state["step"], state["loss"]
        log(f"control: resumed at step {step}")
    sched, weight = noise_schedule()
    started, exported = time.time(), None
    losses = LossLog("control", args.steps, loss_avg)
    while step < args.steps:
        rng = rng_for(args.seed, 30, step)
        idx = rng.integers(len(data["scenes"]), size=args.batch)
        scenes = [data["scenes"][i] for i in idx]
        control = control_tensor([scribbles.scribble(s, rng) for s in scenes])
        with torch.no_grad():
            cond = te(token_ids(tok, [control_caption(s, rng) for s in scenes])).last_hidden_state
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=50)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        model = Controlled(unet, net, control)
        loss = denoising_loss(
            model, cond, data["latents"][idx], sched, weight, g, args.offset_noise
        )
        clipped_step(opt, params, loss)
        step += 1
        loss_avg = losses.add(step, loss.item())
        if step % args.save_every == 0 or step == args.steps:
            state = {"model": net.state_dict(), "opt": opt.state_dict(), "step": step}
            save_checkpoint(state | {"loss": loss_avg}, ckpt)
        if step % args.export_every == 0 or step == args.steps:
            export(net, args.out, step, loss_avg, time.time() - started, args)
            exported = step
    if exported != step:
        export(net, args.out, step, loss_avg, time.time() - started, args)


def export(net, out: Path, step: int, loss: float | None, seconds: float, args) -> None:
    """A fp16 diffusers folder (config.json, diffusion_pytorch_model.safetensors), replaced
    whole so a reader never sees half of one."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(net).to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    training = {
        "command": shlex.join(["python", "-m", "sdkit.embedded.train_control", *args.argv]),
        "steps": step,
        "loss": loss,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "wall_seconds_this_run": round(seconds),
        "base_model": "sdkit embedded shapes-64",
    }
    (tmp / "sdkit.json").write_text(json.dumps({"training": training}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"exported {out} at step {step}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path("runs/control"), help="checkpoints")
    p.add_argument("--out", type=Path, default=CONTROL_DIR, help="the diffusers folder to write")
    p.add_argument("--seed", type=int, default=88)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dataset", type=int, default=4000, help="scenes (latents cached)")
    p.add_argument("--offset-noise", type=float, default=0.15)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--export-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    assert args.seed != scribbles.HELDOUT_SEED, "the held-out seed is for evaluation only"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train(args)
    log(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
