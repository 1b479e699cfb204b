"""Controls for the Request fields that came after the first four modes: LoRAs, hires fix,
outpaint and upscale. Each is a plain ipywidget whose value maps to the field by `read` and
`write`; the controls panel shows a row only when the current mode's spec lists the field,
so the hires rows appear on txt2img once its spec has them (and nowhere else).

Kept apart from `controls` because each field here needs a value mapping (a LoRA list as
text, hires scale 1 as "off"), while the first fields map one to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as w

from sdkit.modes import HIRES_FIELDS
from sdkit.request import EXTEND_FILLS, HIRES_UPSCALERS, Request

# (label, widget factory) per field; the factory gets the field's default.
_STYLE = {"description_width": "7.5em"}
_NUM = w.Layout(width="13.5em")


def _int(label: str) -> Callable[[Any], w.Widget]:
    return lambda v: w.IntText(v, description=label, style=_STYLE, layout=_NUM)


def _float(label: str, step: float) -> Callable[[Any], w.Widget]:
    return lambda v: w.FloatText(v, step=step, description=label, style=_STYLE, layout=_NUM)


def _choice(label: str, options: tuple[str, ...]) -> Callable[[Any], w.Widget]:
    return lambda v: w.Dropdown(
        options=options, value=v, description=label, style=_STYLE, layout=w.Layout(width="16em")
    )


_FACTORIES: dict[str, Callable[[Any], w.Widget]] = {
    "loras": lambda v: w.Text(
        "",
        placeholder="name:weight, name:weight (or <lora:name:weight> in the prompt)",
        description="LoRAs",
        style=_STYLE,
        layout=w.Layout(width="100%"),
    ),
    "hires_scale": _float("Hires scale", 0.25),
    "hires_width": _int("Resize width"),  # A1111's "Resize width to"; 0: unset
    "hires_height": _int("Resize height"),
    "hires_steps": _int("Hires steps"),
    "hires_denoise": lambda v: w.FloatSlider(
        v,
        min=0.0,
        max=1.0,
        step=0.01,
        description="Hires denoise",
        style=_STYLE,
        layout=w.Layout(width="20em"),
    ),
    "hires_upscaler": _choice("Upscaler", HIRES_UPSCALERS),
    "left": _int("Left"),
    "right": _int("Right"),
    "top": _int("Top"),
    "bottom": _int("Bottom"),
    "extend_fill": _choice("Extend fill", EXTEND_FILLS),
    "seam": _int("Seam"),
    "upscale_factor": _float("Upscale ×", 0.5),
    "tile_overlap": _int("Tile overlap"),
}
FIELDS = tuple(_FACTORIES)

GROUPS = {  # heading and rows, as in `controls.GROUPS`
    "hires": ("Hires fix", HIRES_FIELDS),
    "outpaint": ("Outpaint", ("left", "right", "top", "bottom", "extend_fill", "seam")),
    "upscale": ("Upscale", ("upscale_factor", "tile_overlap")),
}


def default(name: str) -> Any:
    """What the control of field `name` shows for the Request's default (hires scale: 1)."""
    value = getattr(Request(), name)
    if name == "hires_scale" and value is None:
        return 1.0
    return value


def make(name: str) -> w.Widget:
    """The control for field `name`, showing its default."""
    return _FACTORIES[name](default(name))


def read(name: str, control: w.Widget) -> Any:
    """The field's value as the control shows it."""
    value = control.value
    if name == "loras":
        return parse_loras(value)
    if name == "hires_scale" and value == 1:
        return None  # 1 is no hires fix: the request says None, as a plain PNG does
    return value


def write(name: str, control: w.Widget, value: Any) -> None:
    """Show a request's value of field `name` (None: the field's default)."""
    if name == "loras":
        control.value = format_loras(value or [])
    elif value is None:
        control.value = default(name)
    else:
        control.value = value


def parse_loras(text: str) -> list[dict]:
    """'a:0.8, b' -> [{"name": "a", "weight": 0.8}, {"name": "b", "weight": 1.0}]. A weight
    that is not a number is kept as text, so the request's check names that item."""
    out: list[dict] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, weight = item.rpartition(":")
        if not sep:
            out.append({"name": item, "weight": 1.0})
            continue
        try:
            out.append({"name": name.strip(), "weight": float(weight)})
        except ValueError:
            out.append({"name": name.strip(), "weight": weight.strip()})
    return out


def format_loras(loras: list[dict]) -> str:
    return ", ".join(f"{item['name']}:{float(item.get('weight', 1.0)):g}" for item in loras)
