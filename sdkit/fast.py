"""Speed options for a loaded diffusers pipeline (issue 7).

The engine calls `apply_speed_options(pipe, device=..., dtype=..., compile=...)` once
after loading, and `prepare_job(pipe, width, height, batch)` before each job. Options
that are free are on by default; the ones that cost start-up time are opt-in.

What is applied, and why:

* **Precision.** The dtype is the engine's choice (`sdkit.models.resolve_dtype`: fp16 on
  accelerators, fp32 on CPU, where this project's benchmark found bf16 autocast slower on
  AVX2-only CPUs, benchmarks/RESULTS.md).
* **Attention.** diffusers 0.42 already installs `AttnProcessor2_0`
  (`torch.nn.functional.scaled_dot_product_attention`) on torch >= 2.0 (checked in
  tests/test_fast.py); we replace any classic `AttnProcessor` that something set,
  and leave special processors (IP-Adapter, custom) alone.
* **Fused QKV** (default on CUDA, opt-in elsewhere). `fuse_qkv_projections()` on the
  UNet and an `AutoencoderKL` VAE:
  one matmul for q, k and v in self-attention (k and v in cross-attention). diffusers
  keeps the unfused weights too, so the attention projections take about twice their
  memory (reported as `fused_qkv_extra_params`).
* **Channels-last** UNet and VAE memory format, on by default: Tensor-core
  convolutions want NHWC on CUDA, and on this project's AVX2 CPU it was faster in
  every run (x1.1-1.7, benchmarks/RESULTS.md).
* **VAE slicing/tiling** per job (`configure_vae_for`): slicing (one image at a
  time, same result) when the whole batch would not fit the memory budget, tiling
  (overlapping tiles blended, *changes pixels near tile seams*) only when one image
  alone would not fit.
* **No host-device syncs in the denoising loop.** Audit of diffusers 0.42.1: the
  pipeline loop iterates `scheduler.timesteps` (a device tensor) and hands each `t` to
  the scheduler. PNDM/PLMS and DDIM then index a CPU `alphas_cumprod` with it and test
  `prev_timestep >= 0`: two device->host syncs per step. Euler, Euler a, LMS and
  DPM++ sync once, at the first step (`index_for_timestep`: `nonzero().item()`).
  With `sync_free=True` (default) the scheduler keeps its timesteps on the CPU (all
  of its arithmetic is then host-only) and a UNet pre-hook moves `t` to the device
  with a non-blocking copy, which does not wait for queued GPU work. What remains in
  diffusers and is not ours to change: ancestral/SDE samplers draw step noise from the
  CPU generator and copy it over every step (our seeds rule: one seed, one image on
  every device), UniPC copies sigmas and solves a small system on the device every
  step, the inpaint pipeline re-noises the init latents with `torch.tensor([t])`
  every step, and a step callback that reads the latents back (previews) syncs by
  design. `benchmarks/gpu.py` counts the syncs with `torch.cuda.set_sync_debug_mode`.
* **Compile** (opt-in, `compile=`):
  - `"regional"`: `torch.compile` of each block diffusers' `compile_repeated_blocks()`
    would pick (the model's `_repeated_blocks`: each `BasicTransformerBlock`), done
    here block by block so each keeps its eager path; the blocks share compiled code,
    so cold start is a fraction of a whole-UNet compile.
  - `"full"`: the whole UNet forward, `fullgraph=True`,
    `mode="max-autotune-no-cudagraphs"` on CUDA (default inductor mode on CPU).
  - `"cudagraphs"`: the whole UNet forward with `mode="reduce-overhead"` (CUDA
    graphs: one launch per step instead of hundreds; CUDA only).
  All use `dynamic=False`: each shape gets its own specialised graph. The shapes
  are a small fixed set, `compile_sizes` (pixel (height, width) pairs, by default the
  model's native size) times `compile_batches` (UNet batch sizes, by default 1 and
  2: one image without and with classifier-free guidance). The first job at each
  shape of the set compiles it (once); after that, switching between sizes of the
  set never recompiles (dynamo's recompile limit is raised to cover the set). A
  shape outside the set runs the eager forward rather than stalling for a surprise
  compile; `info["compile"]["shapes"]` lists the set.
  Nothing here is process-wide: sdkit never calls `torch.compiler.set_stance` (a UNet
  hook records, per thread, whether this call's shape is in the set, and each compiled
  forward falls back to its eager original when it is not), and the raised recompile
  limits are a `torch._dynamo.config.patch` (thread-local in torch) held only while a
  compiled forward runs (`compile_scope`). Two engines in one process, or user code
  compiling its own models, see torch's settings, not ours.

Tolerance: on CPU in fp32, channels-last and fused QKV stay within 1e-4 (absolute,
on UNet outputs of unit scale) of the plain path; tests/test_fast.py checks it.
Half precision and compiled kernels change rounding, not the computation; compare
them with the plain path at the same dtype. VAE tiling is not within tolerance by
design (it only switches on where the plain path would run out of memory).

(Over 400 lines because of this page: the code is about 300 lines, one job: speed.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch

COMPILE_MODES = ("regional", "full", "cudagraphs")
DEFAULT_COMPILE_BATCHES = (1, 2)
TOLERANCE = 1e-4  # fp32, absolute, channels-last + fused QKV vs the plain path
_STATE = "_sdkit_fast"  # attribute on the UNet (shared by `from_pipe` pipelines): hooks, settings


# ------------------------------------------------------------------------- attention


def ensure_sdpa(model: Any) -> int:  # a diffusers ModelMixin (set_attn_processor)
    """Swap classic (non-SDPA) attention processors for SDPA ones; returns how many.

    Only diffusers' plain `AttnProcessor` is replaced: special processors (IP-Adapter,
    custom ones) are someone's deliberate choice and stay.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = getattr(model, "attn_processors", None)
    if not processors:
        return 0
    classic = [name for name, p in processors.items() if type(p) is AttnProcessor]
    if classic:
        model.set_attn_processor(
            {name: AttnProcessor2_0() if name in classic else p for name, p in processors.items()}
        )
    return len(classic)


