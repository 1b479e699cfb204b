"""`Engine`: one loaded model on one device serving the four modes; `Job`: one request in it.

The engine loads weights once and builds the per-mode diffusers pipelines from the same
components with `from_pipe` (no second copy, no reload when switching). A single worker
thread runs jobs in FIFO order; events go to the job's callbacks and to every subscriber.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from sdkit import fast, schedulers
from sdkit.models import LoadedModel, load_model
from sdkit.preview import factors_for, latents_to_rgb
from sdkit.request import Request, RequestError
from sdkit.result import Result

log = logging.getLogger(__name__)

EventFn = Callable[[str, "Job", "ProgressEvent | None"], None]
_UNCONDITIONAL_SCHEDULERS = ["DDPM", "DDIM"]


@dataclass(frozen=True)
class ProgressEvent:
    """One finished denoising step (counted the way diffusers' own progress bar counts)."""

    job_id: str
    step: int
    total: int
    elapsed: float
    preview: Image.Image | None = None


class JobCancelled(RuntimeError):
    """The job was cancelled; it produced no images."""


class _Interrupted(Exception):
    """Raised inside the denoising loop to stop a cancelled job at once."""


class Job:
    """A request on its way through an engine; `result()` waits for it."""

    def __init__(self, request: Request, engine: Engine, preview_every: int = 1):
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.state = "queued"
        self.progress: ProgressEvent | None = None
        self.error: BaseException | None = None
        self.preview_every = preview_every
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._engine = engine
        self._result: Result | None = None
        self._callbacks: list[EventFn] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.request.mode} {self.state}>"

    def cancel(self) -> None:
        """A queued job never runs; a running one stops within one denoising step."""
        with self._lock:
            if self.state in ("done", "cancelled", "failed"):
                return
            self._cancel.set()
            if self.state != "queued":
                return
            self.state = "cancelled"
            self.finished_at = time.perf_counter()
        self._finished.set()
        self._engine._emit("cancelled", self, None)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> Result:
        """The `Result`; raises `JobCancelled`, the job's own error, or `TimeoutError`."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.id} still {self.state} after {timeout} s")
        if self.state == "cancelled":
            raise JobCancelled(f"job {self.id} was cancelled")
        if self.state == "failed":
            assert self.error is not None
            raise self.error
        assert self._result is not None
        return self._result

    def add_callback(self, fn: EventFn) -> None:
        """`fn(kind, job, event)` for this job's events, from the worker thread."""
        with self._lock:
            self._callbacks.append(fn)

    # -- used by the engine's worker ------------------------------------------------

    def _try_start(self) -> bool:
        with self._lock:
            if self.state != "queued":
                return False
            self.state = "running"
            self.started_at = time.perf_counter()
            return True

    def _finish(self, state: str, result: Result | None = None, error: BaseException | None = None):
        with self._lock:
            self.state = state
            self._result = result
            self.error = error
            self.finished_at = time.perf_counter()
        self._finished.set()


