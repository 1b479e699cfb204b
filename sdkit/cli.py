"""The `sdkit` console script: one subcommand per registered mode, `info`, and subcommands
other parts register.

Mode subcommands are derived from `sdkit.modes.registered()`: a mode's picture inputs and
its prompt are positional, its other fields are flags. A request is checked before the
model loads (everything but what only the loaded model knows), then by `Engine.check`
before the progress bar starts.

Other parts add subcommands without the core importing them: each module named in
`EXTENSIONS` may define `register(subparsers)`, which adds parsers and sets
`func=handler` on them (`handler(args) -> int` exit code). They are imported inside
`main()` only, so importing `sdkit.cli` never imports the bridge or zmq.

List fields have flags of their own, one per item: `--lora NAME[:WEIGHT]` (the `loras`
field, every prompted mode) and `--control FILE:MODEL[:WEIGHT]` (a `control` unit, modes
whose spec lists `control`). `--lora-dir`, `--embedding-dir`, `--control-dir` add folders
the engine searches; `sdkit list` prints what those folders hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from sdkit import modes
from sdkit.request import (
    FILLS,
    HIRES_UPSCALERS,
    LORA_WEIGHTS,
    RANGES,
    RESIZE_MODES,
    Request,
    RequestError,
)

log = logging.getLogger(__name__)

EXTENSIONS = (
    "sdkit.batch_cli",
    "sdkit.bridge.cli",
    "sdkit.bridge.plugins",
)  # modules with register(subparsers), imported in main()

_POSITIONAL = ("image", "mask", "prompt")  # in this order on the command line
_UNITS = ("loras", "control")  # list fields: one repeatable flag per item (--lora, --control)
_FOLDERS = {  # flag -> sdkit.load keyword: folders the engine searches for adapters
    "lora_dir": "lora_dirs",
    "embedding_dir": "embedding_dirs",
    "control_dir": "control_dirs",
}
_HELP = {
    "negative_prompt": "what to steer away from",
    "num_inference_steps": "denoising steps (1..1000; default: the model's)",
    "guidance_scale": "classifier-free guidance, >= 0 (default: the model's)",
    "width": "image width in pixels, a multiple of the VAE factor (default: the model's)",
    "height": "image height in pixels, a multiple of the VAE factor (default: the model's)",
    "seed": "seed of image 1 (image i uses seed + i - 1); default: random, printed",
    "scheduler": "A1111 sampler name or diffusers class, e.g. 'Euler a', 'DPM++ 2M Karras'",
    "num_images": "images to make (1..16)",
    "clip_skip": "stop CLIP this many layers from the end, A1111's numbering (2: penultimate); SD 1.x only",
    "strength": "how much to change the input, in (0, 1]",
    "resize_mode": f"an input of another size: {' | '.join(RESIZE_MODES)}",
    "mask_blur": "feather the mask edge by this many pixels",
    "grow": "grow (dilate) the mask by this many pixels first",
    "only_masked": "work on a crop around the mask at full resolution, then paste back",
    "padding": "context pixels around the mask for --only-masked",
    "fill": f"what the masked area starts from: {' | '.join(FILLS)}",
    "hires_scale": "hires fix: a second pass at this multiple of the size (1: off)",
    "hires_width": "hires fix: target width (A1111's 'Resize width to'; 0: from the height's "
    "aspect, or --hires-scale); both set: cover, then crop",
    "hires_height": "hires fix: target height (0: from the width's aspect, or --hires-scale)",
    "hires_steps": "hires fix: steps of the second pass (0: as many as the first)",
    "hires_denoise": "hires fix: how much the second pass changes, in (0, 1]",
    "hires_upscaler": f"hires fix upscaler: {' | '.join(HIRES_UPSCALERS)}",
    "upscale_factor": "upscale: output size / input size; Lanczos, then img2img per tile "
    "at --strength (default 0.3 here)",
    "tile_overlap": "upscale: pixels neighbouring tiles share at least (blended there)",
    "left": "outpaint: pixels added on the left",
    "right": "outpaint: pixels added on the right",
    "top": "outpaint: pixels added at the top",
    "bottom": "outpaint: pixels added at the bottom",
    "extend_fill": "outpaint: what the new area starts from: stretch (the edge pixels drawn "
    "outward) | noise | colour (the edges' mean colour)",
    "seam": "outpaint: pixels of the original next to the new area repainted under a soft "
    "mask (nothing beyond them changes)",
}
# Values a mode's subcommand uses for flags not given (Request's defaults otherwise): upscale
# refines tiles lightly (sdkit.tiled_upscale.DEFAULT_STRENGTH; `sdkit.upscale()` does the same).
_MODE_DEFAULTS: dict[str, dict[str, Any]] = {"upscale": {"strength": 0.3}}
_INPUT_HELP = {
    "image": "input image file",
    "mask": "mask image file: white repaint, black keep, grey soft",
}


def _flags(spec: modes.ModeSpec) -> tuple[str, ...]:
    """The mode's fields less the positional prompt, image and mask and the list fields."""
    return tuple(f for f in spec.fields if f not in _POSITIONAL and f not in _UNITS)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # same shape as our validation errors
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _field_type(name: str) -> Any:
    hints = {f.name: f.type for f in dataclasses.fields(Request)}
    text = str(hints[name])
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def _add_fields(parser: argparse.ArgumentParser, spec: modes.ModeSpec) -> None:
    for name in spec.inputs:  # required pictures are positional, optional ones flags
        if name in spec.required:
            parser.add_argument(name, help=_INPUT_HELP[name])
        else:
            parser.add_argument("--" + name, default=None, help=_INPUT_HELP[name])
    if "prompt" in spec.fields:
        if "prompt" in spec.required:
            parser.add_argument("prompt")
        else:
            parser.add_argument("prompt", nargs="?", default="")
    for name in _flags(spec):
        flag = "--" + name.replace("_", "-")
        help = _HELP.get(name, name.replace("_", " "))
        if name in RANGES and name not in ("width", "height"):
            lo, hi = RANGES[name]
            help = f"{help} [{lo}..{hi}]"
        if name == "only_masked":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help
            )
        else:
            parser.add_argument(flag, dest=name, type=_field_type(name), default=None, help=help)
    if "prompt" in spec.fields or "loras" in spec.fields:
        lo, hi = LORA_WEIGHTS
        parser.add_argument(
            "--lora",
            dest="loras",
            action="append",
            metavar="NAME[:WEIGHT]",
            help=f"apply the LoRA NAME (found in the LoRA folders) at WEIGHT [{lo}..{hi}], "
            "default 1; repeatable. Same as <lora:NAME:WEIGHT> in the prompt",
        )
        parser.add_argument(
            "--control",
            action="append",
            metavar="FILE:MODEL[:WEIGHT]",
            help="a ControlNet unit: control image FILE for control model MODEL (found in the "
            "control folders) at WEIGHT, default 1; repeatable",
        )
    _add_model_options(parser)
    parser.add_argument(
        "--out", default="outputs", help="folder (or .png path) to write to (default: ./outputs)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model: a diffusers folder, a .safetensors/.ckpt file, a hub id (local cache), or 'embedded' (default)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="for a single-file checkpoint: a local diffusers folder with its configuration",
    )
    parser.add_argument(
        "--device", default=None, help="cuda, mps, cpu (default: the best available)"
    )
    parser.add_argument(
        "--dtype", default=None, help="fp16, bf16, fp32 (default: fp16 on GPU, fp32 on CPU)"
    )
    for flag, what in (
        ("--lora-dir", "LoRA files (.safetensors)"),
        ("--embedding-dir", "textual-inversion embeddings (.pt, .safetensors)"),
        ("--control-dir", "ControlNet models"),
    ):
        parser.add_argument(
            flag,
            action="append",
            metavar="DIR",
            help=f"also search DIR for {what}; repeatable (besides the model's own folders)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdkit", description="Stable Diffusion where people already work.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for spec in modes.registered():
        p = sub.add_parser(spec.name, help=spec.title.lower())
        _add_fields(p, spec)
        p.set_defaults(func=_generate, mode=str(spec.name))
    p = sub.add_parser(
        "info", help="print the generation parameters stored in a PNG (sdkit or A1111)"
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the parsed request as JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser(
        "list",
        aliases=["loras"],
        help="list the LoRAs, embeddings and control models the model's folders hold",
    )
    _add_model_options(p)
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(func=_list)
    return parser


def _register_extensions(parser: argparse.ArgumentParser) -> None:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ImportError as err:  # e.g. the bridge extra (pyzmq) is not installed
            log.debug("sdkit CLI extension %s not available: %s", name, err)
            continue
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)


def _request_from_args(args: argparse.Namespace) -> Request:
    spec = modes.get(args.mode)
    fields: dict[str, Any] = dict(_MODE_DEFAULTS.get(str(args.mode), {}))
    for name in (*_flags(spec), *spec.inputs, "prompt"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if getattr(args, "loras", None):
        fields["loras"] = [_lora_unit(text, i) for i, text in enumerate(args.loras)]
    if getattr(args, "control", None):
        if "control" not in spec.fields:
            takers = [str(s.name) for s in modes.registered() if "control" in s.fields]
            raise RequestError(
                "control",
                f"{spec.name} takes no control units"
                + (f"; modes that do: {', '.join(takers)}" if takers else " (no mode does yet)"),
            )
        fields["control"] = [_control_unit(text, i) for i, text in enumerate(args.control)]
    return Request(mode=args.mode, **fields)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _lora_unit(text: str, i: int) -> dict:
    """`--lora NAME[:WEIGHT]` -> a `loras` item; the name's own checks are Request.validate's."""
    name, sep, weight = text.rpartition(":")
    if not sep or any(c in weight for c in "/\\"):  # a Windows path: refused as a name
        return {"name": text, "weight": 1.0}
    value = _number(weight)
    if value is None:
        raise RequestError(
            f"loras[{i}].weight", f"--lora {text!r}: WEIGHT {weight!r} is not a number"
        )
    return {"name": name, "weight": value}


def _control_unit(text: str, i: int) -> dict:
    """`--control FILE:MODEL[:WEIGHT]` -> a `control` unit with the image loaded. Split from
    the right, so a FILE may hold colons (C:\\...); a MODEL is a name and holds none."""
    parts = text.rsplit(":", 2)
    weight = _number(parts[-1]) if len(parts) == 3 else None
    if weight is None:
        parts = text.rsplit(":", 1)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise RequestError(f"control[{i}]", f"--control {text!r}: expected FILE:MODEL[:WEIGHT]")
    from sdkit.images import load_image

    unit: dict[str, Any] = {
        "image": load_image(parts[0], f"control[{i}].image"),
        "model": parts[1],
    }
    if weight is not None:
        unit["weight"] = weight
    return unit


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`sdkit.load` keywords from --config and the folder flags (only those given)."""
    options: dict[str, Any] = {"config": args.config} if args.config else {}
    for flag, keyword in _FOLDERS.items():
        folders = getattr(args, flag, None)
        if folders:
            options[keyword] = list(folders)
    return options


def size_multiple_before_loading(spec: str | None) -> int | None:
    """The size multiple of model `spec` without loading it, or None when only the loaded
    model can tell (an unconditional-only model draws one fixed size). Text models work
    in multiples of max(8, VAE factor), and every SD 1.x/2.x/XL VAE has factor 8 or less
    (the embedded model's is 4), so 8."""
    from sdkit.models import EMBEDDED_DIR, normalise_spec

    key = normalise_spec(spec)
    folder = EMBEDDED_DIR if key == "embedded" else Path(key)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    if index.get("_class_name") in ("DDPMPipeline", "DDIMPipeline"):
        return None
    return 8


def _summary(result: Any, engine: Any) -> str:
    req = result.request
    w, h = result[0].size if len(result) else (req.width, req.height)  # hires fix: the output's
    return (
        f"{req.mode}: {len(result)} image(s) {w}x{h}, seed {result.seeds[0]}, "
        f"{req.num_inference_steps} steps {req.scheduler}, {result.timings['total']:.1f} s "
        f"on {engine.device} ({engine.model.name})"
    )


def _generate(args: argparse.Namespace) -> int:
    request = _request_from_args(args)
    multiple = size_multiple_before_loading(args.model)
    request.validate(vae_factor=multiple or 1)  # cheap checks before loading the model
    from sdkit.api import load

    engine = load(args.model, device=args.device, dtype=args.dtype, **_load_options(args))
    request = engine.check(request)  # what only the loaded model knows, before the bar
    result = engine.generate(request, progress=not args.quiet)
    for path in result.save(args.out):
        print(path)
    if not args.quiet:
        print(_summary(result, engine), file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from PIL import Image

    try:
        with Image.open(args.image) as im:
            text = im.info.get("parameters")
    except OSError as err:
        raise RequestError("image", f"cannot read {args.image!r} ({err})") from err
    if not isinstance(text, str) or not text.strip():
        raise RequestError(
            "parameters",
            f"{args.image} has no 'parameters' text chunk (not written by sdkit or A1111)",
        )
    if args.json:
        print(json.dumps(Request.from_infotext(text).to_dict(), indent=2))
    else:
        print(text)
    return 0


def _list(args: argparse.Namespace) -> int:
    """The adapters the engine finds by name (`Engine.info()`: names only, never paths)."""
    from sdkit.api import load

    engine = load(args.model, device=args.device, dtype=args.dtype, **_load_options(args))
    info = engine.info()
    found = {key: list(info.get(key) or []) for key in ("loras", "embeddings", "controls")}
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    titles = {"loras": "LoRAs", "embeddings": "Embeddings", "controls": "Control models"}
    for key, names in found.items():
        print(f"{titles[key]} ({len(names)}):")
        for name in names:
            print(f"  {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sdkit` console script; returns the exit code."""
    parser = build_parser()
    _register_extensions(parser)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    from sdkit.models import ModelNotFoundError

    try:
        return int(args.func(args) or 0)
    except RequestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModelNotFoundError as err:
        print(f"error: model: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
