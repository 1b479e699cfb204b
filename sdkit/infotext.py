"""A1111 "infotext": the `parameters` PNG text chunk, written and parsed.

The format, as A1111 writes it::

    a prompt, which may span
    several lines
    Negative prompt: what to avoid
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd15, Version: v1.10.1

The last line is `Key: value` pairs separated by commas; a value holding a comma, colon,
newline or quote is JSON-quoted.  Keys sdkit has no field for (A1111's `Lora hashes`,
`TI hashes`, `Version`, ...) land in `Request.extra` and are written back unchanged.
Known keys that do not apply to the parsed mode are kept in `extra` too, so nothing is
lost on a round trip.

Without a `Mode` key the mode is what A1111's tabs imply: mask keys (`Mask blur`,
`Masked content`, `Inpaint area`, ...) -> inpaint; `Denoising strength` without hires keys
-> img2img; else txt2img, where `Hires upscale` (or `Hires resize: WxH`, the target size,
0 for a side taken from the aspect ratio), `Hires steps` (omitted when 0) and `Hires
upscaler` are the hires fix and `Denoising strength` is its second pass's strength.
An upscaler sdkit lacks (A1111's ESRGAN family, `Latent (bicubic)`, ...) runs as the
nearest it has (`Latent` for latent ones, else `Lanczos`); its name stays in `extra` and
is written back while the field still maps to it.

LoRAs of the `loras` field are written as `<lora:NAME:WEIGHT>` tags appended to the prompt
(A1111 has no other place for them); reading keeps tags in the prompt and never fills
`loras`, so a LoRA is never applied twice.

sdkit adds keys for what A1111 does not record: `Mode`, `Mask grow`, `Inpaint area`,
`Masked area padding`, `Masked content`, `Resize mode`, `Batch size`, and for outpaint
`Outpaint left/right/top/bottom`, `Extend fill`, `Seam`, and for upscale `Upscale factor`,
`Tile overlap`.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdkit.request import Request

NEGATIVE = "Negative prompt:"
_KEY = re.compile(r"^\w[^,:\"\n]*$")
_SIZE = re.compile(r"^(\d+)\s*x\s*(\d+)$")
_DECODER = json.JSONDecoder()

_AREA = {"Only masked": True, "Whole picture": False}
_FILL_OUT = {"original": "original", "fill": "fill", "noise": "latent noise"}
_FILL_IN = {"original": "original", "fill": "fill", "latent noise": "noise", "noise": "noise"}
_LEADING = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model")
# A1111 writes these only for a job with a mask (its inpaint tab); sdkit adds "Mask grow".
MASK_KEYS = ("Mask blur", "Mask mode", "Masked content", "Inpaint area", "Masked area padding")


def _mode_fields(mode: Any) -> tuple[str, ...]:
    """The Request fields `mode` reads (its spec in `sdkit.modes`); none when unknown."""
    from sdkit import modes
    from sdkit.request import RequestError

    try:
        return modes.get(mode).fields
    except RequestError:
        return ()


# Keys sdkit reads into fields (everything else goes to `extra`).
KNOWN_KEYS = (
    "Steps",
    "Sampler",
    "CFG scale",
    "Seed",
    "Size",
    "Model",
    "Mode",
    "Denoising strength",
    "Resize mode",
    "Mask blur",
    "Mask grow",
    "Inpaint area",
    "Masked area padding",
    "Masked content",
    "Batch size",
    "Clip skip",
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "Outpaint left",
    "Outpaint right",
    "Outpaint top",
    "Outpaint bottom",
    "Extend fill",
    "Seam",
    "Upscale factor",
    "Tile overlap",
)
_SIDES = ("left", "right", "top", "bottom")  # outpaint: "Outpaint left" ... (only those > 0)


def nearest_upscaler(name: str) -> str:
    """The hires upscaler sdkit runs for A1111's `name` (latent ones -> Latent)."""
    return "Latent" if name.startswith("Latent") else "Lanczos"


def with_lora_tags(prompt: str, loras: list[dict]) -> str:
    """`prompt` with the `loras` field's entries appended as A1111 `<lora:NAME:WEIGHT>` tags
    (after a space: the text that reaches CLIP is unchanged once the tags are removed)."""
    tags = " ".join(f"<lora:{x['name']}:{_num(x.get('weight', 1.0))}>" for x in loras)
    return f"{prompt} {tags}" if prompt and tags else prompt or tags


