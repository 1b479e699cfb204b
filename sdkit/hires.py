"""Hires fix for txt2img, as A1111's "Hires. fix" runs it: two passes in one job.

Pass 1 draws at width x height. The result is upscaled to the target size, either in
latent space (A1111's "Latent": bilinear interpolation of the latents, no antialiasing) or
in pixels (A1111's "Lanczos": decode, PIL Lanczos, re-encode by the img2img pipeline).
Pass 2 is img2img at the target size with strength `hires_denoise`.

A1111's rules kept here:
- target = int(width * hires_scale) x int(height * hires_scale); here rounded down to the
  model's size multiple (A1111's latent path floors to the latent grid the same way).
- `hires_steps` (0: `num_inference_steps`) is the number of denoising steps pass 2 really
  runs: A1111 stretches the schedule to int(steps / min(denoise, 0.999)) and runs its last
  `steps` (sd_samplers_common.setup_img2img_steps); diffusers' img2img selects the same
  tail of the same schedule when given that length and a strength just above steps/length.
- pass 2's noise comes from generators re-seeded with the job's seeds (A1111 builds a new
  ImageRNG from the same seeds at the new latent shape), so image i of a batch still equals
  a run at seed + i.
- the prompt is encoded again for pass 2 with its own step count (prompt editing switches
  over pass 2's steps; A1111's default "new" timelines instead count pass 1's steps first).

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
    """Whether `req` asks for a second pass (None or 1 = off)."""
    return req.hires_scale is not None and req.hires_scale != 1


def target_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """A1111's int(size * scale), rounded down to the model's size multiple."""
    w, h = int(width * scale), int(height * scale)
    return max(multiple, w - w % multiple), max(multiple, h - h % multiple)


def output_size(req: Request, multiple: int) -> tuple[int, int]:
    """The size of the images `req` (checked) makes: the target with hires fix, else its own
    (what a server's pixel limit must count)."""
    w, h = filled(req.width, "width"), filled(req.height, "height")
    if req.mode != "txt2img" or not enabled(req):
        return w, h
    return target_size(w, h, filled(req.hires_scale, "hires_scale"), multiple)


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
    if engine.inpainting_unet:
        raise RequestError("hires_scale", "hires fix needs a 4-channel UNet; this model inpaints")
    if req.control:
        raise RequestError("hires_scale", "hires fix with ControlNet units is not supported yet")
    w, h = filled(req.width, "width"), filled(req.height, "height")
    tw, th = output_size(req, engine.size_multiple)
    n = req.num_images
    if tw > MAX_SIZE or th > MAX_SIZE:
        raise RequestError(
            "hires_scale",
            f"{w}x{h} x {req.hires_scale} = {tw}x{th}; at most {MAX_SIZE} pixels per side",
        )
    if tw * th * n > MAX_PIXELS:
        raise RequestError(
            "hires_scale",
            f"{w}x{h} x {req.hires_scale} = {tw}x{th} x {n} image(s) = {tw * th * n} pixels; "
            f"one job may make at most {MAX_PIXELS}",
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
    tw, th = output_size(req, ctx.engine.size_multiple)
    first, p2 = ctx.steps, second_pass(req)
    total = first + p2.steps

    pipe = ctx.pipeline()
    kwargs = ctx.common_kwargs(first)
    kwargs["callback_on_step_end"] = ctx.step_callback(first, total=total)
    kwargs["output_type"] = "latent" if latent else "pil"
    low = pipe(**ctx.with_prompts(pipe, kwargs)).images
    ctx.check_cancel()

    if latent:  # A1111's "Latent": F.interpolate(mode="bilinear", antialias=False)
        f = ctx.engine.vae_factor
        init: Any = F.interpolate(low, size=(th // f, tw // f), mode="bilinear", antialias=False)
    else:  # A1111's "Lanczos" upscaler; the img2img pipeline encodes the result
        init = [image.resize((tw, th), Image.Resampling.LANCZOS) for image in low]
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
        image=init, strength=p2.strength, **ctx.with_prompts(pipe, kwargs, steps=p2.steps)
    ).images
