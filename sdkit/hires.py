"""Hires fix for txt2img, as A1111's "Hires. fix" runs it: two passes in one job.

Pass 1 draws at width x height. The result is upscaled to the target size, either in
latent space (A1111's "Latent": bilinear interpolation of the latents, no antialiasing) or
in pixels (A1111's "Lanczos": decode, PIL Lanczos, re-encode by the img2img pipeline).
Pass 2 is img2img at the target size with strength `hires_denoise`.

A1111's rules kept here:
- target = int(width * hires_scale) x int(height * hires_scale); here rounded down to the
  model's size multiple (A1111's latent path floors to the latent grid the same way).
  A target size ("Resize width/height to": `hires_width`, `hires_height`, 0 = unset)
  overrides the scale: one side given, the other follows the aspect ratio; both given, the
  picture is upscaled to cover the target and the latents cropped to it (`upscale`).
- `hires_steps` (0: `num_inference_steps`) is the number of denoising steps pass 2 really
  runs: A1111 stretches the schedule to int(steps / min(denoise, 0.999)) and runs its last
  `steps` (sd_samplers_common.setup_img2img_steps); diffusers' img2img selects the same
  tail of the same schedule when given that length and a strength just above steps/length.
- pass 2's noise comes from generators re-seeded with the job's seeds (A1111 builds a new
  ImageRNG from the same seeds at the new latent shape), so image i of a batch still equals
  a run at seed + i.
- the prompt is encoded again for pass 2 on A1111's default ("new") timeline, which counts
  pass 1's steps first: `[a:b:25]` after 20 steps switches after pass 2's step 5, and a
  fraction <= 1 has run its course in pass 1 (`[a:b:0.5]` is `b` all through pass 2).

One difference: with both target sides set, Lanczos crops the pixels on the latent grid
before the img2img pipeline encodes them, where A1111 encodes the whole upscaled picture
and crops its latents (the same cells; the VAE sees no border beyond the crop here).

Progress is one total for the job: pass 1 steps + pass 2 denoising steps. Cancel is checked
at every step and unit of work of both passes (the engine's cancel points cover both).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sdkit.request import MAX_PIXELS, MAX_SIZE, RequestError, filled

if TYPE_CHECKING:
    from PIL import Image

    from sdkit.request import Request
    from sdkit.runners import RunContext

MAX_DENOISE = 0.999  # A1111's cap when stretching the schedule (setup_img2img_steps)


def enabled(req: Request) -> bool:
    """Whether `req` asks for a second pass (a target size, or a scale other than None/1)."""
    if req.hires_width or req.hires_height:
        return True
    return req.hires_scale is not None and req.hires_scale != 1


def target_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """A1111's int(size * scale), rounded down to the model's size multiple."""
    w, h = int(width * scale), int(height * scale)
    return _floor(w, h, multiple)


def _floor(w: int, h: int, multiple: int) -> tuple[int, int]:
    return max(multiple, w - w % multiple), max(multiple, h - h % multiple)


@dataclasses.dataclass(frozen=True)
class Upscale:
    """How pass 1's picture becomes pass 2's: upscaled to `size` (A1111's hr_upscale_to),
    then `crop` latent cells (x, y) cut off, half on each side, the odd one at the right /
    bottom (A1111's truncate_x / truncate_y); `output` is the final size."""

    size: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    factor: int = 8

    @property
    def output(self) -> tuple[int, int]:
        """What the latent grid keeps: whole cells of `size`, less the cut ones."""
        (w, h), (cx, cy), f = self.size, self.crop, self.factor
        return (w // f - cx) * f, (h // f - cy) * f


def upscale(req: Request, multiple: int, factor: int = 8) -> Upscale:
    """A1111's target rule. No target size: `hires_scale`. One side given (the other 0): that
    side, the other keeping the aspect ratio (size * side // other side, floored to the
    size multiple). Both given: scaled to cover the target keeping the aspect ratio, then
    cropped to it in latent space (Lanczos: in pixels, on the same latent grid)."""
    w, h = filled(req.width, "width"), filled(req.height, "height")
    rx, ry = req.hires_width or 0, req.hires_height or 0
    if not rx and not ry:
        return Upscale(target_size(w, h, filled(req.hires_scale, "hires_scale"), multiple))
    if not ry:
        return Upscale(_floor(rx, rx * h // w, multiple))
    if not rx:
        return Upscale(_floor(ry * w // h, ry, multiple))
    if w / h < rx / ry:  # wider target: match the width, crop the height
        ux, uy = rx, rx * h // w
    else:
        ux, uy = ry * w // h, ry
    return Upscale((ux, uy), ((ux - rx) // factor, (uy - ry) // factor), factor)


def output_size(req: Request, multiple: int) -> tuple[int, int]:
    """The size of the images `req` (checked) makes: the target with hires fix, else its own
    (what a server's pixel limit must count)."""
    w, h = filled(req.width, "width"), filled(req.height, "height")
    if req.mode != "txt2img" or not enabled(req):
        return w, h
    return upscale(req, multiple, multiple).output


def _blame(req: Request, size: tuple[int, int]) -> tuple[str, str]:
    """(field, how the size came about) for an error about a target `size`."""
    w, h = filled(req.width, "width"), filled(req.height, "height")
    rx, ry = req.hires_width or 0, req.hires_height or 0
    if not rx and not ry:
        return "hires_scale", f"{w}x{h} x {req.hires_scale} = {size[0]}x{size[1]}"
    wide = size[0] > MAX_SIZE or (size[0] >= size[1] and size[1] <= MAX_SIZE)
    field = "hires_width" if (rx and wide) or not ry else "hires_height"
    return field, f"{w}x{h} resized to {rx}x{ry} = {size[0]}x{size[1]}"


@dataclasses.dataclass(frozen=True)
class SecondPass:
    """Pass 2 as diffusers runs it: `steps` denoising steps, the last ones of a schedule of
    `schedule` steps, selected by `strength`."""

    steps: int
    schedule: int
    strength: float


def second_pass(req: Request) -> SecondPass:
    k = req.hires_steps or filled(req.num_inference_steps, "num_inference_steps")
    schedule = max(k, int(k / min(req.hires_denoise, MAX_DENOISE)))
    # diffusers runs int(schedule * strength) steps: k + 0.5 keeps float error off the floor
    return SecondPass(k, schedule, min(1.0, (k + 0.5) / schedule))


def check(req: Request, engine: Any) -> Request:
    """txt2img's `ModeSpec.check`: the target size within the limits, pass 2 runnable."""
    if not enabled(req):
        return req
    asked = (
        "hires_width" if req.hires_width else "hires_height" if req.hires_height else "hires_scale"
    )
    if engine.inpainting_unet:
        raise RequestError(asked, "hires fix needs a 4-channel UNet; this model inpaints")
    if req.control:
        raise RequestError(asked, "hires fix with ControlNet units is not supported yet")
    plan = upscale(req, engine.size_multiple, engine.vae_factor)
    n = req.num_images
    for size in (plan.size, plan.output):  # the upscaled picture before any crop, and after
        if size[0] > MAX_SIZE or size[1] > MAX_SIZE:
            field, how = _blame(req, size)
            raise RequestError(field, f"{how}; at most {MAX_SIZE} pixels per side")
    tw, th = plan.output
    if tw * th * n > MAX_PIXELS:
        field, how = _blame(req, (tw, th))
        raise RequestError(
            field,
            f"{how} x {n} image(s) = {tw * th * n} pixels; one job may make at most {MAX_PIXELS}",
        )
    limit = int(engine.scheduler_config.get("num_train_timesteps", 1000))
    p2 = second_pass(req)
    if p2.schedule > limit:
        raise RequestError(
            "hires_denoise",
            f"{p2.steps} hires steps at denoise {req.hires_denoise} need a {p2.schedule}-step "
            f"schedule; at most {limit}: raise hires_denoise or lower hires_steps",
        )
    return req


def run(ctx: RunContext) -> list[Image.Image]:
    """Both passes of one txt2img job (called by `sdkit.runners.run_txt2img`)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from sdkit import fast
    from sdkit.modes import Mode

    req = ctx.request
    latent = req.hires_upscaler == "Latent"
    f = ctx.engine.vae_factor
    plan = upscale(req, ctx.engine.size_multiple, f)
    (uw, uh), (cx, cy) = plan.size, plan.crop
    tw, th = plan.output
    first, p2 = ctx.steps, second_pass(req)
    total = first + p2.steps

    pipe = ctx.pipeline()
    kwargs = ctx.common_kwargs(first)
    kwargs["callback_on_step_end"] = ctx.step_callback(first, total=total)
    kwargs["output_type"] = "latent" if latent else "pil"
    low = pipe(**ctx.with_prompts(pipe, kwargs)).images
    ctx.check_cancel()

    if latent:  # A1111's "Latent": F.interpolate(mode="bilinear", antialias=False)
        init: Any = F.interpolate(low, size=(uh // f, uw // f), mode="bilinear", antialias=False)
        if (uw, uh) != (tw, th):  # A1111's truncate: half each side, odd cell right/bottom
            init = init[:, :, cy // 2 : cy // 2 + th // f, cx // 2 : cx // 2 + tw // f]
    else:  # A1111's "Lanczos" upscaler; the img2img pipeline encodes the result
        init = [image.resize((uw, uh), Image.Resampling.LANCZOS) for image in low]
        if (uw, uh) != (tw, th):  # the same latent cells, cut in pixels before encoding
            box = (cx // 2 * f, cy // 2 * f, cx // 2 * f + tw, cy // 2 * f + th)
            init = [image.crop(box) for image in init]
    ctx.check_cancel()

    pipe = ctx.pipeline(Mode.IMG2IMG)  # fresh scheduler, noise sampler re-seeded
    fast.prepare_job(pipe, tw, th, req.num_images)
    seed = filled(req.seed, "seed")
    kwargs = ctx.common_kwargs(p2.steps)
    del kwargs["width"], kwargs["height"]  # img2img takes the init's size
    kwargs |= {
        "num_inference_steps": p2.schedule,
        "generator": [torch.Generator("cpu").manual_seed(seed + i) for i in range(req.num_images)],
        "callback_on_step_end": ctx.step_callback(p2.steps, offset=first, total=total),
    }
    return pipe(
        image=init,
        strength=p2.strength,
        **ctx.with_prompts(pipe, kwargs, steps=p2.steps, first_pass=first),
    ).images
