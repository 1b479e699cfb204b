"""Control layers for the editor plug-ins (issue 15.5): one layer's pixels, in the area the
request covers, as the image of one ControlNet unit.

Standard library only (it runs inside the editors' Pythons). The plug-in reads the layer;
this module crops it to the action's area, flattens it over black (a transparent layer
with white strokes is the white-on-black scribble a control model wants; black lines on
white want the ``invert`` module) and makes the action send it as the unit's ``control``
frame (PROTOCOL.md, section 3). Model names come from ``hello``'s ``controls``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

try:  # as part of sdkit.bridge, or copied next to a plug-in package
    from . import editor_geometry as geo
    from . import protocol
except ImportError:  # copied next to a plug-in script (GIMP): top-level modules
    import editor_geometry as geo  # type: ignore[no-redef]
    import protocol  # type: ignore[no-redef]

MODULES = ("none", "scribble", "canny", "invert")  # the server's (sdkit.preprocessors)


@dataclass
class ControlChoice:
    """A unit without its image: which model, how strongly, over which steps."""

    model: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    module: str = "none"

    def unit(self) -> dict:
        return {
            "model": self.model,
            "weight": float(self.weight),
            "start": float(self.start),
            "end": float(self.end),
            "module": self.module,
        }


def check_model(conn, name: str) -> str:
    """``name`` if the server lists it in ``hello``'s ``controls``, else an EditorError naming
    the ones it offers (control models are found by name on the server, never by path)."""
    offered = conn.adapters("controls")
    if name not in offered:
        listed = ", ".join(offered) if offered else "none"
        raise geo.EditorError(f"the server has no control model {name!r} (it offers: {listed})")
    return name


def request_rect(action) -> tuple[geo.Rect, int, int]:
    """The canvas area the action's request covers, and the size that is generated."""
    if action.prepared is not None:
        region = action.prepared.region
        return region.rect, region.width, region.height
    x, y = action.origin
    w, h = action.params.width, action.params.height
    if not w or not h:
        raise geo.EditorError("the request's size is not known yet")
    return geo.Rect(x, y, int(w), int(h)), int(w), int(h)


def over_black(rgba: bytes) -> bytes:
    """Straight RGBA8 composited over opaque black (transparent -> black)."""
    out = bytearray(rgba)
    for i in range(0, len(out), 4):
        a = out[i + 3]
        if a != 255:
            out[i] = out[i] * a // 255
            out[i + 1] = out[i + 1] * a // 255
            out[i + 2] = out[i + 2] * a // 255
            out[i + 3] = 255
    return bytes(out)


def control_picture(
    action, canvas_size: tuple[int, int], read_layer: Callable[[geo.Rect], bytes]
) -> protocol.Picture:
    """The layer under the action's area (``read_layer(rect)`` gives its straight RGBA8),
    over black, padded with black beyond the canvas to the generated size."""
    rect, width, height = request_rect(action)
    inside = rect.intersect(geo.Rect(0, 0, *canvas_size))
    if inside.is_empty():
        raise geo.EditorError("the control layer lies outside the canvas")
    if (inside.x, inside.y) != (rect.x, rect.y):
        raise geo.EditorError("the request starts outside the canvas")
    layer = read_layer(inside)
    pixels = over_black(geo.pad(layer, inside.width, inside.height, width, height, 4, fill=0))
    return protocol.Picture(width, height, "rgba8", pixels)


def attach(action, choice: ControlChoice, picture: protocol.Picture) -> None:
    """Make ``action`` send ``picture`` as unit 0 of ``request.control`` (its frame)."""
    if "control" not in action.mode.fields:
        raise geo.EditorError(f"{action.mode.title} takes no control layer")
    plain = action.request_kwargs

    def request_kwargs() -> dict:
        kwargs = plain()
        kwargs["request"]["control"] = [choice.unit()]
        kwargs["control"] = {0: picture}
        return kwargs

    action.request_kwargs = request_kwargs
    action.control = choice
