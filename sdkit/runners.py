"""The built-in modes' runners, and the `RunContext` every runner gets.

A runner is `run(ctx) -> list[PIL.Image]` (see `sdkit.modes.ModeSpec.run`). The context
gives it the job's request, its per-image CPU generators, the engine's pipelines with a
fresh scheduler, progress reporting and the cancel check. Runners call diffusers exactly
as a diffusers user would, so outputs stay bit-identical to plain diffusers.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from sdkit import conditioning, control, encode_cache, fast, hires, schedulers
from sdkit.fitting import fit_image, inpaint_finish, inpaint_inputs
from sdkit.jobs import EventKind, Interrupted, Job, ProgressEvent
from sdkit.modes import Mode
from sdkit.prompt_syntax import without_lora_tags
from sdkit.request import filled

if TYPE_CHECKING:
    from sdkit.engine import Engine
    from sdkit.request import Request


def denoise_steps(num_inference_steps: int, strength: float) -> int:
    """Steps diffusers actually runs for `strength` (its get_timesteps rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def seed_noise_sampler(scheduler: Any, seed: int, n: int) -> None:
    """Seed the Brownian-tree noise of the DPM++ SDE scheduler from the request's seeds.

    diffusers' DPMSolverSDEScheduler otherwise seeds it from torch's global RNG, so one
    seed would not give one image; per-image seeds keep image i equal to a run at seed + i.
    """
    if hasattr(scheduler, "noise_sampler_seed") and scheduler.noise_sampler_seed is None:
        scheduler.noise_sampler_seed = [seed + i for i in range(n)]


@dataclass
class RunContext:
    """One job's run on one engine (what a runner needs, nothing more)."""

    engine: Engine
    job: Job
    generators: list[torch.Generator]
    crop_box: tuple[int, int, int, int] | None = None  # inpaint only_masked: control crops too
    adapters_key: tuple = ()  # the job's LoRAs, for the prompt cache (`sdkit.prompt_cache`)

    @property
    def request(self) -> Request:
        return self.job.request

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as checked."""
        req = self.request
        return filled(req.width, "width"), filled(req.height, "height")

    @property
    def steps(self) -> int:
        """num_inference_steps as checked."""
        return filled(self.request.num_inference_steps, "num_inference_steps")

    def check_cancel(self) -> None:
        """Stop here if the job was cancelled (raises; the engine reports `cancelled`)."""
        if self.job.cancel_requested:
            raise Interrupted

    def pipeline(self, name: str | None = None, scheduler: str | None = None) -> Any:
        """The engine's pipeline for mode or class `name` (default: the job's mode), with a
        fresh scheduler (default: the request's) seeded and sized for this job."""
        req = self.request
        pipe = self.engine.pipeline(name or req.mode)
        if req.control:  # its ControlNet twin, same components (sdkit.control)
            pipe = control.pipeline(self, pipe)
        name = filled(scheduler or req.scheduler, "scheduler")
        sched = schedulers.make_scheduler(name, self.engine.scheduler_config)
        seed_noise_sampler(sched, filled(req.seed, "seed"), req.num_images)
        pipe.scheduler = sched
        fast.prepare_job(pipe, *self.size, req.num_images)
        return pipe

    def progress(self, step: int, total: int, latents: Any = None, *, pixel: bool = False) -> None:
        """Report step `step` of `total`; `latents` (optional) make the preview."""
        job, engine = self.job, self.engine
        preview = None
        every = job.preview_every
        if every and latents is not None and (step % every == 0 or step == total):
            preview = engine.preview(latents, pixel=pixel)
        elapsed = time.perf_counter() - (job.started_at or time.perf_counter())
        event = ProgressEvent(job.id, step, total, elapsed, preview)
        job.progress = event
        engine._post(EventKind.PROGRESS, job, event)

    def step_callback(
        self, denoise_steps: int, *, offset: int = 0, total: int | None = None
    ) -> Callable:
        """callback_on_step_end: cancel check every iteration, events as diffusers counts
        (as `offset + step` of `total` when one job makes several passes, e.g. hires fix)."""
        counter = itertools.count(1)

        def callback(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            self.check_cancel()
            iters = pipe.num_timesteps
            order = getattr(pipe.scheduler, "order", 1)
            warmup = iters - denoise_steps * order
            if i == iters - 1 or ((i + 1) > warmup and (i + 1) % order == 0):
                step = min(next(counter), denoise_steps)
                self.progress(offset + step, total or denoise_steps, kwargs.get("latents"))
            return {}

        return callback

    def common_kwargs(self, denoise_steps: int) -> dict:
        req = self.request
        return {
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            "width": req.width,
            "height": req.height,
            "num_images_per_prompt": req.num_images,
            "generator": self.generators,
            "callback_on_step_end": self.step_callback(denoise_steps),
            "output_type": "pil",
        }

    def with_prompts(
        self,
        pipe: Any,
        kwargs: dict,
        *,
        unconditional: bool = False,
        steps: int | None = None,
        first_pass: int | None = None,
    ) -> dict:
        """`kwargs` plus the prompts: A1111 syntax or clip skip as `prompt_embeds` (switched
        per step for prompt editing over `steps`, default the request's; `first_pass`: a hires
        pass's, whose edits count that many steps first), plain prompts as text as before."""
        req = self.request
        prompt, negative = ("", "") if unconditional else (req.prompt, req.negative_prompt)
        prompt = without_lora_tags(prompt)  # LoRA tags never reach CLIP
        return (
            kwargs
            | conditioning.prompt_kwargs(
                pipe,
                prompt,
                negative,
                steps=steps or self.steps,
                first_pass=first_pass,
                clip_skip=None if unconditional else req.clip_skip,
                callback=kwargs["callback_on_step_end"],
                family=self.engine.family,
                cache=getattr(self.engine, "prompt_cache", None),
                adapters=self.adapters_key,
            )
            | control.call_kwargs(self, pipe, kwargs)
        )


# The units of work a cancel waits for at most: one resnet, one attention or feed-forward
# call, one up/down-sampler. (At huge sizes one self-attention over the whole latent is
# itself long on a CPU; nothing finer is possible without changing the computation.)
_CANCEL_UNITS = frozenset(
    {"ResnetBlock2D", "Attention", "FeedForward", "Downsample2D", "Upsample2D"}
)


def _cancel_units(root: Any) -> list[Any]:
    """The `_CANCEL_UNITS` modules under `root`, leaving compiled regions alone (a hook
    inside a compiled module would break its graph)."""
    if root is None or "forward" in vars(root):  # compiled as one graph
        return []
    units, stack = [], [root]
    while stack:
        for child in stack.pop().children():
            if getattr(child, "_compiled_call_impl", None) is not None or "forward" in vars(child):
                continue
            if type(child).__name__ in _CANCEL_UNITS:
                units.append(child)
            stack.append(child)
    return units


@contextlib.contextmanager
def cancel_points(ctx: RunContext, *modules: Any) -> Iterator[None]:
    """Check cancel before every unit of work in `modules` (the UNet and the VAE decoder):
    each resnet, attention, feed-forward and sampler, so a cancelled job stops within one
    such call even when one step or the decode takes minutes. The hooks only raise, so
    outputs are unchanged; compiled regions are left alone (there: between steps)."""

    def check(module: Any, args: Any) -> None:
        ctx.check_cancel()

    handles = [u.register_forward_pre_hook(check) for m in modules for u in _cancel_units(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------ the runners


def run_txt2img(ctx: RunContext) -> list[Image.Image]:
    if ctx.engine.inpainting_unet:
        return _with_inpainting_unet(ctx)
    if hires.enabled(ctx.request):
        return hires.run(ctx)
    pipe = ctx.pipeline()
    return pipe(**ctx.with_prompts(pipe, ctx.common_kwargs(ctx.steps))).images


def run_img2img(ctx: RunContext) -> list[Image.Image]:
    req = ctx.request
    if ctx.engine.inpainting_unet:
        return _with_inpainting_unet(ctx)
    pipe = ctx.pipeline()
    kwargs = ctx.common_kwargs(denoise_steps(ctx.steps, req.strength))
    del kwargs["width"], kwargs["height"]  # img2img pipelines take the image's size
    with encode_cache.scope(ctx.engine, pipe):  # same picture again: no VAE encode
        return pipe(
            image=fit_image(filled(req.image, "image"), *ctx.size, req.resize_mode),
            strength=req.strength,
            **ctx.with_prompts(pipe, kwargs),
        ).images


def run_inpaint(ctx: RunContext) -> list[Image.Image]:
    req = ctx.request
    work = inpaint_inputs(req)
    ctx.crop_box = work.box
    pipe = ctx.pipeline(Mode.INPAINT)
    kwargs = ctx.common_kwargs(denoise_steps(ctx.steps, req.strength))
    with encode_cache.scope(ctx.engine, pipe):  # image and masked image, as img2img
        out = pipe(
            image=work.image,
            mask_image=work.mask,
            strength=req.strength,
            **ctx.with_prompts(pipe, kwargs),
        ).images
    done = []
    for image in out:  # compositing a large batch takes a while: cancel between items
        ctx.check_cancel()
        done.append(inpaint_finish(req, work, image))
    return done


def run_unconditional(ctx: RunContext) -> list[Image.Image]:
    """Text models: an empty prompt with guidance off; UNet2DModel models: their own pipeline."""
    if ctx.engine.family == "unconditional":
        return _pixel_unconditional(ctx)
    if ctx.engine.inpainting_unet:
        return _with_inpainting_unet(ctx)
    pipe = ctx.pipeline()
    return pipe(prompt="", **ctx.common_kwargs(ctx.steps)).images


def _with_inpainting_unet(ctx: RunContext) -> list[Image.Image]:
    """txt2img / img2img / unconditional on a 9-channel UNet: its own pipeline, all-white mask."""
    req = ctx.request
    pipe = ctx.pipeline()
    size = ctx.size
    if req.mode == Mode.IMG2IMG:
        image = fit_image(filled(req.image, "image"), *size, req.resize_mode)
        strength = req.strength
    else:
        image, strength = Image.new("RGB", size, (127, 127, 127)), 1.0
    kwargs = ctx.common_kwargs(denoise_steps(ctx.steps, strength))
    unconditional = req.mode == Mode.UNCONDITIONAL
    with encode_cache.scope(ctx.engine, pipe):
        return pipe(
            image=image,
            mask_image=Image.new("L", size, 255),
            strength=strength,
            **ctx.with_prompts(pipe, kwargs, unconditional=unconditional),
        ).images


def _pixel_unconditional(ctx: RunContext) -> list[Image.Image]:
    """UNet2DModel models: their own DDPM/DDIM pipeline; progress from a UNet hook."""
    req = ctx.request
    name = schedulers.canonical_name(filled(req.scheduler, "scheduler"))
    pipe = ctx.pipeline("DDPMPipeline" if name == "DDPM" else None, name)
    count = itertools.count(1)

    def hook(module: Any, args: tuple, output: Any) -> None:
        ctx.check_cancel()
        total = len(pipe.scheduler.timesteps)
        ctx.progress(min(next(count), total), total, args[0], pixel=True)

    handle = pipe.unet.register_forward_hook(hook)
    try:
        return pipe(
            batch_size=req.num_images,
            generator=ctx.generators,
            num_inference_steps=req.num_inference_steps,
            output_type="pil",
        ).images
    finally:
        handle.remove()
