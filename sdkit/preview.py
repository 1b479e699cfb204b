"""Cheap latent -> RGB previews: a linear projection per step, never a VAE decode."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

# Published linear fits of the SD VAEs' decoders (latent channel -> RGB, in [-1, 1]).
SD_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
SDXL_FACTORS = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_BIAS = [0.1084, -0.0175, -0.0011]
_SD_VAE_BLOCKS = [128, 256, 512, 512]


def factors_for(
    family: str,
    vae_config: object | None,
    custom: Sequence[Sequence[float]] | None = None,
    custom_bias: Sequence[float] | None = None,
) -> tuple[list[list[float]] | None, list[float] | None]:
    """Projection for a model: its sdkit.json entry, else the published SD/SDXL fit when the
    VAE is the standard one, else None (meaning: a normalised view of three channels)."""
    if custom is not None:
        return [list(map(float, row)) for row in custom], (
            list(map(float, custom_bias)) if custom_bias is not None else None
        )
    if vae_config is None:
        return None, None
    blocks = list(getattr(vae_config, "block_out_channels", []))
    if getattr(vae_config, "latent_channels", 0) != 4 or blocks != _SD_VAE_BLOCKS:
        return None, None
    if family == "sdxl":
        return SDXL_FACTORS, SDXL_BIAS
    if family in ("sd1", "sd2"):
        return SD_FACTORS, None
    return None, None


@torch.no_grad()
def latents_to_rgb(
    latents: torch.Tensor,
    factors: Sequence[Sequence[float]] | None = None,
    bias: Sequence[float] | None = None,
    *,
    scale: int = 1,
    pixel_space: bool = False,
) -> Image.Image:
    """The first sample of `latents` (B, C, H, W) as a small RGB image.

    With `factors` (C x 3) a linear projection; `pixel_space` for unconditional pixel
    models whose "latents" are images in [-1, 1]; otherwise the first three channels,
    each stretched to its own min..max.
    """
    x = latents[0].detach().float().cpu()
    if pixel_space:
        rgb = (x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)) * 0.5 + 0.5
    elif factors is not None:
        f = torch.tensor(factors, dtype=torch.float32)
        rgb = torch.einsum("chw,cr->rhw", x[: f.shape[0]], f)
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32)[:, None, None]
        rgb = rgb * 0.5 + 0.5
    else:
        ch = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
        lo = ch.amin(dim=(1, 2), keepdim=True)
        hi = ch.amax(dim=(1, 2), keepdim=True)
        rgb = (ch - lo) / (hi - lo).clamp_min(1e-6)
    arr = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr, "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.BILINEAR)
    return img