def attention_kind(model: torch.nn.Module) -> str:
    """ "sdpa", "sdpa-fused", or the processor class names (JSON-safe) for `info()`."""
    names = {type(p).__name__ for p in getattr(model, "attn_processors", {}).values()}
    if names == {"AttnProcessor2_0"}:
        return "sdpa"
    if names == {"FusedAttnProcessor2_0"}:
        return "sdpa-fused"
    return ",".join(sorted(names)) or "none"


def fuse_qkv(model: torch.nn.Module) -> int:
    """Fuse q/k/v projections where diffusers supports it; returns the extra parameter count."""
    fuse = getattr(model, "fuse_qkv_projections", None)
    if fuse is None:
        return 0
    before = sum(p.numel() for p in model.parameters())
    try:
        fuse()
    except (ValueError, NotImplementedError, AttributeError):
        return 0  # e.g. added-KV attention; the model keeps its plain processors
    return sum(p.numel() for p in model.parameters()) - before


# ------------------------------------------------------------------------------- VAE


def vae_decode_bytes(pipe: Any, width: int, height: int, batch: int = 1) -> int:
    """Rough peak activation memory of one VAE decode (the full-resolution up-blocks dominate)."""
    vae = pipe.vae
    channels = vae.config.block_out_channels
    widest_full_res = channels[1] if len(channels) > 1 else channels[0]
    elem = torch.finfo(vae.dtype).bits // 8
    return 4 * batch * width * height * widest_full_res * elem


