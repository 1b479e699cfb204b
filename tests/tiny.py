"""Tiny random-weight Stable Diffusion components, built offline and seeded.

Built the way diffusers' own fast tests build theirs: real diffusers/transformers
classes with very small configs, so every pipeline runs for real in milliseconds.
The tokenizer is a CLIP byte-level BPE made locally (`sdkit.embedded.tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "a red green blue yellow white black orange purple circle square triangle star "
    "on background the of and"
).split()
SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
SIZE = 32  # pixels; the tiny VAE has factor 4, so latents are 8x8


def tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    from sdkit.embedded.tokenizer import build_tokenizer

    build_tokenizer(list(WORDS), folder)
    return CLIPTokenizer.from_pretrained(str(folder))


def text_encoder(tok, *, projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    config = CLIPTextConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tok),
        projection_dim=hidden,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=SIZE,
    ).eval()


def unet(in_channels: int = 4, cross_attention_dim: int = 32, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=SIZE // 4,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
        **extra,
    ).eval()


def scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def sd_pipeline(folder: Path, *, inpainting: bool = False):
    """A tiny SD 1.x pipeline (4-channel, or a 9-channel inpainting UNet)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    tok = tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    return cls(
        vae=vae(),
        text_encoder=text_encoder(tok),
        tokenizer=tok,
        unet=unet(9 if inpainting else 4),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(folder: Path):
    """A tiny SDXL pipeline: two text encoders, text_time added conditioning."""
    from diffusers import StableDiffusionXLPipeline

    tok = tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    return StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(tok),
        text_encoder_2=text_encoder(tok, projection=True),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet(
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
        ),
        scheduler=scheduler(),
    )


def ddpm_pipeline():
    """A tiny unconditional-only pixel model (UNet2DModel + DDPM)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(4)
    model = UNet2DModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()
    return DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=1000))


def save(pipe, folder: Path, defaults: dict | None = None) -> Path:
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if defaults is not None:
        (folder / "sdkit.json").write_text(json.dumps({"defaults": defaults}))
    return folder


TINY_DEFAULTS = {
    "width": SIZE,
    "height": SIZE,
    "num_inference_steps": 4,
    "guidance_scale": 7.5,
    "scheduler": "PNDM",
}


# --------------------------------------------------------------- original SD single file


def _unet_to_ldm(sd: dict, layers_per_block: int, n_blocks: int) -> dict:
    """Diffusers UNet keys -> the original CompVis layout (model.diffusion_model.*)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    resnet = [
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ]
    per = layers_per_block + 1
    up_has_attn = {
        int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k
    }
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key in fixed:
            new = fixed[key]
        elif parts[0] == "down_blocks":
            b, kind, i, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{1 + b * per + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
            elif kind == "resnets":
                for a, c in resnet:
                    rest = rest.replace(a, c, 1) if rest.startswith(a) else rest
                new = f"input_blocks.{1 + b * per + int(i)}.0.{rest}"
            else:
                new = f"input_blocks.{1 + b * per + int(i)}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, i, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                for a, c in resnet:
                    rest = rest.replace(a, c, 1) if rest.startswith(a) else rest
                new = f"middle_block.{2 * i}.{rest}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind, i, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            if kind == "upsamplers":
                slot = 2 if b in up_has_attn else 1
                new = f"output_blocks.{b * per + layers_per_block}.{slot}.{rest}"
            elif kind == "resnets":
                for a, c in resnet:
                    rest = rest.replace(a, c, 1) if rest.startswith(a) else rest
                new = f"output_blocks.{b * per + int(i)}.0.{rest}"
            else:
                new = f"output_blocks.{b * per + int(i)}.1.{rest}"
        else:
            raise KeyError(f"unexpected UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(sd: dict, n_blocks: int) -> dict:
    """Diffusers AutoencoderKL keys -> first_stage_model.* (attention as 1x1 convs)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    attn = [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ]
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        side = parts[0]
        if key in fixed:
            new = fixed[key]
        elif parts[1] == "down_blocks":
            b, kind, rest = parts[2], parts[3], ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"encoder.down.{b}.downsample.{rest.removeprefix('0.')}"
            else:
                new = f"encoder.down.{b}.block.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        elif parts[1] == "up_blocks":
            b, kind, rest = n_blocks - 1 - int(parts[2]), parts[3], ".".join(parts[4:])
            if kind == "upsamplers":
                new = f"decoder.up.{b}.upsample.{rest.removeprefix('0.')}"
            else:
                new = f"decoder.up.{b}.block.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        elif parts[1] == "mid_block":
            kind, i, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"{side}.mid.block_{i + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                for a, c in attn:
                    if rest.startswith(a):
                        rest = c + rest[len(a) :]
                new = f"{side}.mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            raise KeyError(f"unexpected VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def write_original_checkpoint(pipe, path: Path) -> Path:
    """Save a tiny SD 1.x pipeline as one `.safetensors` file in the original SD key layout."""
    from safetensors.torch import save_file

    state = {}
    unet_cfg = pipe.unet.config
    state.update(
        _unet_to_ldm(
            pipe.unet.state_dict(), unet_cfg.layers_per_block, len(unet_cfg.block_out_channels)
        )
    )
    state.update(_vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 names CLIPTextModel weights without the `text_model.` level the
        # original checkpoints (and transformers 4) have
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