class Engine:
    """One model on one device. All four modes share its components."""

    def __init__(
        self,
        spec: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        config: str | Path | None = None,
        compile: bool | None = None,
    ):
        model = load_model(spec, device, dtype, config=config)
        self._setup(model, compile=compile)

    @classmethod
    def from_loaded(cls, model: LoadedModel, *, compile: bool | None = None) -> Engine:
        """An engine around an already loaded model (tests, embedding applications)."""
        self = cls.__new__(cls)
        self._setup(model, compile=compile)
        return self

    def _setup(self, model: LoadedModel, *, compile: bool | None) -> None:
        self.model = model
        self.spec = model.spec
        self.device = model.device
        self.dtype = model.dtype
        self.family = model.family
        base = model.pipe
        self.inpainting_unet = self.family != "unconditional" and base.unet.config.in_channels == 9
        self.vae_factor = 1 if self.family == "unconditional" else int(base.vae_scale_factor)
        # diffusers' text pipelines insist on multiples of 8 even when the VAE factor is smaller.
        self.size_multiple = 1 if self.family == "unconditional" else max(8, self.vae_factor)
        self._scheduler_config = dict(base.scheduler.config)
        if self.family == "unconditional":
            self.scheduler_names = list(_UNCONDITIONAL_SCHEDULERS)
        else:
            self.scheduler_names = [n for n in schedulers.scheduler_names() if n != "DDPM"]
        defaults = dict(model.defaults)
        if defaults.get("scheduler") == type(base.scheduler).__name__:
            # the model's own scheduler, by the name users know (e.g. PNDMScheduler -> "PNDM")
            defaults["scheduler"] = schedulers.name_of(base.scheduler)
        else:
            try:
                defaults["scheduler"] = schedulers.canonical_name(defaults["scheduler"])
            except KeyError:
                defaults["scheduler"] = schedulers.name_of(base.scheduler)
        self.defaults = defaults
        vae_config = None if self.family == "unconditional" else base.vae.config
        self._preview_factors, self._preview_bias = factors_for(
            self.family, vae_config, model.latent_rgb_factors, model.latent_rgb_bias
        )
        fast.apply_speed_options(base, device=self.device, dtype=self.dtype, compile=compile)
        base.set_progress_bar_config(disable=True)
        self._pipes: dict[str, Any] = {type(base).__name__: base}
        self._base = base
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._pending: collections.deque[Job] = collections.deque()
        self._subscribers: list[EventFn] = []
        self._current: Job | None = None
        self._closed = False
        self._worker = threading.Thread(
            target=self._work, name=f"sdkit-engine-{id(self):x}", daemon=True
        )
        self._worker.start()

    def __repr__(self) -> str:
        return f"<sdkit.Engine {self.model.name} {self.family} on {self.device} {self.dtype}>"

    # -- public API -----------------------------------------------------------------

    def info(self) -> dict:
        """JSON-safe description (the bridge and the widget show it)."""
        return {
            "spec": self.spec,
            "name": self.model.name,
            "family": self.family,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_factor": self.vae_factor,
            "inpainting_unet": self.inpainting_unet,
            "defaults": dict(self.defaults),
            "scheduler_names": list(self.scheduler_names),
            "modes": ["unconditional"] if self.family == "unconditional" else list(_MODES),
        }

    def prepare(self, request: Request) -> Request:
        """The request as it will run: validated, model defaults and a seed filled in."""
        if not isinstance(request, Request):
            raise RequestError(
                "request", f"expected an sdkit.Request, got {type(request).__name__}"
            )
        request.validate(vae_factor=self.size_multiple, scheduler_names=self.scheduler_names)
        req = dataclasses.replace(request, extra=dict(request.extra))
        if req.mode in ("img2img", "inpaint") and not (req.mode == "inpaint" and req.only_masked):
            # diffusers' own rule: work at the input's size, rounded down to the VAE factor.
            w, h = req.image.size
            f = self.size_multiple
            if req.width is None:
                req.width = max(f, w - w % f)
            if req.height is None:
                req.height = max(f, h - h % f)
        if req.mode == "unconditional":
            if req.guidance_scale is not None and req.guidance_scale > 1:
                raise RequestError(
                    "guidance_scale",
                    "unconditional generation runs without guidance; use 0, 1 or None",
                )
            req.guidance_scale = 1.0
            req.prompt = ""
        req = req.with_defaults(self.defaults)
        if self.family == "unconditional":
            if req.mode != "unconditional":
                raise RequestError(
                    "mode",
                    f"{self.model.name} is an unconditional-only model; allowed: unconditional",
                )
            size = self.defaults["width"]
            for name in ("width", "height"):
                if getattr(req, name) != size:
                    raise RequestError(
                        name,
                        f"this unconditional model draws {size}x{size} only, got {getattr(req, name)}",
                    )
        if (
            req.mode in ("img2img", "inpaint")
            and denoise_steps(req.num_inference_steps, req.strength) < 1
        ):
            raise RequestError(
                "strength",
                f"{req.strength} x {req.num_inference_steps} steps leaves no denoising step; "
                f"use strength >= {1 / req.num_inference_steps:.3g} or more steps",
            )
        if req.seed is None:
            req.seed = random.randrange(0, 2**32 - req.num_images)
        if req.model is None:
            req.model = self.model.name
        req.validate(vae_factor=self.size_multiple, scheduler_names=self.scheduler_names)
        return req

    def submit(
        self, request: Request, *, preview_every: int = 1, callback: EventFn | None = None
    ) -> Job:
        """Validate (raising `RequestError`) and queue; `preview_every=0` means no previews."""
        req = self.prepare(request)
        job = Job(req, self, preview_every)
        if callback is not None:
            job.add_callback(callback)
        if self._closed:
            raise RuntimeError("this engine is closed")
        self._emit("queued", job, None)  # before the worker can see it: "queued" comes first
        with self._cond:
            if not self._closed:
                self._pending.append(job)
                self._cond.notify()
                return job
        job.cancel()
        raise RuntimeError("this engine is closed")

    def subscribe(self, fn: EventFn) -> Callable[[], None]:
        """`fn(kind, job, event)` for every job of this engine; returns the unsubscribe."""
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def generate(self, request: Request, *, progress: bool = True) -> Result:
        """Run one request to the end with a tqdm bar; Ctrl-C cancels the job."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=None, desc=request.mode, unit="step", leave=False)

        def on_event(kind: str, job: Job, event: ProgressEvent | None) -> None:
            if bar is not None and event is not None:
                bar.total = event.total
                bar.n = event.step
                bar.refresh()

        job = self.submit(request, preview_every=0, callback=on_event)
        try:
            return job.result()
        except KeyboardInterrupt:
            job.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()

    def txt2img(self, prompt: str, *, progress: bool = True, **fields: Any) -> Result:
        return self.generate(make_request("txt2img", prompt=prompt, **fields), progress=progress)

    def img2img(
        self, image: Any, prompt: str = "", *, progress: bool = True, **fields: Any
    ) -> Result:
        return self.generate(
            make_request("img2img", image=image, prompt=prompt, **fields), progress=progress
        )

    def inpaint(
        self, image: Any, mask: Any, prompt: str = "", *, progress: bool = True, **fields: Any
    ) -> Result:
        return self.generate(
            make_request("inpaint", image=image, mask=mask, prompt=prompt, **fields),
            progress=progress,
        )

    def unconditional(self, *, progress: bool = True, **fields: Any) -> Result:
        return self.generate(make_request("unconditional", **fields), progress=progress)

    def queue_length(self) -> int:
        """Jobs waiting (not counting the running one)."""
        with self._lock:
            return sum(1 for j in self._pending if j.state == "queued")

    @property
    def current_job(self) -> Job | None:
        return self._current

    def close(self) -> None:
        """Cancel what waits, let the running job stop, end the worker."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in pending:
            job.cancel()
        if self._current is not None:
            self._current.cancel()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)

    def pipeline(self, mode: str) -> Any:
        """The diffusers pipeline serving `mode`, built once from the shared components."""
        cls = self._pipeline_class(mode)
        with self._lock:
            pipe = self._pipes.get(cls.__name__)
            if pipe is None:
                pipe = cls.from_pipe(self._base, dtype=self.dtype)
                pipe.set_progress_bar_config(disable=True)
                self._pipes[cls.__name__] = pipe
            return pipe

    # -- internals ------------------------------------------------------------------

    def _pipeline_class(self, mode: str) -> Any:
        import diffusers as d

        if self.family == "unconditional":
            return d.DDPMPipeline if mode == "DDPM" else d.DDIMPipeline
        if self.inpainting_unet:  # a 9-channel UNet serves every mode through its own pipeline
            return (
                d.StableDiffusionXLInpaintPipeline
                if self.family == "sdxl"
                else d.StableDiffusionInpaintPipeline
            )
        table = {
            "txt2img": (d.StableDiffusionPipeline, d.StableDiffusionXLPipeline),
            "unconditional": (d.StableDiffusionPipeline, d.StableDiffusionXLPipeline),
            "img2img": (d.StableDiffusionImg2ImgPipeline, d.StableDiffusionXLImg2ImgPipeline),
            "inpaint": (d.StableDiffusionInpaintPipeline, d.StableDiffusionXLInpaintPipeline),
        }
        return table[mode][self.family == "sdxl"]

    def _emit(self, kind: str, job: Job, event: ProgressEvent | None) -> None:
        with self._lock:
            fns = list(job._callbacks) + list(self._subscribers)
        for fn in fns:
            try:
                fn(kind, job, event)
            except Exception:  # a broken listener must never break the job
                log.exception("sdkit event listener %r failed on %s", fn, kind)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                job = self._pending.popleft()
            if not job._try_start():
                continue
            self._current = job
            self._emit("started", job, None)
            try:
                result = self._execute(job)
            except _Interrupted:
                job._finish("cancelled")
                self._emit("cancelled", job, None)
            except BaseException as err:  # noqa: BLE001 - reported through the job
                log.debug("job %s failed", job.id, exc_info=True)
                job._finish("failed", error=err)
                self._emit("failed", job, None)
            else:
                if job.cancel_requested:
                    job._finish("cancelled")
                    self._emit("cancelled", job, None)
                else:
                    job._finish("done", result=result)
                    self._emit("done", job, job.progress)
            finally:
                self._current = None

    def _execute(self, job: Job) -> Result:
        req = job.request
        if job.cancel_requested:
            raise _Interrupted
        seeds = [req.seed + i for i in range(req.num_images)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with torch.inference_mode():
            if self.family == "unconditional":
                images = self._run_pixel_unconditional(job, generators)
            elif req.mode == "inpaint":
                images = self._run_inpaint(job, generators)
            else:
                images = self._run_sd(job, generators)
        if job.cancel_requested:
            raise _Interrupted
        now = time.perf_counter()
        steps = job.progress.total if job.progress else req.num_inference_steps
        total = now - (job.started_at or now)
        timings = {
            "total": total,
            "per_step": total / max(1, steps or 1),
            "queued": (job.started_at or now) - job.submitted_at,
        }
        return Result(images=images, seeds=seeds, request=req, timings=timings)

    # -- the modes --------------------------------------------------------------------

    def _scheduled(self, pipe: Any, name: str, job: Job | None = None) -> Any:
        """Put a fresh scheduler `name` (built on the model's own config) on `pipe`."""
        scheduler = schedulers.make_scheduler(name, self._scheduler_config)
        if job is not None:
            seed_noise_sampler(scheduler, job.request.seed, job.request.num_images)
        pipe.scheduler = scheduler
        if job is not None:
            fast.prepare_job(pipe, job.request.width, job.request.height, job.request.num_images)
        return pipe

    def _step_callback(self, job: Job, denoise_steps: int) -> Callable:
        """callback_on_step_end: cancel check every iteration, events as diffusers counts steps."""
        counter = itertools.count(1)
        state = {"step": 0}

        def callback(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            if job.cancel_requested:
                raise _Interrupted
            iters = pipe.num_timesteps
            order = getattr(pipe.scheduler, "order", 1)
            warmup = iters - denoise_steps * order
            if i == iters - 1 or ((i + 1) > warmup and (i + 1) % order == 0):
                state["step"] = min(next(counter), denoise_steps)
                self._progress(job, state["step"], denoise_steps, kwargs.get("latents"))
            return {}

        return callback

    def _progress(self, job: Job, step: int, total: int, latents: Any, *, pixel: bool = False):
        preview = None
        every = job.preview_every
        if every and latents is not None and (step % every == 0 or step == total):
            preview = latents_to_rgb(
                latents,
                self._preview_factors,
                self._preview_bias,
                scale=1 if pixel else self.vae_factor,
                pixel_space=pixel,
            )
        elapsed = time.perf_counter() - (job.started_at or time.perf_counter())
        event = ProgressEvent(job.id, step, total, elapsed, preview)
        job.progress = event
        self._emit("progress", job, event)

    def _common_kwargs(self, job: Job, generators: list, denoise_steps: int) -> dict:
        req = job.request
        return {
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            "width": req.width,
            "height": req.height,
            "num_images_per_prompt": req.num_images,
            "generator": generators,
            "callback_on_step_end": self._step_callback(job, denoise_steps),
            "output_type": "pil",
        }

    def _run_sd(self, job: Job, generators: list) -> list[Image.Image]:
        req = job.request
        if self.inpainting_unet:
            return self._run_sd_with_inpainting_unet(job, generators)
        pipe = self._scheduled(self.pipeline(req.mode), req.scheduler, job)
        if req.mode == "img2img":
            steps = denoise_steps(req.num_inference_steps, req.strength)
            kwargs = self._common_kwargs(job, generators, steps)
            del kwargs["width"], kwargs["height"]  # img2img pipelines take the image's size
            image = fit_image(req.image, req.width, req.height, req.resize_mode)
            return pipe(
                prompt=req.prompt,
                negative_prompt=req.negative_prompt or None,
                image=image,
                strength=req.strength,
                **kwargs,
            ).images
        kwargs = self._common_kwargs(job, generators, req.num_inference_steps)
        if req.mode == "unconditional":
            return pipe(prompt="", **kwargs).images
        return pipe(prompt=req.prompt, negative_prompt=req.negative_prompt or None, **kwargs).images

    def _run_sd_with_inpainting_unet(self, job: Job, generators: list) -> list[Image.Image]:
        """txt2img / img2img on a 9-channel UNet: its own pipeline with an all-white mask."""
        req = job.request
        pipe = self._scheduled(self.pipeline(req.mode), req.scheduler, job)
        size = (req.width, req.height)
        if req.mode == "img2img":
            image, strength = (
                fit_image(req.image, req.width, req.height, req.resize_mode),
                req.strength,
            )
        else:
            image, strength = Image.new("RGB", size, (127, 127, 127)), 1.0
        kwargs = self._common_kwargs(
            job, generators, denoise_steps(req.num_inference_steps, strength)
        )
        prompt = "" if req.mode == "unconditional" else req.prompt
        negative = None if req.mode == "unconditional" else (req.negative_prompt or None)
        return pipe(
            prompt=prompt,
            negative_prompt=negative,
            image=image,
            mask_image=Image.new("L", size, 255),
            strength=strength,
            **kwargs,
        ).images

    def _run_inpaint(self, job: Job, generators: list) -> list[Image.Image]:
        req = job.request
        work = inpaint_inputs(req)
        pipe = self._scheduled(self.pipeline("inpaint"), req.scheduler, job)
        kwargs = self._common_kwargs(
            job, generators, denoise_steps(req.num_inference_steps, req.strength)
        )
        out = pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            image=work.image,
            mask_image=work.mask,
            strength=req.strength,
            **kwargs,
        ).images
        return [inpaint_finish(req, work, im) for im in out]

    def _run_pixel_unconditional(self, job: Job, generators: list) -> list[Image.Image]:
        """UNet2DModel models: their own DDPM/DDIM pipeline; progress from a UNet hook."""
        req = job.request
        name = schedulers.canonical_name(req.scheduler)
        pipe = self.pipeline(name)
        self._scheduled(pipe, name, job)
        count = itertools.count(1)

        def hook(module: Any, args: tuple, output: Any) -> None:
            if job.cancel_requested:
                raise _Interrupted
            total = len(pipe.scheduler.timesteps)
            self._progress(job, min(next(count), total), total, args[0], pixel=True)

        handle = pipe.unet.register_forward_hook(hook)
        try:
            return pipe(
                batch_size=req.num_images,
                generator=generators,
                num_inference_steps=req.num_inference_steps,
                output_type="pil",
            ).images
        finally:
            handle.remove()


_MODES = ("txt2img", "img2img", "inpaint", "unconditional")


def make_request(mode: str, **fields: Any) -> Request:
    """A Request from keyword arguments; an unknown keyword is a `RequestError` naming it."""
    names = [f.name for f in dataclasses.fields(Request)]
    for key in fields:
        if key not in names or key == "mode":
            raise RequestError(
                key, f"unknown field; known fields: {', '.join(n for n in names if n != 'mode')}"
            )
    return Request(mode=mode, **fields)


def seed_noise_sampler(scheduler: Any, seed: int, n: int) -> None:
    """Seed the Brownian-tree noise of the DPM++ SDE scheduler from the request's seeds.

    diffusers' DPMSolverSDEScheduler otherwise seeds it from torch's global RNG, so one
    seed would not give one image; per-image seeds keep image i equal to a run at seed + i.
    """
    if hasattr(scheduler, "noise_sampler_seed") and scheduler.noise_sampler_seed is None:
        scheduler.noise_sampler_seed = [seed + i for i in range(n)]


def denoise_steps(num_inference_steps: int, strength: float) -> int:
    """Steps diffusers actually runs for `strength` (its get_timesteps rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


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

    original = req.image.convert("RGB")
    soft = masks.prepare_mask(req.mask, req.grow, req.mask_blur)
    size = (req.width, req.height)
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

    original = req.image.convert("RGB")
    if work.box is not None:
        full = masks.paste_back(original, generated, work.box)
    elif generated.size != original.size:
        full = generated.resize(original.size, Image.Resampling.LANCZOS)
    else:
        full = generated
    return masks.composite(original, full, work.soft_mask)