def memory_budget(device: torch.device | str) -> int:
    """Half of the memory free on `device` now (outside the denoising loop)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 4 << 30


def configure_vae_for(
    pipe: Any, width: int, height: int, batch: int, *, budget_bytes: int | None = None
) -> dict:
    """Switch VAE slicing and tiling for one job of `batch` images of `width` x `height`.

    Slicing (same pixels) when the batch does not fit `budget_bytes` but one image does;
    tiling (pixels near seams change) only when a single image does not fit.
    """
    for name, value in (("width", width), ("height", height), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive int, got {value!r}")
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return {"slicing": False, "tiling": False}
    if budget_bytes is None:
        budget_bytes = memory_budget(vae.device)
    one = vae_decode_bytes(pipe, width, height, 1)
    tiling = one > budget_bytes and hasattr(vae, "use_tiling")
    slicing = batch > 1 and one * batch > budget_bytes and hasattr(vae, "use_slicing")
    if hasattr(vae, "use_tiling"):
        vae.use_tiling = tiling
    if hasattr(vae, "use_slicing"):
        vae.use_slicing = slicing
    return {"slicing": slicing, "tiling": tiling, "estimate_bytes": one * batch}


# ------------------------------------------------------------------- sync-free steps


def make_scheduler_sync_free(scheduler: Any) -> bool:
    """Keep the scheduler's timesteps on the CPU so its per-step arithmetic never syncs.

    Idempotent; returns False for schedulers whose `set_timesteps` takes no device.
    """
    if getattr(scheduler, "_sdkit_sync_free", False):
        return True
    original = getattr(scheduler, "set_timesteps", None)
    if original is None:
        return False

    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        elif len(args) >= 2:
            args = (args[0], "cpu", *args[2:])
        return original(*args, **kwargs)

    scheduler.set_timesteps = set_timesteps
    scheduler._sdkit_sync_free = True
    return True


def _timestep_to_device(unet: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Move a host timestep to the UNet's device without waiting for queued GPU work."""
    device = unet.device
    if device.type == "cpu":
        return args, kwargs
    if len(args) >= 2 and torch.is_tensor(args[1]) and args[1].device != device:
        args = (args[0], args[1].to(device, non_blocking=True), *args[2:])
    elif torch.is_tensor(kwargs.get("timestep")) and kwargs["timestep"].device != device:
        kwargs = {**kwargs, "timestep": kwargs["timestep"].to(device, non_blocking=True)}
    return args, kwargs


# --------------------------------------------------------------------------- compile


