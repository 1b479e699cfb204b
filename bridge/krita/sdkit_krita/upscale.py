"""Upscale (issue 15.5): the whole image, tiled-upscaled by the server's ``upscale`` mode,
as a new document or as a new layer of this document scaled to the new size.

The document is read and sent as it is; nothing in it changes until the result is in and
checked (a failure or a cancel leaves it as it was; "layer" scales it back if adding the
layer fails). Kept apart from the controller and the docker, which only call in here.
"""

from __future__ import annotations

from dataclasses import replace

from . import canvas, protocol
from . import editor_actions as ea
from . import editor_geometry as geo
from .editor_connection import ModeInfo

MODE = "upscale"
FACTORS = (2.0, 4.0)
TARGETS = ("document", "layer")  # where the result goes
DEFAULT_STRENGTH = 0.3  # the server's faces propose the same (tiles want a light touch)


class UpscaleAction(ea.Action):
    """An upscale of the whole canvas; `placement` is the whole result at (0, 0)."""

    def __init__(
        self,
        mode: ModeInfo,
        params: ea.Params,
        factor: float,
        canvas_size: tuple[int, int],
        rgba: bytes,
        target: str = "document",
    ):
        if target not in TARGETS:
            raise geo.EditorError(f"Upscale: target must be one of {', '.join(TARGETS)}")
        width, height = canvas_size
        whole = geo.Rect(0, 0, width, height)
        region = geo.Region(whole, width, height, whole)
        super().__init__(mode, params, prepared=geo.Prepared(region, bytes(rgba), b""))
        self.factor = float(factor)
        self.target = target
        self.canvas_size = canvas_size
        self.result_document = None  # target "document": the new one, once made

    def request_kwargs(self) -> dict:
        kwargs = super().request_kwargs()
        kwargs["request"]["upscale_factor"] = self.factor
        return kwargs

    def start(self, conn, *, preview: int = 1) -> str:
        w, h = (round(s * self.factor) for s in self.canvas_size)
        limit = conn.limits.max_pixels if conn.state == "connected" else None
        if limit and w * h > limit:
            raise geo.EditorError(
                f"upscaling to about {w}x{h} ({w * h} pixels) is more than the server allows "
                f"({limit} pixels): choose a smaller factor"
            )
        return super().start(conn, preview=preview)

    def _place(self, ev: protocol.Event) -> geo.Placement:
        images = ev.pictures_named("image") or [p for _, p in ev.pictures]
        if not images:
            raise geo.EditorError("the server's result carried no image")
        pic = images[0]
        if pic.format != "rgba8":
            raise geo.EditorError(f"the server sent a {pic.format} image, not rgba8")
        seed = (ev.header.get("seeds") or [None])[0]
        return geo.place_generated(
            bytes(pic.data), pic.width, pic.height, prompt=self.params.prompt, seed=seed
        )


def plan_upscale(
    mode: ModeInfo,
    params: ea.Params,
    factor: float,
    canvas_size: tuple[int, int],
    read_rgba,
    *,
    target: str = "document",
) -> UpscaleAction:
    """Check the factor and read the whole canvas (``read_rgba(rect)``: RGBA8 under rect)."""
    if mode.name != MODE:
        raise geo.EditorError(f"Upscale needs the server's {MODE} mode, not {mode.name}")
    if not 1 <= factor <= 4:
        raise geo.EditorError(f"Upscale: the factor must be in 1..4, got {factor:g}")
    width, height = canvas_size
    rgba = read_rgba(geo.Rect(0, 0, width, height))
    return UpscaleAction(mode, params, factor, canvas_size, rgba, target)


def upscale(controller, params: ea.Params, factor: float, target: str = "document", doc=None):
    """Start an upscale of ``doc`` (default: the active one) on the shared controller."""
    params = replace(params, width=None, height=None)

    def plan(mode: ModeInfo, doc) -> UpscaleAction:
        read = lambda rect: canvas.read_rgba(doc, rect)  # noqa: E731
        return plan_upscale(mode, params, factor, (doc.width(), doc.height()), read, target=target)

    return controller.run(MODE, params, doc, plan=plan)


def add_result(doc, action: UpscaleAction):
    """Put a finished upscale where it belongs; returns the new layer.

    "document": a new document of the result's size holding it as a layer, opened in a
    view. "layer": this document scaled to the result's size, the result added on top."""
    p = action.placement
    if p is None:
        raise geo.EditorError("the upscale has no result to add")
    if action.target == "document":
        from krita import Krita

        app = Krita.instance()
        name = f"{doc.name() or 'image'} x{action.factor:g}"
        new = app.createDocument(p.width, p.height, name, "RGBA", "U8", "", doc.resolution())
        layer = canvas.add_layer(new, p)
        action.result_document = new
        window = app.activeWindow()
        if window is not None:
            window.addView(new)
        return layer
    width, height = action.canvas_size
    if (doc.width(), doc.height()) != (width, height):
        raise geo.EditorError(
            f"the document is now {doc.width()}x{doc.height()}, not the {width}x{height} that "
            "was sent: upscale it again"
        )
    res = doc.resolution()
    doc.scaleImage(p.width, p.height, res, res, "Bicubic")
    doc.waitForDone()
    try:
        return canvas.add_layer(doc, p)
    except Exception:
        doc.scaleImage(width, height, res, res, "Bicubic")
        doc.waitForDone()
        raise


def build_row(docker, form) -> None:
    """The docker's Upscale row: factor, where the result goes, strength, the button."""
    from .qt import QtWidgets as W

    row = W.QHBoxLayout()
    docker.upscale_factor = W.QComboBox()
    for f in FACTORS:
        docker.upscale_factor.addItem(f"×{f:g}", f)
    docker.upscale_target = W.QComboBox()
    docker.upscale_target.addItem("new document", "document")
    docker.upscale_target.addItem("new layer", "layer")
    docker.upscale_strength = W.QDoubleSpinBox()
    docker.upscale_strength.setRange(0.01, 1.0)
    docker.upscale_strength.setSingleStep(0.05)
    docker.upscale_strength.setValue(DEFAULT_STRENGTH)
    docker.upscale_strength.setToolTip("how much each tile is redrawn (0.2..0.4 keeps the picture)")
    docker.upscale_button = W.QPushButton("Upscale")
    docker.upscale_button.setToolTip(
        "upscale the whole image (Lanczos, then img2img in tiles) as a new document or layer"
    )
    docker.upscale_button.clicked.connect(lambda _=False: run_from_docker(docker))
    for widget in (
        docker.upscale_factor,
        docker.upscale_target,
        docker.upscale_strength,
        docker.upscale_button,
    ):
        row.addWidget(widget)
    form.addRow("Upscale", row)


def run_from_docker(docker, doc=None) -> bool:
    """The docker's Upscale button (and its mode button): its fields, its strength, on
    ``doc`` (default: the active document)."""
    params = replace(docker.params(), strength=docker.upscale_strength.value())
    factor = float(docker.upscale_factor.currentData())
    return upscale(docker.controller, params, factor, docker.upscale_target.currentData(), doc)
