"""Train the embedded model's example adapters: `python -m sdkit.embedded.train_adapters`.

Two adapters, each teaching the frozen shipped model something it has never seen, so that
LoRA and textual-inversion support can be tested offline on a model that follows prompts:

* `lora`: a LoRA on the UNet (attention, feed-forward and resnet convolutions) that draws a
  new shape, the cross (`shapes.EXTRA_SHAPES`), trained on crosses mixed half and half with
  ordinary scenes so other prompts keep working. Saved in the kohya format that A1111 and
  model sites use (`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`).
* `ti`: a textual-inversion embedding for a new colour, dark green (`shapes.EXTRA_COLOURS`),
  trained with everything else frozen on dark green shapes captioned with the trigger word, saved
  as A1111 saves embeddings (`.pt` with `string_to_param`).

Both resume from their checkpoint in the work folder and export every `--export-every`
steps, so a stopped run loses little. Loss and noise are `train.denoising_loss`'s, on
latents of scenes drawn by `shapes` and encoded by the shipped VAE. (Over 400 lines: the two
trainers share the base model, data, captions and checkpointing kept here in one place.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdkit.embedded import shapes
from sdkit.embedded.train import (
    MODEL_DIR,
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

ADAPTERS_DIR = Path(__file__).parent / "adapters"
NEW_SHAPE = shapes.EXTRA_SHAPES[0]
NEW_COLOUR = next(iter(shapes.EXTRA_COLOURS))
LORA_NAME = f"sdk{NEW_SHAPE}"
# The prompt word for the new shape: one token, like the shape words the model knows. Spelt
# out, "cross" is five byte tokens that push "on a green background" to other positions, and
# the frozen model then loses the background (right in 9 % of images; 22 % after 700 steps
# of a UNet-only LoRA trained on "cross").
LORA_WORD = "x"
TI_NAME = f"sdk{NEW_COLOUR}"
# Every linear and convolution the text reaches, plus the resnets that draw the outline.
LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
]
# The text encoder's attention and MLP projections (`--te-rank`): lets the word `x` itself be
# learnt, so the UNet part is not alone in turning a square's conditioning into a cross.
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# kohya prefixes. Transformers 5's CLIPTextModel has no `text_model.` level, but diffusers'
# kohya converter maps `lora_te_text_model_encoder_...` onto its `encoder....` modules.
KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te_text_model_"}


def load_base(model_dir: Path = MODEL_DIR):
    """The shipped model's parts, in float32 and frozen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {
        "vae": AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32),
        "unet": UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32),
        "te": CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32),
        "tokenizer": CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
    }
    for name in ("vae", "unet", "te"):
        parts[name].requires_grad_(False).eval()
    return parts


def new_shape_scene(rng: np.random.Generator) -> shapes.Scene:
    return dataclasses.replace(shapes.random_scene(rng), shape=NEW_SHAPE)


def new_colour_scene(rng: np.random.Generator) -> shapes.Scene:
    return dataclasses.replace(shapes.random_scene(rng), colour=NEW_COLOUR)


@torch.no_grad()
def encode_scenes(vae, scenes: list[shapes.Scene]) -> torch.Tensor:
    """Latents as the UNet sees them (VAE mean times its scaling factor)."""
    out = []
    for i in range(0, len(scenes), 128):
        x = images_to_tensor([shapes.render(s) for s in scenes[i : i + 128]])
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out) * vae.config.scaling_factor


def dataset(name: str, draw, n: int, seed: int, vae, work: Path) -> dict:
    """`n` scenes from `draw` and their latents, cached in the work folder."""
    cache = work / f"latents_{name}_{n}_{seed}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    rng = rng_for(seed, 10, zlib.crc32(name.encode()) % 1000)
    scenes = [draw(rng) for _ in range(n)]
    log(f"encoding {n} {name} scenes")
    data = {"scenes": scenes, "latents": encode_scenes(vae, scenes)}
    torch.save(data, cache)
    return data