def _is_float(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def infer_mode(keys: Any) -> str:
    """The mode A1111's tabs imply for infotext without a `Mode` key."""
    keys = set(keys)
    if keys & {*MASK_KEYS, "Mask grow"}:
        return "inpaint"
    hires = any(k.startswith("Hires ") for k in keys) or "First pass size" in keys
    return "img2img" if "Denoising strength" in keys and not hires else "txt2img"


# ---------------------------------------------------------------------------- writing


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds `,` `:` newline or `"`
    (or would lose edge whitespace), else as is."""
    text = str(value)
    if any(c in text for c in ',:\n"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def format_infotext(req: Request, *, seed: int | None = None) -> str:
    """The infotext of `req`; `seed` overrides `req.seed` (each image of a batch its own)."""
    from sdkit.schedulers import a1111_name

    pairs: list[tuple[str, str]] = []

    def add(key: str, value: Any) -> None:
        if value is not None:
            pairs.append((key, value if isinstance(value, str) else str(value)))

    add("Steps", req.num_inference_steps)
    if req.scheduler is not None:
        add("Sampler", a1111_name(req.scheduler))
    if req.guidance_scale is not None:
        add("CFG scale", _num(req.guidance_scale))
    add("Seed", seed if seed is not None else req.seed)
    if req.width is not None and req.height is not None:
        add("Size", f"{req.width}x{req.height}")
    add("Model", req.model)
    if req.mode != "txt2img":
        add("Mode", req.mode)
    reads = _mode_fields(req.mode)  # mode-specific keys follow the fields the mode reads
    resize = bool(req.hires_width or req.hires_height)
    hires = "hires_scale" in reads and (req.hires_scale is not None or resize)
    if "strength" in reads:
        add("Denoising strength", _num(req.strength))
    elif hires:  # A1111 writes the hires pass's strength under this key on txt2img
        add("Denoising strength", _num(req.hires_denoise))
    if "resize_mode" in reads and req.resize_mode != "resize":
        add("Resize mode", req.resize_mode)
    if "mask_blur" in reads:
        add("Mask blur", req.mask_blur)
    if "grow" in reads:
        add("Mask grow", req.grow)
    if "only_masked" in reads:
        add("Inpaint area", "Only masked" if req.only_masked else "Whole picture")
        if req.only_masked and "padding" in reads:
            add("Masked area padding", req.padding)
    if "fill" in reads:
        add("Masked content", _FILL_OUT.get(req.fill, req.fill))
    if req.num_images != 1:
        add("Batch size", req.num_images)
    if "clip_skip" in reads and req.clip_skip not in (None, 1):  # A1111 omits 1
        add("Clip skip", req.clip_skip)
    if hires:
        if resize:  # A1111 writes the target size instead of the scale it then ignores
            add("Hires resize", f"{req.hires_width}x{req.hires_height}")
        elif req.hires_scale is not None:
            add("Hires upscale", _num(req.hires_scale))
        if req.hires_steps:  # A1111 omits 0 (= as many as Steps)
            add("Hires steps", req.hires_steps)
        named = req.extra.get("Hires upscaler")  # A1111's own name, when it still applies
        keep = named is not None and nearest_upscaler(named) == req.hires_upscaler
        add("Hires upscaler", named if keep else req.hires_upscaler)
    if "left" in reads:  # outpaint
        for side in _SIDES:
            if getattr(req, side):
                add(f"Outpaint {side}", getattr(req, side))
        add("Extend fill", req.extend_fill)
        add("Seam", req.seam)
    if "upscale_factor" in reads:  # upscale (A1111's SD upscale script records neither)
        add("Upscale factor", _num(req.upscale_factor))
        add("Tile overlap", req.tile_overlap)
    if "control" in reads and req.control:
        from sdkit.control import infotext_pairs

        pairs += infotext_pairs(req)  # A1111 ControlNet extension's `ControlNet N` keys
    written = {k for k, _ in pairs}
    pairs += [(k, str(v)) for k, v in req.extra.items() if k not in written]
    if req.mode == "txt2img" and infer_mode(k for k, _ in pairs) != "txt2img":
        # keys kept in extra would make a reader infer another mode: say it (after Model)
        at = next((i for i, (k, _) in enumerate(pairs) if k not in _LEADING), len(pairs))
        pairs.insert(at, ("Mode", "txt2img"))

    lines = [with_lora_tags(req.prompt or "", req.loras if "loras" in reads else [])]
    if req.negative_prompt:
        lines.append(f"{NEGATIVE} {req.negative_prompt}")
    if pairs:
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in pairs))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- parsing


def parse_params(line: str) -> list[tuple[str, str]] | None:
    """`Key: value, Key: "quoted, value"` -> pairs, or None when `line` is not such a list."""
    pairs: list[tuple[str, str]] = []
    pos, n = 0, len(line)
    while True:
        while pos < n and line[pos] in " \t,":
            pos += 1
        if pos >= n:
            return pairs
        colon = line.find(":", pos)
        if colon < 0:
            return None
        key = line[pos:colon].strip()
        if not _KEY.match(key):
            return None
        pos = colon + 1
        while pos < n and line[pos] in " \t":
            pos += 1
        value = None
        if pos < n and line[pos] == '"':
            try:
                decoded, end = _DECODER.raw_decode(line, pos)
            except ValueError:
                decoded, end = None, pos
            rest = line[end:].lstrip(" \t")
            if isinstance(decoded, str) and (not rest or rest[0] == ","):
                value, pos = decoded, n - len(rest)
        if value is None:
            comma = line.find(",", pos)
            end = n if comma < 0 else comma
            value, pos = line[pos:end].strip(), end
        pairs.append((key, value))


def split_infotext(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(prompt, negative prompt, parameter pairs) the way A1111 splits its infotext."""
    lines = text.strip().replace("\r\n", "\n").split("\n")
    pairs = parse_params(lines[-1]) if lines else None
    # A1111's rule is "at least three pairs"; a line that starts with one of our keys (as
    # every line sdkit or A1111 writes does, with "Steps") counts too.
    if pairs and (len(pairs) >= 3 or pairs[0][0] in KNOWN_KEYS):
        lines = lines[:-1]
    else:
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for raw in lines:
        line = raw.strip()
        if target is prompt and line.startswith(NEGATIVE):
            target = negative
            line = line[len(NEGATIVE) :].strip()
            negative.append(line)
            continue
        target.append(line)
    while negative and not negative[0]:
        negative.pop(0)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), pairs


