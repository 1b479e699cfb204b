"""ControlNet units: checking them, running them through diffusers' ControlNet pipelines, and
writing/reading them as A1111's ControlNet extension does in the infotext.

A unit is a dict `{"image", "model", "weight", "start", "end", "module", "resize_mode"}` with
the extension's meaning: `weight` is diffusers' `controlnet_conditioning_scale`, `start`/`end`
are `control_guidance_start/end` (fractions of the steps), `module` a preprocessor
(`sdkit.preprocessors`), `resize_mode` how a control image of another size is fitted (None:
the request's). Models are found by name in the engine's control folders
(`sdkit.adapters`), loaded once per engine in its dtype/device, and run through
`StableDiffusion[XL]ControlNet[Img2Img|Inpaint]Pipeline.from_pipe(the mode's pipeline)`:
the same components, no second copy; several units are diffusers' MultiControlNet.
Models and their pipelines are kept per engine (a few, least recently used dropped).

A little over 400 lines: a unit's whole life (check, find, load, run, infotext, dict) is
here, so that the runners, `Request` and `sdkit.infotext` each keep a one-line hook.
"""

from __future__ import annotations

import collections
import hashlib
import math
import numbers
import re
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkit.errors import RequestError
from sdkit.images import image_to_base64, load_image
from sdkit.preprocessors import CANNY_HIGH, CANNY_LOW, PREPROCESSORS

if TYPE_CHECKING:
    from sdkit.request import Request
    from sdkit.runners import RunContext

MODULES = tuple(PREPROCESSORS)
WEIGHTS = (0, 2)  # [lo, hi] of a unit's weight (A1111's slider)
MAX_UNITS = 4
UNIT_KEYS = ("image", "model", "weight", "start", "end", "module", "resize_mode")
DEFAULTS: dict[str, Any] = {"weight": 1.0, "start": 0.0, "end": 1.0, "module": "none"}
_RESIZE_A1111 = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
_MODULE_A1111 = {"invert": "invert (from white bg & black line)"}
_CONTROL_CLASS = {  # the mode's pipeline -> its ControlNet twin
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline": "StableDiffusionXLControlNetInpaintPipeline",
}
_CACHED_MODELS = 4  # ControlNet models (and pipelines) kept per engine, least recent dropped


# ---------------------------------------------------------------------------- checking


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_units(units: Any, mode: str, takes_control: bool) -> list[dict]:
    """The units with defaults filled and images loaded (RGB); a `RequestError` naming the
    first bad one, e.g. `control[0].weight`."""
    from sdkit.request import RESIZE_MODES

    if not isinstance(units, list):
        raise RequestError("control", f"must be a list of units, got {type(units).__name__}")
    if units and not takes_control:
        raise RequestError("control", f"{mode} takes no control units")
    if len(units) > MAX_UNITS:
        raise RequestError("control", f"at most {MAX_UNITS} units, got {len(units)}")
    out = []
    for i, unit in enumerate(units):
        where = f"control[{i}]"
        if not isinstance(unit, Mapping):
            raise RequestError(
                where, f"must be a unit {{{', '.join(UNIT_KEYS)}}}, got {unit!r:.40}"
            )
        unknown = [k for k in unit if k not in UNIT_KEYS]
        if unknown:
            raise RequestError(
                f"{where}.{unknown[0]}", f"unknown unit key; allowed: {', '.join(UNIT_KEYS)}"
            )
        u = DEFAULTS | {"resize_mode": None} | dict(unit)
        name = u.get("model")
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\:<>"):
            raise RequestError(
                f"{where}.model", f"must be a control model name (no path), got {name!r:.60}"
            )
        lo, hi = WEIGHTS
        if not _number(u["weight"]) or not lo <= u["weight"] <= hi:
            raise RequestError(
                f"{where}.weight", f"must be a number in {lo}..{hi}, got {u['weight']!r:.40}"
            )
        for key in ("start", "end"):
            if not _number(u[key]) or not 0 <= u[key] <= 1:
                raise RequestError(
                    f"{where}.{key}",
                    f"must be a number in 0..1 (a fraction of the steps), got {u[key]!r:.40}",
                )
        if u["start"] >= u["end"]:
            raise RequestError(f"{where}.start", f"must be below end ({u['start']} >= {u['end']})")
        if u["module"] not in MODULES:
            raise RequestError(
                f"{where}.module",
                f"unknown preprocessor {u['module']!r:.40}; allowed: {', '.join(MODULES)} "
                "(others need downloaded models and are not available)",
            )
        if u["resize_mode"] is not None and u["resize_mode"] not in RESIZE_MODES:
            raise RequestError(
                f"{where}.resize_mode",
                f"unknown resize mode {u['resize_mode']!r:.40}; allowed: {', '.join(RESIZE_MODES)}",
            )
        if u.get("image") is None:
            raise RequestError(f"{where}.image", "missing: a control unit needs its image")
        u["image"] = _rgb(load_image(u["image"], f"{where}.image"), u["module"])
        out.append(u)
    return out


