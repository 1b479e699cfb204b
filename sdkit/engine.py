"""`Engine`: one loaded model on one device serving every registered mode it can.

The engine loads weights once and builds the per-mode diffusers pipelines from the same
components with `from_pipe` (no second copy, no reload when switching). A single worker
thread runs jobs in queue-policy order (`sdkit.jobs.QueuePolicy`: back, front, replace)
through the mode registry (`sdkit.modes`); events go to listeners on a separate
dispatcher thread (`sdkit.jobs`), so no listener runs on the worker.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdkit import adapter_plan, fast, modes, prompt_cache, schedulers
from sdkit.adapter_loading import AdapterState
from sdkit.adapters import AdapterFolders
from sdkit.jobs import (
    Dispatcher,
    EventFn,
    EventKind,
    Interrupted,
    Job,
    JobCancelled,
    JobQueue,
    JobState,
    ProgressEvent,
    QueuePolicy,
)
from sdkit.models import LoadedModel, load_model
from sdkit.preview import factors_for, latents_to_rgb
from sdkit.request import MAX_PIXELS, RANGES, Request, RequestError, filled, make_request
from sdkit.result import Result
from sdkit.runners import RunContext, cancel_points, denoise_steps

log = logging.getLogger(__name__)

__all__ = ["Engine", "Job", "JobCancelled", "ProgressEvent", "QueuePolicy", "make_request"]

_UNCONDITIONAL_SCHEDULERS = ["DDPM", "DDIM"]


class Engine:
    """One model on one device. Every mode it serves shares its components."""

    def __init__(
        self,
        spec: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        config: str | Path | None = None,
        compile: bool | None = None,
        lora_dirs: Iterable[str | Path] | None = None,
        embedding_dirs: Iterable[str | Path] | None = None,
        control_dirs: Iterable[str | Path] | None = None,
    ):
        model = load_model(spec, device, dtype, config=config)
        dirs = {"lora_dirs": lora_dirs, "embedding_dirs": embedding_dirs}
        self._setup(model, compile=compile, control_dirs=control_dirs, **dirs)

    @classmethod
    def from_loaded(
        cls,
        model: LoadedModel,
        *,
        compile: bool | None = None,
        lora_dirs: Iterable[str | Path] | None = None,
        embedding_dirs: Iterable[str | Path] | None = None,
        control_dirs: Iterable[str | Path] | None = None,
    ) -> Engine:
        """An engine around an already loaded model (tests, embedding applications)."""
        self = cls.__new__(cls)
        dirs = {"lora_dirs": lora_dirs, "embedding_dirs": embedding_dirs}
        self._setup(model, compile=compile, control_dirs=control_dirs, **dirs)
        return self

    def _setup(self, model: LoadedModel, *, compile: bool | None, **dirs: Any) -> None:
        self.model = model
        local = Path(model.spec) if model.spec != "embedded" else None
        self.adapters = AdapterFolders(
            **dirs,
            model_path=local if local is not None and local.exists() else None,
            embedded=model.spec == "embedded",
        )
        self.spec = model.spec
        self.device = model.device
        self.dtype = model.dtype
        self.family = model.family
        base = model.pipe
        self.inpainting_unet = self.family != "unconditional" and base.unet.config.in_channels == 9
        self.vae_factor = 1 if self.family == "unconditional" else int(base.vae_scale_factor)
        # diffusers' text pipelines insist on multiples of 8 even when the VAE factor is smaller.
        self.size_multiple = 1 if self.family == "unconditional" else max(8, self.vae_factor)
        self.scheduler_config = dict(base.scheduler.config)
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
        self._adapter_state = AdapterState()
        self.prompt_cache = prompt_cache.PromptCache()  # same prompt, same tensors: encoded once
        tokenizer = getattr(base, "tokenizer", None)  # its words before any embedding is added
        self.base_vocabulary = frozenset(tokenizer.get_vocab() if tokenizer is not None else ())
        self._lock = threading.RLock()
        self._queue = JobQueue()
        self._events = Dispatcher(f"sdkit-events-{id(self):x}")
        self._post = self._events.post
        self._current: Job | None = None
        self._worker = threading.Thread(
            target=self._work, name=f"sdkit-engine-{id(self):x}", daemon=True
        )
        self._worker.start()

    @property
    def _scheduler_config(self) -> dict:  # older name, still read by benchmarks/overhead.py
        return self.scheduler_config

    @property
    def _closed(self) -> bool:
        return self._queue.closed

    def __repr__(self) -> str:
        return f"<sdkit.Engine {self.model.name} {self.family} on {self.device} {self.dtype}>"

    # -- public API -----------------------------------------------------------------

    def served_modes(self) -> list[modes.ModeSpec]:
        """The registered modes this engine's model family can run."""
        return [s for s in modes.registered() if s.serves(self.family)]

    def ranges(self) -> dict[str, list[float]]:
        """[lo, hi] of every numeric Request field for this model (what `check` enforces)."""
        out = {k: [lo, hi] for k, (lo, hi) in RANGES.items()}
        if self.family == "unconditional":
            size = self.defaults["width"]
            out["width"] = out["height"] = [size, size]
        else:
            for name in ("width", "height"):
                f = self.size_multiple
                out[name] = [f, RANGES[name][1] // f * f]
        return out

    def info(self) -> dict:
        """JSON-safe description (the bridge, the widget and the editors show and check it)."""
        return {
            "spec": self.spec,
            "name": self.model.name,
            "family": self.family,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_factor": self.vae_factor,
            "size_multiple": self.size_multiple,
            "inpainting_unet": self.inpainting_unet,
            "defaults": dict(self.defaults),
            "scheduler_names": list(self.scheduler_names),
            "modes": [s.describe() for s in self.served_modes()],
            "ranges": self.ranges(),
            "max_pixels": MAX_PIXELS,  # width x height x num_images of one job
            **self._adapter_names(),
        }

    def _adapter_names(self) -> dict[str, list[str]]:
        """Names (never paths) of the LoRAs, embeddings and ControlNet models found."""
        text = self.family != "unconditional"
        return {
            "loras": self.adapters.names("lora") if text else [],
            "embeddings": self.adapters.names("embedding") if text else [],
            "controls": self.adapters.names("control") if text else [],
        }

    def check(self, request: Request) -> Request:
        """The request as it would run (validated; size from the input image, model defaults
        and a seed filled in), or the `RequestError` that `submit` would raise. Limits
        (pixels per job, steps) apply to this filled request. `request` is not changed,
        except that image/mask given as paths or bytes are loaded in place."""
        if not isinstance(request, Request):
            raise RequestError(
                "request", f"expected an sdkit.Request, got {type(request).__name__}"
            )
        request.validate(vae_factor=self.size_multiple, scheduler_names=self.scheduler_names)
        spec = modes.get(request.mode)
        if not spec.serves(self.family):
            allowed = ", ".join(str(s.name) for s in self.served_modes())
            raise RequestError(
                "mode",
                f"{self.model.name} ({self.family}) cannot run {request.mode}; allowed: {allowed}",
            )
        req = dataclasses.replace(request, extra=dict(request.extra))
        image = req.image if "image" in spec.inputs else None
        if image is not None and not ("only_masked" in spec.fields and req.only_masked):
            # diffusers' own rule: work at the input's size, rounded down to the size multiple.
            w, h = image.size
            f = self.size_multiple
            if req.width is None:
                req.width = max(f, w - w % f)
            if req.height is None:
                req.height = max(f, h - h % f)
        g = spec.forced.get("guidance_scale")
        if g is not None and req.guidance_scale is not None and req.guidance_scale > g:
            raise RequestError(
                "guidance_scale", f"{req.mode} generation runs without guidance; use 0, 1 or None"
            )
        for name, value in spec.forced.items():
            setattr(req, name, value)
        req = req.with_defaults(self.defaults)
        if self.family == "unconditional":
            size = self.defaults["width"]
            for name in ("width", "height"):
                if getattr(req, name) != size:
                    raise RequestError(
                        name,
                        f"this unconditional model draws {size}x{size} only, got {getattr(req, name)}",
                    )
        steps = filled(req.num_inference_steps, "num_inference_steps")
        if "strength" in spec.fields and denoise_steps(steps, req.strength) < 1:
            raise RequestError(
                "strength",
                f"{req.strength} x {steps} steps leaves no denoising step; "
                f"use strength >= {1 / steps:.3g} or more steps",
            )
        if spec.check is not None:
            req = spec.check(req, self)
        adapter_plan.check(req, self)  # LoRAs and embeddings; writes their hashes to extra
        if req.seed is None:
            req.seed = random.randrange(0, 2**32 - req.num_images)
        if req.model is None:
            req.model = self.model.name
        req.validate(vae_factor=self.size_multiple, scheduler_names=self.scheduler_names)
        return req

    def submit(
        self,
        request: Request,
        *,
        preview_every: int = 1,
        callback: EventFn | None = None,
        policy: QueuePolicy | str = QueuePolicy.BACK,
        source: Hashable | None = None,
        checked: bool = False,
    ) -> Job:
        """Check (raising `RequestError`) and queue; `preview_every=0` means no previews.

        `policy` (`QueuePolicy`): "back", "front", or "replace", which supersedes the
        waiting and running job of the same `source` (any hashable: one live stream).
        `checked`: `request` is what this engine's `check` just returned, so it is not
        checked again (a Ray replica starting the job it checked saves that time).
        The job's events ("queued" first) reach listeners only after this returns it."""
        policy = QueuePolicy.parse(policy)
        try:
            hash(source)
        except TypeError:
            raise RequestError("source", f"must be hashable, got {type(source).__name__}") from None
        if policy == QueuePolicy.REPLACE and source is None:
            raise RequestError("source", "policy 'replace' needs a source (e.g. a stream name)")
        req = request if checked else self.check(request)
        if self._closed:
            raise RuntimeError("this engine is closed")
        job = Job(req, self._post, preview_every, policy=policy, source=source)
        if callback is not None:
            job.add_callback(callback)
        try:
            self._post(EventKind.QUEUED, job, None)  # before the worker can see it
            if not self._queue.put(job):
                job.cancel()
                raise RuntimeError("this engine is closed")
            return job
        finally:
            job._handed_out.set()

    def subscribe(self, fn: EventFn) -> Callable[[], None]:
        """`fn(kind, job, event)` for every job of this engine, on the dispatcher thread;
        returns the unsubscribe."""
        return self._events.subscribe(fn)

    def generate(self, request: Request, *, progress: bool = True) -> Result:
        """Run one request to the end with a tqdm bar; Ctrl-C cancels the job."""
        request = self.check(request)  # a bad request fails before the bar appears
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=None, desc=str(request.mode), unit="step", leave=False)

        def on_event(kind: EventKind, job: Job, event: ProgressEvent | None) -> None:
            if bar is not None and event is not None:
                bar.total = event.total
                bar.n = event.step
                bar.refresh()

        job = self.submit(request, preview_every=0, callback=on_event)
        try:
            result = job.result()
            job.wait_delivered(10)  # the bar shows the last step before it closes
            return result
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

    def upscale(
        self,
        image: Any,
        prompt: str = "",
        *,
        factor: float = 2.0,
        strength: float = 0.3,  # sdkit.tiled_upscale.DEFAULT_STRENGTH: tiles want a light touch
        progress: bool = True,
        **fields: Any,
    ) -> Result:
        """Tiled upscale (`sdkit.tiled_upscale`): Lanczos x `factor`, then img2img per tile."""
        req = make_request(
            "upscale",
            image=image,
            prompt=prompt,
            upscale_factor=factor,
            strength=strength,
            **fields,
        )
        return self.generate(req, progress=progress)

    def outpaint(self, image: Any, prompt: str = "", *, progress: bool = True, **f: Any) -> Result:
        """Extend the canvas by left/right/top/bottom px and paint it (`sdkit.outpainting`)."""
        req = make_request("outpaint", image=image, prompt=prompt, **f)
        return self.generate(req, progress=progress)

    def queue_length(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return self._queue.waiting()

    @property
    def current_job(self) -> Job | None:
        return self._current

    def close(self) -> None:
        """Cancel what waits, let the running job stop, end the worker and the dispatcher."""
        for job in self._queue.close():
            job.cancel()
        if self._current is not None:
            self._current.cancel()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)
        self._events.close()

    def pipeline(self, name: str) -> Any:
        """The diffusers pipeline serving mode `name` (or the diffusers class `name`), built
        once from the shared components."""
        cls_name = self._pipeline_class_name(name)
        with self._lock:
            pipe = self._pipes.get(cls_name)
            if pipe is None:
                import diffusers

                pipe = getattr(diffusers, cls_name).from_pipe(self._base, dtype=self.dtype)
                pipe.set_progress_bar_config(disable=True)
                self._pipes[cls_name] = pipe
            return pipe

    def preview(self, latents: Any, *, pixel: bool = False) -> Image.Image:
        """A cheap RGB view of `latents` (or of pixel-space samples) at image size."""
        return latents_to_rgb(
            latents,
            self._preview_factors,
            self._preview_bias,
            scale=1 if pixel else self.vae_factor,
            pixel_space=pixel,
        )

    # -- internals ------------------------------------------------------------------

    def _pipeline_class_name(self, name: str) -> str:
        if name not in {str(s.name) for s in modes.registered()}:
            return name  # a diffusers class name
        spec = modes.get(name)
        if self.inpainting_unet:  # a 9-channel UNet serves every mode through its own pipeline
            spec = modes.get(modes.Mode.INPAINT)
        try:
            return spec.pipelines[self.family]
        except KeyError:
            raise RequestError(
                "mode", f"{name} has no diffusers pipeline for a {self.family} model"
            ) from None

    def _work(self) -> None:
        while (job := self._queue.take()) is not None:
            if not job._try_start():
                self._queue.finished(job)
                continue
            self._current = job
            self._post(EventKind.STARTED, job, None)
            try:
                result = self._execute(job)
            except Interrupted:
                self._end(job, JobState.CANCELLED)
            except BaseException as err:  # noqa: BLE001 - reported through the job
                log.debug("job %s failed", job.id, exc_info=True)
                self._end(job, JobState.FAILED, error=err)
            else:
                if job.cancel_requested:
                    self._end(job, JobState.CANCELLED)
                else:
                    self._end(job, JobState.DONE, result=result)
            finally:
                self._current = None
                self._queue.finished(job)

    def _end(self, job: Job, state: JobState, **outcome: Any) -> None:
        """Finish the job first (so `result()` works in its listeners), then tell them."""
        job._finish(state, **outcome)
        kind = EventKind(state.value)
        self._post(kind, job, job.progress if kind == EventKind.DONE else None)

    def _execute(self, job: Job) -> Result:
        """Run `job` through its mode's runner; cancel is checked before the run, at every
        step and unit of UNet/VAE-decoder work (`cancel_points`), after the decode, between
        batch items."""
        req = job.request
        if job.cancel_requested:
            raise Interrupted
        spec = modes.get(req.mode)
        seeds = [filled(req.seed, "seed") + i for i in range(req.num_images)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        ctx = RunContext(self, job, generators)
        vae = getattr(self._base, "vae", None)
        unet = getattr(self._base, "unet", None)
        used = adapter_plan.plan(req, self)
        ctx.adapters_key = prompt_cache.adapters_key(used.loras)
        with torch.no_grad(), self._adapter_state.applied(self._base, used.loras, used.embeddings):
            with torch.inference_mode(), cancel_points(ctx, unet, getattr(vae, "decoder", None)):
                images = spec.run(ctx)
        ctx.check_cancel()
        now = time.perf_counter()
        steps = job.progress.total if job.progress else req.num_inference_steps
        total = now - (job.started_at or now)
        timings = {
            "total": total,
            "per_step": total / max(1, steps or 1),
            "queued": (job.started_at or now) - job.submitted_at,
        }
        return Result(images=images, seeds=seeds, request=req, timings=timings)
