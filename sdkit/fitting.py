"""Fitting pictures to the working size: img2img init images and inpaint preparation.

`fit_image` fits an init image of another size ("resize" | "crop" | "fill");
`inpaint_inputs` grows and feathers the mask, crops around it (only_masked), resizes and
fills; `inpaint_finish` puts a generated image back onto the original so that no pixel
outside the (grown, feathered) mask changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from sdkit.request import Request, filled


def fit_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """An init image at the working size.

    "resize": stretch to width x height; "crop": scale to cover, centre-crop the overflow;
    "fill": scale to fit inside, pad the rest with the image's edge colours stretched out.
    """
    image = image.convert("RGB")
    size = (width, height)
    if image.size == size:
        return image
    lanczos = Image.Resampling.LANCZOS
    if mode == "crop":
        return ImageOps.fit(image, size, lanczos)
    if mode == "fill":
        inner = ImageOps.contain(image, size, lanczos)
        canvas = image.resize(size, Image.Resampling.BILINEAR)  # stretched backdrop
        canvas = canvas.filter(_blur(max(size) // 8))
        canvas.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
        return canvas
    return image.resize(size, lanczos)


def _blur(radius: int) -> Any:
    from PIL import ImageFilter

    return ImageFilter.GaussianBlur(max(1, radius))


@dataclass
class InpaintWork:
    """What the inpaint pipeline gets, and how its output goes back onto the original."""

    image: Image.Image  # working image (crop or whole, at width x height), fill applied
    mask: Image.Image  # working soft mask ("L") at width x height
    soft_mask: Image.Image  # grown + feathered mask at the original's size
    box: tuple[int, int, int, int] | None  # only_masked crop box in the original


def inpaint_inputs(req: Request) -> InpaintWork:
    """Mask prep (grow, blur), only-masked crop, resize to the working size, and fill."""
    from sdkit import masks

    original = filled(req.image, "image").convert("RGB")
    soft = masks.prepare_mask(filled(req.mask, "mask"), req.grow, req.mask_blur)
    size = (filled(req.width, "width"), filled(req.height, "height"))
    box = None
    if req.only_masked:
        box = masks.crop_region(soft, req.padding, target_size=size).box
        image = original.crop(box)
        mask = soft.crop(box)
    else:
        image, mask = original, soft
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    image = masks.fill_masked(image, mask, req.fill, seed=req.seed)
    return InpaintWork(image=image, mask=mask, soft_mask=soft, box=box)


def inpaint_finish(req: Request, work: InpaintWork, generated: Image.Image) -> Image.Image:
    """Paste back (only_masked) or resize to the original, then composite over it."""
    from sdkit import masks

    original = filled(req.image, "image").convert("RGB")
    if work.box is not None:
        full = masks.paste_back(original, generated, work.box)
    elif generated.size != original.size:
        full = generated.resize(original.size, Image.Resampling.LANCZOS)
    else:
        full = generated
    return masks.composite(original, full, work.soft_mask)