def parse_infotext(text: str, cls: type[Request]) -> Request:
    """A `Request` (of class `cls`) from infotext written by sdkit or A1111."""
    from sdkit import modes
    from sdkit.request import EXTEND_FILLS, FILLS, RESIZE_MODES, RequestError
    from sdkit.schedulers import canonical_name

    if not isinstance(text, str):
        raise RequestError("parameters", f"infotext must be a string, got {type(text).__name__}")
    prompt, negative, pairs = split_infotext(text)
    values: dict[str, str] = {}
    for k, v in pairs:
        values[k] = v  # A1111 lets a later duplicate win too
    extra: dict[str, str] = {}
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}

    mode = values.pop("Mode", None)
    if mode is not None:
        if mode in {str(spec.name) for spec in modes.registered()}:
            fields["mode"] = mode
        else:
            extra["Mode"] = mode
    mode = fields.setdefault("mode", infer_mode(values))
    reads = _mode_fields(mode)
    always = (
        "num_inference_steps",
        "scheduler",
        "guidance_scale",
        "seed",
        "model",
        "num_images",
    )

    def take(key: str, name: str, convert) -> None:
        if key not in values:
            return
        raw = values.pop(key)
        if name in reads or name in always:
            try:
                fields[name] = convert(raw)
                return
            except (ValueError, KeyError):
                pass
        extra[key] = raw  # unparseable or not for this mode: keep it, never drop it

    def choice(allowed):
        def convert(raw: str):
            if raw not in allowed:
                raise ValueError(raw)
            return raw

        return convert

    def sampler(raw: str) -> str:
        try:
            name = canonical_name(raw)
        except KeyError:
            return raw
        schedule = values.get("Schedule type")
        if schedule is not None and schedule.lower() == "karras" and not name.endswith("Karras"):
            try:
                name = canonical_name(f"{raw} Karras")
                values.pop("Schedule type")
            except KeyError:
                pass
        return name

    take("Steps", "num_inference_steps", int)
    take("Sampler", "scheduler", sampler)
    take("CFG scale", "guidance_scale", float)
    take("Seed", "seed", int)
    if "Size" in values:
        m = _SIZE.match(values["Size"])
        if m:
            values.pop("Size")
            fields["width"], fields["height"] = int(m.group(1)), int(m.group(2))
    take("Model", "model", str)
    resize = _SIZE.match(values.get("Hires resize", ""))
    if "hires_scale" in reads and (_is_float(values.get("Hires upscale")) or resize):
        take("Hires upscale", "hires_scale", float)
        if resize:
            values.pop("Hires resize")
            fields["hires_width"], fields["hires_height"] = map(int, resize.groups())
        take("Hires steps", "hires_steps", int)
        take("Denoising strength", "hires_denoise", float)
        named = values.get("Hires upscaler")
        if named is not None:
            fields["hires_upscaler"] = nearest_upscaler(named)
            if named == fields["hires_upscaler"]:
                values.pop("Hires upscaler")  # else kept in extra, written back as it was
    take("Denoising strength", "strength", float)
    take("Resize mode", "resize_mode", choice(RESIZE_MODES))
    take("Mask blur", "mask_blur", int)
    take("Mask grow", "grow", int)
    take("Inpaint area", "only_masked", lambda raw: _AREA[raw])
    take("Masked area padding", "padding", int)
    take("Masked content", "fill", lambda raw: choice(FILLS)(_FILL_IN[raw]))
    take("Batch size", "num_images", int)
    take("Clip skip", "clip_skip", int)
    for side in _SIDES:
        take(f"Outpaint {side}", side, int)
    take("Extend fill", "extend_fill", choice(EXTEND_FILLS))
    take("Seam", "seam", int)
    take("Upscale factor", "upscale_factor", float)
    take("Tile overlap", "tile_overlap", int)

    if "control" in reads:
        from sdkit.control import parse_units

        fields["control"] = parse_units(values)  # takes the `ControlNet N` keys it can run
    # Unknown keys and known ones that did not apply, in their original order.
    extra.update(values)
    order = list(dict.fromkeys(k for k, _ in pairs))
    fields["extra"] = {k: extra[k] for k in order if k in extra}
    return cls(**fields)