def _compile_available(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device`, or None when it can."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs Triton (pip install triton)"
    if device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        return "torch.compile on CPU needs a C++ compiler (g++ or $CXX)"
    return None


def _latent_shapes(
    sizes: Iterable[Sequence[int]], batches: Iterable[int], factor: int
) -> set[tuple[int, int, int]]:
    shapes = set()
    for size in sizes:
        if len(size) != 2:
            raise ValueError(f"compile_sizes: expected (height, width) pairs, got {size!r}")
        h, w = (int(v) for v in size)
        if h % factor or w % factor or h <= 0 or w <= 0:
            raise ValueError(f"compile_sizes: {h}x{w} is not a positive multiple of {factor}")
        for b in batches:
            shapes.add((int(b), h // factor, w // factor))
    return shapes


# Set by the UNet's pre-hook for each call (is its shape in the compiled set?) and cleared by
# its forward hook: per thread/context, so concurrent engines never see each other's choice.
_USE_COMPILED: ContextVar[bool] = ContextVar("sdkit_fast_use_compiled", default=False)


@contextlib.contextmanager
def compile_scope(n_shapes: int) -> Iterator[None]:
    """Dynamo's recompile limits raised to cover a set of `n_shapes` shapes, for this thread
    and this call only (`config.patch` is thread-local in torch)."""
    cfg = torch._dynamo.config
    limits = {
        # each shape of the set (and, regionally, each block width) is one graph of the same code
        "recompile_limit": max(cfg.recompile_limit, 8 * n_shapes),
        "accumulated_recompile_limit": max(cfg.accumulated_recompile_limit, 64 * n_shapes),
    }
    with cfg.patch(limits):
        yield


def _either(
    eager: Callable[..., Any], compiled: Callable[..., Any], n_shapes: int
) -> Callable[..., Any]:
    """A forward that runs `compiled` (in a `compile_scope`) during a UNet call whose shape is
    in the set, else `eager`: a shape outside the set never compiles, and no global stance
    is needed to say so."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not _USE_COMPILED.get():
            return eager(*args, **kwargs)
        with compile_scope(n_shapes):
            return compiled(*args, **kwargs)

    return forward


def _compile_unet(unet: Any, mode: str, device: torch.device, n_shapes: int) -> dict:
    """Compile in place: the repeated blocks' forwards (regional) or the UNet's own forward
    become `_either` dispatchers."""
    if mode == "regional":
        # the blocks diffusers' `compile_repeated_blocks` would pick, compiled one by one here
        # so that each can take its eager path for a shape outside the set
        names = tuple(getattr(unet, "_repeated_blocks", ()))
        blocks = [m for m in unet.modules() if type(m).__name__ in names]
        if not blocks:
            raise ValueError(
                f"compile: 'regional' found no repeated blocks in {type(unet).__name__}"
            )
        for block in blocks:
            eager = block.forward
            compiled = torch.compile(eager, fullgraph=True, dynamic=False)
            block.forward = _either(eager, compiled, n_shapes)
        return {"inductor_mode": "default", "compiled": list(names)}
    if mode == "cudagraphs":
        inductor_mode = "reduce-overhead"
    else:
        inductor_mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"
    original = unet.forward
    compiled = torch.compile(original, fullgraph=True, dynamic=False, mode=inductor_mode)
    if mode == "cudagraphs":
        compiled = _graph_safe(compiled)
    unet.forward = _either(original, compiled, n_shapes)
    return {"inductor_mode": inductor_mode, "compiled": [f"{type(unet).__name__}.forward"]}


def _graph_safe(compiled: Any) -> Any:
    """CUDA-graph outputs are overwritten by the next replay; schedulers keep past outputs
    (PNDM's `ets`, DPM++'s history), so hand them a copy (one latent-sized copy per step)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.clone() if torch.is_tensor(o) else o for o in out)
        if torch.is_tensor(getattr(out, "sample", None)):
            out.sample = out.sample.clone()
        return out

    return forward


# ----------------------------------------------------------------------------- apply


def apply_speed_options(
    pipe: Any,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    compile: str | bool | None = None,
    channels_last: bool = True,
    fused_qkv: bool | None = None,
    sync_free: bool = True,
    compile_sizes: Iterable[Sequence[int]] | None = None,
    compile_batches: Iterable[int] = DEFAULT_COMPILE_BATCHES,
) -> dict:
    """Apply the speed options to a loaded pipeline in place; returns what was applied (JSON-safe).

    `compile`: None/False/"off" (default), True (= "regional"), "regional", "full" or
    "cudagraphs". `fused_qkv=None` means on for CUDA, off elsewhere (on this project's
    AVX2 CPU it showed no gain beyond noise; channels-last did: benchmarks/RESULTS.md).
    """
    if compile is True:
        compile = "regional"
    if compile in (None, False, "off"):
        compile = None
    elif compile not in COMPILE_MODES:
        raise ValueError(
            f"compile: must be one of None, 'off', {', '.join(map(repr, COMPILE_MODES))}; got {compile!r}"
        )
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: must be a floating torch.dtype, got {dtype!r}")
    if compile == "cudagraphs" and device.type != "cuda":
        raise ValueError(f"compile: 'cudagraphs' needs a CUDA device, got {device}")
    if compile is not None and (why := _compile_available(device)):
        raise RuntimeError(f"compile={compile!r}: {why}")
    unet = getattr(pipe, "unet", None)
    applied = _state(pipe)
    if applied is not None:  # e.g. a `from_pipe` pipeline sharing an already sped-up UNet
        return {**applied["info"], "already_applied": True}

    if _needs_move(pipe, device, dtype):
        pipe.to(device=device, dtype=dtype)
    info: dict[str, Any] = {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}

    models = [m for m in (unet, getattr(pipe, "vae", None)) if m is not None]
    if fused_qkv is None:
        fused_qkv = device.type == "cuda"
    for m in models:
        ensure_sdpa(m)
    extra = sum(fuse_qkv(m) for m in models) if fused_qkv else 0
    info["fused_qkv"] = bool(fused_qkv and extra > 0)
    info["fused_qkv_extra_params"] = extra
    info["attention"] = attention_kind(unet) if unet is not None else "none"

    if channels_last:
        for m in models:
            m.to(memory_format=torch.channels_last)
    info["channels_last"] = bool(channels_last)

    info["sync_free"] = bool(sync_free and make_scheduler_sync_free(pipe.scheduler))
    info["vae"] = "slicing/tiling chosen per job"

    state: dict[str, Any] = {
        "sync_free": info["sync_free"],
        # on a CPU no queued work is waited for, and `unet.device` walks every module
        # (diffusers' offload checks): ~10 ms per UNet call of a small model, for nothing
        "move_timestep": info["sync_free"] and torch.device(device).type != "cpu",
        "shapes": None,
        "hooks": [],
        "info": info,
    }
    if compile is not None and unet is not None:
        factor = getattr(pipe, "vae_scale_factor", 1)  # diffusers' own; pixel-space pipelines: 1
        if compile_sizes is None:
            side = unet.config.sample_size * factor
            compile_sizes = [(side, side)]
        compile_sizes = [tuple(int(v) for v in s) for s in compile_sizes]
        compile_batches = [int(b) for b in compile_batches]
        state["shapes"] = _latent_shapes(compile_sizes, compile_batches, factor)
        details = _compile_unet(unet, compile, device, len(state["shapes"]))
        info["compile"] = {
            "mode": compile,
            **details,
            "dynamic": False,
            "sizes": [list(s) for s in compile_sizes],
            "batches": compile_batches,
            "shapes": [list(s) for s in sorted(state["shapes"])],  # (batch, latent h, latent w)
            "outside_set": "eager",
        }
    else:
        info["compile"] = None

    if unet is not None:
        state["hooks"].append(
            unet.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True)
        )
        if state["shapes"] is not None:
            # also after an exception (a cancelled job): the choice never outlives the call
            state["hooks"].append(unet.register_forward_hook(_end_call, always_call=True))
        setattr(unet, _STATE, state)
    return dict(info)


def _state(pipe: Any) -> dict | None:
    return getattr(getattr(pipe, "unet", None), _STATE, None)


def _needs_move(pipe: Any, device: torch.device, dtype: torch.dtype) -> bool:
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            for p in component.parameters():
                if p.device.type != device.type or p.dtype != dtype:
                    return True
                break
    return False


def _make_pre_hook(state: dict) -> Callable[..., tuple[tuple, dict]]:
    def pre_hook(unet: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if state.get("move_timestep", state["sync_free"]):
            args, kwargs = _timestep_to_device(unet, args, kwargs)
        if state["shapes"] is not None:
            b, _, h, w = (args[0] if args else kwargs["sample"]).shape
            _USE_COMPILED.set((b, h, w) in state["shapes"])
        return args, kwargs

    return pre_hook


def _end_call(unet: torch.nn.Module, args: tuple, output: Any) -> None:
    _USE_COMPILED.set(False)


def prepare_job(
    pipe: Any, width: int, height: int, batch: int, *, budget_bytes: int | None = None
) -> dict:
    """Per-job settings: VAE slicing/tiling, and a sync-free scheduler if it was swapped."""
    state = _state(pipe)
    out = configure_vae_for(pipe, width, height, batch, budget_bytes=budget_bytes)
    if state is not None and state["sync_free"]:
        out["sync_free"] = make_scheduler_sync_free(pipe.scheduler)
    return out