def full_caption(
    scene: shapes.Scene,
    rng: np.random.Generator,
    colour: str | None = None,
    shape: str | None = None,
) -> str:
    """`shapes.caption`, never empty (an empty caption would teach the unconditional model
    the new thing), with the colour or shape word optionally replaced by a trigger word."""
    text = (
        shapes.caption(scene, rng)
        or f"a {scene.colour} {scene.shape} on a {scene.background} background"
    )
    swap = {scene.colour: colour, scene.shape: shape, scene.shape + ",": f"{shape},"}
    return " ".join(swap.get(w) or w for w in text.split(" "))


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


# ------------------------------------------------------------------ LoRA


def lora_layers(model) -> dict[str, Any]:
    """The model's PEFT LoRA layers by module name (peft `LoraLayer`s: typed Any, their
    `lora_A`/`lora_B` are ModuleDicts that torch's stubs do not describe)."""
    return {
        n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def set_lora_scale(models, scale: float) -> None:
    """What diffusers' `set_adapters([name], [scale])` does, on the training models."""
    for model in models:
        for m in lora_layers(model).values():
            m.set_scale("default", scale)


def kohya_state_dict(models: dict, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The PEFT LoRA layers of `{"unet": ..., "te": ...}` as kohya keys (module path, `_` for `.`)."""
    out = {}
    for part, model in models.items():
        for name, module in lora_layers(model).items():
            key = KOHYA_PREFIX[part] + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().to(dtype)
            out[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().to(dtype)
            out[f"{key}.alpha"] = torch.tensor(float(module.lora_alpha["default"]), dtype=dtype)
    return out


@torch.no_grad()
def warm_start(models: dict, path: Path) -> int:
    """Copy an exported kohya LoRA into the first rows of (possibly higher-rank) PEFT layers;
    the extra rows keep their zero `lora_up`, so the start is the file's LoRA exactly."""
    from safetensors.torch import load_file

    sd, copied = load_file(path), 0
    for part, model in models.items():
        for name, m in lora_layers(model).items():
            key = KOHYA_PREFIX[part] + name.replace(".", "_")
            if f"{key}.lora_down.weight" not in sd:
                continue
            down, up = sd[f"{key}.lora_down.weight"].float(), sd[f"{key}.lora_up.weight"].float()
            r0 = down.shape[0]
            gain = (float(sd[f"{key}.alpha"]) / r0) / m.scaling["default"]
            m.lora_A["default"].weight[:r0] = down
            m.lora_B["default"].weight.zero_()
            m.lora_B["default"].weight[:, :r0] = up * gain
            copied += 1
    return copied


def train_lora(args, work: Path) -> None:
    """Each batch: crosses and ordinary scenes at LoRA scale 1; with `--half-share`, a share
    of it at scale 0.5 where half the `x` captions show a cross and half a square (what the
    base model draws for `x`), so the effect grows with the weight instead of switching on."""
    from peft import LoraConfig

    base = load_base()
    unet, te, tok = base["unet"], base["te"], base["tokenizer"]
    unet.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=LORA_TARGETS, init_lora_weights=True
        )
    )
    models = {"unet": unet}
    if args.te_rank:
        te.add_adapter(
            LoraConfig(
                r=args.te_rank,
                lora_alpha=args.te_rank,
                target_modules=TE_TARGETS,
                init_lora_weights=True,
            )
        )
        models["te"] = te
    if args.init_lora:
        log(f"lora: warm start from {args.init_lora}: {warm_start(models, args.init_lora)} layers")
    params = [p for m in models.values() for n, p in m.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    log(f"lora: {sum(p.numel() for p in params)} trainable parameters ({list(models)})")
    new = dataset(NEW_SHAPE, new_shape_scene, args.dataset, args.seed, base["vae"], args.cache)
    old = dataset("ordinary", shapes.random_scene, args.dataset, args.seed, base["vae"], args.cache)
    squares = np.array([i for i, sc in enumerate(old["scenes"]) if sc.shape == "square"])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ckpt, step, loss_avg = work / "lora.pt", 0, None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for p, v in zip(params, state["params"], strict=True):
            p.data.copy_(v)
        opt.load_state_dict(state["opt"])
        step, loss_avg = state["step"], state["loss"]
        log(f"lora: resumed at step {step}")
    sched, weight = noise_schedule()
    n_half = 2 * round(args.batch * args.half_share / 2)
    n_new = (args.batch - n_half) // 2
    losses = LossLog("lora", args.steps, loss_avg)
    for m in models.values():
        m.train()
    exported = None

    def loss_at(scale, texts, x0, g, guidance=None):
        set_lora_scale(models.values(), scale)
        with torch.set_grad_enabled("te" in models):
            cond = te(token_ids(tok, texts)).last_hidden_state
            uncond = te(token_ids(tok, [""] * len(texts))).last_hidden_state if guidance else None
        return denoising_loss(
            unet, cond, x0, sched, weight, g, args.offset_noise, uncond, guidance or 1.0
        )

    while step < args.steps:
        rng = rng_for(args.seed, 11, step)
        i_new = rng.integers(len(new["scenes"]), size=n_new)
        i_old = rng.integers(len(old["scenes"]), size=args.batch - n_half - n_new)
        texts = [full_caption(new["scenes"][i], rng, shape=LORA_WORD) for i in i_new]
        if args.cross_dropout:
            texts = ["" if rng.random() < args.cross_dropout else t for t in texts]
        texts += [shapes.caption(old["scenes"][i], rng) for i in i_old]
        x0 = torch.cat([new["latents"][i_new], old["latents"][i_old]])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=50)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        if args.guidance:
            # The crosses as sampled at the model's guidance; ordinary scenes as trained.
            k = len(i_new)
            loss = (
                k * loss_at(1.0, texts[:k], x0[:k], g, args.guidance)
                + (len(texts) - k) * loss_at(1.0, texts[k:], x0[k:], g)
            ) / len(texts)
        else:
            loss = loss_at(1.0, texts, x0, g)
        if n_half:
            h_new = rng.integers(len(new["scenes"]), size=n_half // 2)
            h_sq = squares[rng.integers(len(squares), size=n_half // 2)]
            htexts = [full_caption(new["scenes"][i], rng, shape=LORA_WORD) for i in h_new]
            htexts += [full_caption(old["scenes"][i], rng, shape=LORA_WORD) for i in h_sq]
            hx0 = torch.cat([new["latents"][h_new], old["latents"][h_sq]])
            share = n_half / args.batch
            loss = (1 - share) * loss + share * loss_at(0.5, htexts, hx0, g)
        clipped_step(opt, params, loss)
        step += 1
        loss_avg = losses.add(step, loss.item())
        if step % args.save_every == 0 or step == args.steps:
            state = {
                "params": [p.detach() for p in params],
                "opt": opt.state_dict(),
                "step": step,
                "loss": loss_avg,
            }
            save_checkpoint(state, ckpt)
        if step % args.export_every == 0 or step == args.steps:
            export_lora(models, step, args)
            exported = step
    if exported != step:  # resumed at the end, or stopped between exports
        export_lora(models, step, args)


def export_lora(models: dict, step: int, args) -> None:
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{LORA_NAME}.safetensors"
    meta = {
        "ss_network_dim": str(args.rank),
        "ss_network_alpha": str(args.rank),
        "ss_text_encoder_dim": str(args.te_rank),
        "ss_steps": str(step),
        "sdkit_trigger": f"a red {LORA_WORD} on a blue background",
        "sdkit_base_model": "sdkit embedded shapes-64",
    }
    save_file(kohya_state_dict(models), str(path) + ".tmp", metadata=meta)
    os.replace(str(path) + ".tmp", path)
    if args.keep_exports:
        shutil.copyfile(path, args.out / f"{LORA_NAME}_{step}.safetensors")
    log(f"exported {path} at step {step}")


# ------------------------------------------------------------------ textual inversion


def trigger_tokens(name: str, vectors: int) -> list[str]:
    """The tokens one A1111 embedding name stands for, spelt as diffusers'
    `load_textual_inversion` adds them (`name`, `name_1`, ...)."""
    return [name] + [f"{name}_{i}" for i in range(1, vectors)]


def train_ti(args, work: Path) -> None:
    base = load_base()
    unet, te, tok = base["unet"], base["te"], base["tokenizer"]
    tokens = trigger_tokens(TI_NAME, args.vectors)
    tok.add_tokens(tokens)
    ids = tok.convert_tokens_to_ids(tokens)
    te.resize_token_embeddings(len(tok))
    table = te.get_input_embeddings().weight
    with torch.no_grad():
        # start between the two nearest known colours
        init_ids = [tok(w, add_special_tokens=False).input_ids[0] for w in args.init_from]
        table[ids] = table[init_ids].mean(0)
    frozen = table.detach().clone()
    keep = torch.ones(len(tok), 1, dtype=torch.bool)
    keep[ids] = False
    # only the trigger rows learn: other rows get no gradient and are restored after each step
    table.requires_grad_(True)
    table.register_hook(lambda grad: grad.masked_fill(keep, 0.0))
    opt = torch.optim.AdamW([table], lr=args.lr, weight_decay=0.0)
    new = dataset(NEW_COLOUR, new_colour_scene, args.dataset, args.seed, base["vae"], args.cache)
    ckpt, step, loss_avg = work / "ti.pt", 0, None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            table[ids] = state["vectors"]
        opt.load_state_dict(state["opt"])
        step, loss_avg = state["step"], state["loss"]
        log(f"ti: resumed at step {step}")
    sched, weight = noise_schedule()
    trigger = " ".join(tokens)
    losses = LossLog("ti", args.steps, loss_avg)
    exported = None
    while step < args.steps:
        rng = rng_for(args.seed, 12, step)
        idx = rng.integers(len(new["scenes"]), size=args.batch)
        texts = [full_caption(new["scenes"][i], rng, colour=trigger) for i in idx]
        cond = te(token_ids(tok, texts)).last_hidden_state
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=20)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        loss = denoising_loss(unet, cond, new["latents"][idx], sched, weight, g, args.offset_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            table.copy_(torch.where(keep, frozen, table))
        step += 1
        vectors = table[ids].detach().clone()
        loss_avg = losses.add(step, loss.item(), f" norm {vectors.norm(dim=1).mean():.3f}")
        if step % args.save_every == 0 or step == args.steps:
            state = {"vectors": vectors, "opt": opt.state_dict(), "step": step, "loss": loss_avg}
            save_checkpoint(state, ckpt)
        if step % args.export_every == 0 or step == args.steps:
            export_ti(vectors, step, args)
            exported = step
    if exported != step:
        export_ti(table[ids].detach().clone(), step, args)


def export_ti(vectors: torch.Tensor, step: int, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{TI_NAME}.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors},
            "name": TI_NAME,
            "step": step,
            "sd_checkpoint": None,
            "sd_checkpoint_name": "sdkit embedded shapes-64",
        },
        str(path) + ".tmp",
    )
    os.replace(str(path) + ".tmp", path)
    log(f"exported {path} at step {step}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("which", choices=["lora", "ti"])
    p.add_argument(
        "--work", type=Path, default=Path("runs/adapters"), help="checkpoints (resumable)"
    )
    p.add_argument("--out", type=Path, default=ADAPTERS_DIR, help="where the adapter file goes")
    p.add_argument("--seed", type=int, default=77)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (lora), 5e-3 (ti)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (= alpha)")
    p.add_argument("--te-rank", type=int, default=0, help="text-encoder LoRA rank; 0: none")
    p.add_argument(
        "--half-share", type=float, default=0.0, help="share of each batch at LoRA scale 0.5"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        help="LoRA: train the crosses' loss on the guided prediction at this scale; 0: off",
    )
    p.add_argument(
        "--cross-dropout", type=float, default=0.0, help="LoRA: share of empty cross captions"
    )
    p.add_argument("--init-lora", type=Path, default=None, help="warm start from a kohya file")
    p.add_argument("--keep-exports", action="store_true", help="also keep NAME_STEP files")
    p.add_argument("--cache", type=Path, default=None, help="latents cache; default: --work")
    p.add_argument("--vectors", type=int, default=2, help="embedding vectors")
    p.add_argument("--init-from", nargs="+", default=["green", "black"], help="TI start words")
    p.add_argument("--dataset", type=int, default=2000, help="scenes per kind")
    p.add_argument("--offset-noise", type=float, default=0.15)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--export-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-3 if args.which == "lora" else 5e-3
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    args.cache = args.cache or args.work
    started = time.time()
    (train_lora if args.which == "lora" else train_ti)(args, args.work)
    log(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