def _rgb(image: Any, module: str) -> Any:
    """RGB; transparent pixels (an editor's control layer) become "no line": black, or white
    for `invert`, whose drawings are black lines on white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255) if module == "invert" else (0, 0, 0))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def check(request: Request, engine: Any) -> Request:
    """Engine-level checks (a mode's `ModeSpec.check`): every unit's model exists in the
    engine's control folders and fits the engine's model family."""
    for i, unit in enumerate(request.control):
        where = f"control[{i}].model"
        path = engine.adapters.find("control", unit["model"], field=where)
        config = _config_without_loading(path, where)
        if config is not None:
            check_fits(unit["model"], config, engine, where)
        _known_hashes[unit["model"]] = model_hash(engine, unit["model"])
    return request


# ---------------------------------------------------------------------------- models


def _config_without_loading(path: Path, where: str) -> dict | None:
    """What decides the family: a diffusers folder's config, or the cross-attention width
    and SDXL embedding read from a `.safetensors` header; None when it needs a load."""
    import json

    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise RequestError(
                where, f"control model {path.name!r}: bad config.json ({e})"
            ) from None
    if path.suffix.lower() != ".safetensors":
        return None
    from sdkit.adapters import safetensors_header

    try:
        header = safetensors_header(path)
    except ValueError as e:
        raise RequestError(where, f"control model {path.stem!r}: unreadable ({e})") from None
    width = next(
        (
            int(info["shape"][1])
            for key, info in header.items()
            if key.endswith("attn2.to_k.weight") and len(info.get("shape", ())) == 2
        ),
        None,
    )
    sdxl = any(k.startswith(("add_embedding.", "control_model.label_emb.")) for k in header)
    return {"cross_attention_dim": width, "addition_embed_type": "text_time" if sdxl else None}


def check_fits(name: str, config: Mapping, engine: Any, where: str) -> None:
    """A `RequestError` naming the control model and both families when `config` (the
    ControlNet's) does not fit the engine's UNet."""
    from sdkit.adapters import _WIDTH_FAMILY, family_name

    unet = engine.model.pipe.unet.config
    width, sdxl = config.get("cross_attention_dim"), config.get("addition_embed_type")
    if width is not None and (
        width != unet.cross_attention_dim or sdxl != unet.get("addition_embed_type")
    ):
        family = "sdxl" if sdxl == "text_time" else _WIDTH_FAMILY.get(width)
        raise RequestError(
            where,
            f"control model {name!r} is for {family_name(family, width)} (cross-attention "
            f"width {width}) but {engine.model.name} is {family_name(engine.family)} "
            f"(cross-attention width {unet.cross_attention_dim}); use a control model made "
            f"for {family_name(engine.family)}",
        )
    for key in ("block_out_channels", "layers_per_block"):
        mine, theirs = config.get(key), unet.get(key)
        if mine is not None and theirs is not None and list(_seq(mine)) != list(_seq(theirs)):
            raise RequestError(
                where, f"control model {name!r} does not fit this UNet ({key} {mine} vs {theirs})"
            )


def _seq(v: Any) -> tuple:
    return tuple(v) if isinstance(v, list | tuple) else (v,)


_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> LRU of models
_pipes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> LRU of pipelines
_lock = threading.Lock()


def load_model(engine: Any, name: str, where: str = "control") -> Any:
    """The `ControlNetModel` named `name`, loaded once per engine in its dtype and device."""
    from sdkit.adapters import file_key

    path = engine.adapters.find("control", name, field=where)
    weights = _weights_file(path)
    key = file_key(weights) if weights is not None else (str(path),)
    with _lock:
        cache = _models.setdefault(engine, collections.OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    from diffusers import ControlNetModel

    from sdkit.models import quiet_loading

    try:
        with quiet_loading():
            if path.is_dir():
                model = ControlNetModel.from_pretrained(str(path), torch_dtype=engine.dtype)
            else:
                model = ControlNetModel.from_single_file(str(path), torch_dtype=engine.dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise RequestError(where, f"control model {name!r} cannot be loaded ({e})") from None
    check_fits(name, dict(model.config), engine, where)
    model = model.to(engine.device).eval()
    with _lock:
        cache[key] = model
        while len(cache) > _CACHED_MODELS:
            cache.popitem(last=False)
    return model


def _weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for stem in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / stem).is_file():
            return path / stem
    return None


_hashes: dict[tuple, str] = {}
# name -> hash of the model last checked under that name (the infotext has no engine)
_known_hashes: dict[str, str | None] = {}


def model_hash(engine: Any, name: str) -> str | None:
    """A1111's 8-hex model hash (sha256 of 64 KiB at offset 1 MiB of the weights file), as
    the ControlNet extension writes it after the model's name; None when not found."""
    from sdkit.adapters import file_key

    try:
        weights = _weights_file(engine.adapters.find("control", name))
    except RequestError:
        return None
    if weights is None:
        return None
    key = file_key(weights)
    if key not in _hashes:
        with open(weights, "rb") as f:
            f.seek(0x100000)
            _hashes[key] = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return _hashes[key]


# ---------------------------------------------------------------------------- running


def pipeline(ctx: RunContext, pipe: Any) -> Any:
    """The ControlNet twin of `pipe` (same components) with the job's units' models."""
    import diffusers

    cls_name = _CONTROL_CLASS.get(type(pipe).__name__)
    if cls_name is None:
        raise RequestError("control", f"{type(pipe).__name__} has no ControlNet pipeline")
    engine = ctx.engine
    units = ctx.request.control
    models = [load_model(engine, u["model"], f"control[{i}].model") for i, u in enumerate(units)]
    key = (cls_name, id(pipe), *(id(m) for m in models))  # the pipeline holds what it names
    with _lock:
        cache = _pipes.setdefault(engine, collections.OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    from sdkit.models import quiet_loading

    with quiet_loading():  # from_pipe's dtype pass warns about fp32 modules it does not have
        control = getattr(diffusers, cls_name).from_pipe(
            pipe, controlnet=models[0] if len(models) == 1 else models, dtype=engine.dtype
        )
    control.set_progress_bar_config(disable=True)
    with _lock:
        cache[key] = control
        while len(cache) > _CACHED_MODELS:
            cache.popitem(last=False)
    return control


def control_image(unit: Mapping, req: Request, size: tuple[int, int], box: Any = None) -> Any:
    """The unit's image fitted to the working `size` by its resize mode (else the request's),
    cropped like the image when inpainting only the masked area (`box` in the original),
    then preprocessed."""
    from PIL import Image

    from sdkit.fitting import fit_image

    mode = unit.get("resize_mode") or req.resize_mode
    if box is not None and req.image is not None:
        image = fit_image(unit["image"], *req.image.size, mode).crop(box)
        image = image.resize(size, Image.Resampling.LANCZOS)
    else:
        image = fit_image(unit["image"], *size, mode)
    return PREPROCESSORS[unit.get("module", "none")](image)


def call_kwargs(ctx: RunContext, pipe: Any, kwargs: Mapping) -> dict:
    """The ControlNet arguments of a call to `pipe` (none when it is not a ControlNet pipe)."""
    units = ctx.request.control
    if not units or not hasattr(pipe, "controlnet"):
        return {}
    size = (kwargs.get("width") or ctx.size[0], kwargs.get("height") or ctx.size[1])
    box = getattr(ctx, "crop_box", None)
    images = [control_image(u, ctx.request, size, box) for u in units]
    key = "image" if type(pipe).__name__.endswith("ControlNetPipeline") else "control_image"

    def one_or_all(values: list) -> Any:
        return values[0] if len(values) == 1 else values

    return {
        key: one_or_all(images),
        "controlnet_conditioning_scale": one_or_all([float(u["weight"]) for u in units]),
        "control_guidance_start": one_or_all([float(u["start"]) for u in units]),
        "control_guidance_end": one_or_all([float(u["end"]) for u in units]),
    }


# ---------------------------------------------------------------------------- infotext


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def infotext_pairs(req: Request) -> list[tuple[str, str]]:
    """`ControlNet N` keys as A1111's ControlNet extension writes them (the model's hash as
    recorded when a request naming it was last checked)."""
    out = []
    for i, u in enumerate(req.control):
        u = DEFAULTS | dict(u)
        h = _known_hashes.get(u["model"])
        module = u["module"]
        parts = [
            ("Module", _MODULE_A1111.get(module, module)),
            ("Model", f"{u['model']} [{h}]" if h else u["model"]),
            ("Weight", _num(u["weight"])),
            ("Resize Mode", _RESIZE_A1111[u.get("resize_mode") or req.resize_mode]),
        ]
        if module in ("canny",):
            parts += [("Threshold A", str(CANNY_LOW)), ("Threshold B", str(CANNY_HIGH))]
        parts += [
            ("Guidance Start", _num(u["start"])),
            ("Guidance End", _num(u["end"])),
            ("Control Mode", "Balanced"),
        ]
        out.append((f"ControlNet {i}", ", ".join(f"{k}: {v}" for k, v in parts)))
    return out


_UNIT_KEY = re.compile(r"^ControlNet (\d+)$")
_HASHED = re.compile(r"^(.*?)\s*\[[0-9a-fA-F]+\]$")


def parse_units(values: dict[str, str]) -> list[dict]:
    """Units (without images) from the `ControlNet N` keys of `values`, which are removed;
    a unit sdkit cannot run (another preprocessor, no model, another control mode) stays."""
    from sdkit.infotext import parse_params

    resize = {v: k for k, v in _RESIZE_A1111.items()}
    module_in = {v: k for k, v in _MODULE_A1111.items()}
    found = []
    for key in list(values):
        m = _UNIT_KEY.match(key)
        pairs = parse_params(values[key]) if m else None
        if not m or pairs is None:
            continue
        d = dict(pairs)
        module = module_in.get(d.get("Module", "none"), d.get("Module", "none"))
        model = _HASHED.sub(r"\1", d.get("Model", "None"))
        try:
            unit = {
                "image": None,
                "model": model,
                "weight": float(d.get("Weight", 1)),
                "start": float(d.get("Guidance Start", 0)),
                "end": float(d.get("Guidance End", 1)),
                "module": module,
                "resize_mode": resize[d.get("Resize Mode", "Crop and Resize")],
            }
        except (ValueError, KeyError):
            continue
        if (
            module not in MODULES
            or model in ("None", "")
            or d.get("Control Mode", "Balanced") != "Balanced"
        ):
            continue
        found.append((int(m.group(1)), unit))
        del values[key]
    return [u for _, u in sorted(found, key=lambda t: t[0])]


# ---------------------------------------------------------------------------- dicts


def unit_to_dict(unit: Any, images: bool) -> Any:
    """A unit for `Request.to_dict`: its image as base64 PNG when `images`, else left out
    (the bridge sends it as a frame)."""
    if not isinstance(unit, Mapping):
        return unit
    out = {k: v for k, v in unit.items() if k != "image"}
    if images and unit.get("image") is not None:
        out["image"] = image_to_base64(load_image(unit["image"], "control.image"))
    return out


def unit_from_dict(unit: Any, i: int) -> Any:
    """Inverse of `unit_to_dict`: a base64/path/bytes image loaded (errors name the unit)."""
    if isinstance(unit, Mapping) and unit.get("image") is not None:
        return {**unit, "image": load_image(unit["image"], f"control[{i}].image")}
    return unit
