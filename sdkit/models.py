"""Resolve a model spec to loaded diffusers components, offline and explicitly.

A spec is one of: ``None``/``"embedded"``/``"default"`` (the model shipped in
``sdkit/embedded/model``), a local diffusers folder, a single-file ``.safetensors``
or ``.ckpt`` checkpoint, or a Hugging Face hub id (read from the local cache only).
Nothing here ever makes a network call: a missing file is a `ModelNotFoundError`
whose message says how to get it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded" / "model"
EMBEDDED_NAMES = (None, "embedded", "default")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Per-family defaults, used when a model folder has no sdkit.json.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd1": {"width": 512, "height": 512, "num_inference_steps": 50, "guidance_scale": 7.5},
    "sd2": {"width": 512, "height": 512, "num_inference_steps": 50, "guidance_scale": 7.5},
    "sdxl": {"width": 1024, "height": 1024, "num_inference_steps": 50, "guidance_scale": 5.0},
    "unconditional": {"num_inference_steps": 1000, "guidance_scale": 1.0},
}


class ModelNotFoundError(FileNotFoundError):
    """The spec names weights that are not on this machine (we never download silently)."""


@dataclass
class LoadedModel:
    """The base pipeline plus what the engine needs to know about it."""

    pipe: Any  # diffusers.DiffusionPipeline: the txt2img (or unconditional) pipeline
    spec: str  # normalised spec: "embedded", an absolute path, or a hub id
    name: str  # short name for infotext "Model:"
    family: str  # "sd1" | "sd2" | "sdxl" | "unconditional"
    device: torch.device
    dtype: torch.dtype
    defaults: dict[str, Any]
    latent_rgb_factors: list[list[float]] | None = None
    latent_rgb_bias: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def normalise_spec(spec: str | Path | None) -> str:
    """The cache key for a spec: "embedded", an absolute path, or a hub id."""
    if spec in EMBEDDED_NAMES:
        return "embedded"
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    return text


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Explicit device, else cuda > mps > cpu."""
    if device is not None and str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Explicit dtype, else fp16 on a GPU and fp32 on the CPU (fp16 matmuls crawl there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and str(dtype) != "auto":
        key = str(dtype).removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype: unknown {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
        return _DTYPES[key]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' loading chatter ("Loading pipeline components"
    bars, the torchvision fallback warnings) for the duration of a load, then put both
    libraries' verbosity and progress-bar settings back as they were: a user who turned
    them on, or off, keeps that. Errors still print. Generation progress is not affected
    (pipelines have their own bar, and the engine its own)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    try:
        for lib, _, _ in saved:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def load_model(
    spec: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    config: str | Path | None = None,
) -> LoadedModel:
    """Load the base pipeline for `spec` from local files only, quietly (`quiet_loading`).

    `config` is a local diffusers folder whose configuration a single-file checkpoint
    uses (found next to the checkpoint when not given).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = normalise_spec(spec)
    with quiet_loading():
        pipe, name, meta_dir = _load_pipeline(key, dt, config)
    pipe = pipe.to(dev)
    family = detect_family(pipe)
    meta = _read_sdkit_json(meta_dir)
    defaults = dict(FAMILY_DEFAULTS[family])
    if family == "sd2" and _prediction_type(pipe) == "v_prediction":
        defaults.update(width=768, height=768)
    if family == "unconditional":
        size = pipe.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        defaults.update(width=size, height=size)
        if type(pipe.scheduler).__name__ == "DDIMScheduler":
            defaults["num_inference_steps"] = 50
    defaults["scheduler"] = type(pipe.scheduler).__name__
    defaults.update(meta.get("defaults", {}))
    # sdkit.json may give a latent -> RGB fit for previews, top level or under "preview"
    preview = {**meta, **(meta.get("preview") or {})}
    return LoadedModel(
        pipe=pipe,
        spec=key,
        name=name,
        family=family,
        device=dev,
        dtype=dt,
        defaults=defaults,
        latent_rgb_factors=preview.get("latent_rgb_factors"),
        latent_rgb_bias=preview.get("latent_rgb_bias"),
        extra={k: v for k, v in meta.items() if k != "defaults"},
    )


def _load_pipeline(
    key: str, dt: torch.dtype, config: str | Path | None
) -> tuple[Any, str, Path | None]:
    """(pipeline, short name, folder holding its sdkit.json) for a normalised spec."""
    meta_dir: Path | None
    if key == "embedded":
        folder = EMBEDDED_DIR
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the embedded default model is missing ({folder} has no model_index.json). "
                "Train and export it with `python -m sdkit.embedded.train`, "
                "or pass model=<a local diffusers folder, checkpoint file or hub id>."
            )
        pipe = _load_folder(folder, dt)
        name = "sdkit-embedded"
        meta_dir = folder
    else:
        path = Path(key)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelNotFoundError(
                    f"{path} is a folder but not a diffusers pipeline (no model_index.json)"
                )
            pipe = _load_folder(path, dt)
            name, meta_dir = path.name, path
        elif path.is_file():
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
                raise ModelNotFoundError(
                    f"{path}: not a checkpoint; expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
                )
            pipe, meta_dir = _load_single_file(path, dt, config)
            name = path.stem
        elif _HUB_ID.match(key):
            pipe = _load_hub(key, dt)
            name, meta_dir = key, None
        else:
            raise ModelNotFoundError(
                f"model {key!r}: no such file or folder, and not a hub id (owner/name)"
            )
    return pipe, name, meta_dir


def detect_family(pipe: Any) -> str:
    """sd1 / sd2 / sdxl / unconditional from the pipeline's own components."""
    from diffusers import UNet2DModel

    if isinstance(pipe.unet, UNet2DModel):
        return "unconditional"
    if getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__:
        return "sdxl"
    cross = pipe.unet.config.cross_attention_dim
    if cross == 1024 or _prediction_type(pipe) == "v_prediction":
        return "sd2"
    return "sd1"


def _prediction_type(pipe: Any) -> str:
    return getattr(pipe.scheduler.config, "prediction_type", "epsilon")


def _read_sdkit_json(folder: Path | None) -> dict[str, Any]:
    if folder is None or not (folder / "sdkit.json").is_file():
        return {}
    try:
        return json.loads((folder / "sdkit.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(f"{folder / 'sdkit.json'}: unreadable ({err})") from err


def _pipeline_class(folder: Path) -> Any:
    """The diffusers class named by a folder's model_index.json."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name", "StableDiffusionPipeline")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelNotFoundError(f"{folder}: pipeline class {name!r} is not in diffusers")
    return cls


def _load_folder(folder: Path, dtype: torch.dtype) -> Any:
    cls = _pipeline_class(folder)
    try:
        return cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except OSError as err:
        raise ModelNotFoundError(f"{folder}: cannot load the pipeline ({err})") from err


def _config_next_to(path: Path) -> Path | None:
    """A diffusers folder beside a checkpoint: `<stem>/` or the checkpoint's own folder."""
    for candidate in (path.with_suffix(""), path.parent / f"{path.stem}-config", path.parent):
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def _load_single_file(
    path: Path, dtype: torch.dtype, config: str | Path | None
) -> tuple[Any, Path]:
    from diffusers import StableDiffusionPipeline

    cfg = Path(config).expanduser().resolve() if config is not None else _config_next_to(path)
    if cfg is not None:
        if not (cfg / "model_index.json").is_file():
            raise ModelNotFoundError(f"config {cfg}: not a diffusers folder (no model_index.json)")
        cls = _pipeline_class(cfg)
        try:
            pipe = cls.from_single_file(
                str(path), config=str(cfg), local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError, KeyError) as err:
            raise ModelNotFoundError(f"{path}: cannot load with config {cfg} ({err})") from err
        return pipe, cfg
    # No local config: infer the family from the keys and use its configuration from the
    # local Hugging Face cache only. (diffusers' own fallback would download it: we check
    # the cache first and hand diffusers a local folder.)
    from diffusers.loaders.single_file_utils import (
        fetch_diffusers_config,
        load_single_file_checkpoint,
    )
    from huggingface_hub import snapshot_download

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot infer"
        raise ModelNotFoundError(
            f"{path}: cannot infer the model family from its keys ({err}); "
            "pass config=<a local diffusers folder of the same family>"
        ) from err
    del checkpoint
    try:
        cached = Path(
            snapshot_download(
                repo,
                local_files_only=True,
                allow_patterns=["*.json", "*/*.json", "*.txt", "*/*.txt"],
            )
        )
    except Exception as err:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        raise ModelNotFoundError(
            f"{path}: looks like {repo}, whose configuration is not on this machine, and sdkit "
            "never downloads silently. Pass config=<a local diffusers folder of the same "
            f"family> (or put one next to the file as {path.with_suffix('')}/), or fetch the "
            "configuration once on a networked machine: "
            f"`huggingface-cli download {repo} --include '*.json' '*.txt'`"
        ) from err
    cls = (
        _pipeline_class(cached)
        if (cached / "model_index.json").is_file()
        else StableDiffusionPipeline
    )
    try:
        pipe = cls.from_single_file(
            str(path), config=str(cached), local_files_only=True, dtype=dtype
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelNotFoundError(
            f"{path}: cannot load with the cached {repo} config ({err})"
        ) from err
    return pipe, path.parent


def _load_hub(repo: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline
    from huggingface_hub import try_to_load_from_cache

    how = (
        f"hub model {repo!r} is not in the local Hugging Face cache and sdkit never downloads "
        f"silently. Get it with `huggingface-cli download {repo}` (on a networked machine; "
        "copy the cache and point HF_HOME at it), or pass a local folder or checkpoint file "
        "(if you meant a local path: there is no such file or folder)."
    )
    cached = try_to_load_from_cache(repo, "model_index.json")
    if not isinstance(cached, str):
        raise ModelNotFoundError(how)
    try:
        return DiffusionPipeline.from_pretrained(repo, dtype=dtype, local_files_only=True)
    except OSError as err:
        raise ModelNotFoundError(f"{how} ({err})") from err
