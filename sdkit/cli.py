"""The `sdkit` console script: the four modes, `info`, and subcommands other parts register.

Other parts add subcommands without the core importing them: each module named in
`EXTENSIONS` may define `register(subparsers)`, which adds parsers and sets
`func=handler` on them (`handler(args) -> int` exit code). They are imported inside
`main()` only, so importing `sdkit.cli` never imports the bridge or zmq.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from sdkit.request import FIELDS_BY_MODE, FILLS, RESIZE_MODES, Request, RequestError

log = logging.getLogger(__name__)

EXTENSIONS = (
    "sdkit.bridge.cli",
    "sdkit.bridge.plugins",
)  # modules with register(subparsers), imported in main()

# Flags per mode: the mode's fields less the positional prompt, image and mask.
_POSITIONAL = ("prompt", "image", "mask")
_FIELDS = {
    mode: tuple(f for f in fields if f not in _POSITIONAL)
    for mode, fields in FIELDS_BY_MODE.items()
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
    "strength": "how much to change the input, in (0, 1]",
    "resize_mode": f"an input of another size: {' | '.join(RESIZE_MODES)}",
    "mask_blur": "feather the mask edge by this many pixels",
    "grow": "grow (dilate) the mask by this many pixels first",
    "only_masked": "work on a crop around the mask at full resolution, then paste back",
    "padding": "context pixels around the mask for --only-masked",
    "fill": f"what the masked area starts from: {' | '.join(FILLS)}",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # same shape as our validation errors
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


def _add_fields(parser: argparse.ArgumentParser, mode: str) -> None:
    for name in _FIELDS[mode]:
        flag = "--" + name.replace("_", "-")
        if name == "only_masked":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP[name]
            )
        else:
            parser.add_argument(
                flag, dest=name, type=_field_type(name), default=None, help=_HELP[name]
            )
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
    parser.add_argument(
        "--out", default="outputs", help="folder (or .png path) to write to (default: ./outputs)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdkit", description="Stable Diffusion where people already work.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("txt2img", help="text to image")
    p.add_argument("prompt")
    _add_fields(p, "txt2img")
    p = sub.add_parser("img2img", help="image to image")
    p.add_argument("image", help="input image file")
    p.add_argument("prompt", nargs="?", default="")
    _add_fields(p, "img2img")
    p = sub.add_parser("inpaint", help="repaint where the mask is white")
    p.add_argument("image", help="input image file")
    p.add_argument("mask", help="mask image file: white repaint, black keep, grey soft")
    p.add_argument("prompt", nargs="?", default="")
    _add_fields(p, "inpaint")
    p = sub.add_parser("unconditional", help="images with no prompt")
    _add_fields(p, "unconditional")
    for name in ("txt2img", "img2img", "inpaint", "unconditional"):
        sub.choices[name].set_defaults(func=_generate, mode=name)
    p = sub.add_parser(
        "info", help="print the generation parameters stored in a PNG (sdkit or A1111)"
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the parsed request as JSON")
    p.set_defaults(func=_info)
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
    fields: dict[str, Any] = {}
    for name in _FIELDS[args.mode]:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.mode != "unconditional":
        fields["prompt"] = args.prompt
    if args.mode in ("img2img", "inpaint"):
        fields["image"] = args.image
    if args.mode == "inpaint":
        fields["mask"] = args.mask
    return Request(mode=args.mode, **fields)


def _generate(args: argparse.Namespace) -> int:
    request = _request_from_args(args)
    request.validate(vae_factor=1)  # cheap checks before loading a model; sizes after
    from sdkit.api import load

    options = {"config": args.config} if args.config else {}
    engine = load(args.model, device=args.device, dtype=args.dtype, **options)
    result = engine.generate(request, progress=not args.quiet)
    for path in result.save(args.out):
        print(path)
    if request.seed is None:
        print(f"seed: {result.seeds[0]}", file=sys.stderr)
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
