"""Control layer (issue 15.5): any paint layer of the document as a ControlNet unit's image.

The docker's Control row names the layer, the control model (``hello``'s ``controls``),
the preprocessor and the weight; Generate, Img2img and Inpaint then send that layer's
pixels in the request's area as the unit's ``control`` frame (``editor_control``). The
layer is only read: it can stay hidden. Kept apart from the docker and the controller,
which call ``build_row`` / ``choose`` and ``apply``.
"""

from __future__ import annotations

from . import editor_control as ec
from . import editor_geometry as geo
from .pictures import bgra_to_rgba

NONE = "(no control layer)"


def paint_layers(doc) -> list:
    """The document's paint layers, top-level and in groups, bottom to top."""
    found, stack = [], list(doc.rootNode().childNodes()) if doc is not None else []
    while stack:
        node = stack.pop(0)
        if node.type() == "paintlayer":
            found.append(node)
        elif node.type() == "grouplayer":
            stack[:0] = list(node.childNodes())
    return found


def find_layer(doc, name: str):
    """The paint layer called ``name`` (the topmost of that name), or EditorError."""
    matches = [n for n in paint_layers(doc) if n.name() == name]
    if not matches:
        raise geo.EditorError(f"the document has no paint layer {name!r} to use as control")
    return matches[-1]


def read_layer(node, rect: geo.Rect) -> bytes:
    """The layer's own pixels under ``rect`` as straight RGBA8 (Krita stores BGRA)."""
    return bgra_to_rgba(bytes(node.pixelData(rect.x, rect.y, rect.width, rect.height)))


def apply(controller, action, doc) -> None:
    """Attach the controller's chosen control layer, if any, to ``action`` before it starts.
    Modes without control (Expand canvas, Upscale) are sent as they are."""
    chosen = getattr(controller, "control_layer", None)
    if chosen is None or "control" not in action.mode.fields:
        return
    choice, layer_name = chosen
    ec.check_model(controller.conn, choice.model)
    node = find_layer(doc, layer_name)
    size = (doc.width(), doc.height())
    action.control_picture = ec.control_picture(action, size, lambda r: read_layer(node, r))
    ec.attach(action, choice, action.control_picture)


# ----------------------------------------------------------------------------- the docker


def build_row(docker, form) -> None:
    """The docker's Control row: layer, model, module, weight."""
    from .qt import QtWidgets as W

    class LayerBox(W.QComboBox):
        def showPopup(self):  # noqa: N802 - Qt's name; the layers may have changed
            refresh_layers(docker)
            super().showPopup()

    row = W.QHBoxLayout()
    docker.control_layer = LayerBox()
    docker.control_layer.setToolTip("a paint layer whose pixels steer where things go")
    docker.control_model = W.QComboBox()
    docker.control_model.setToolTip("the server's control models (hello's controls)")
    docker.control_module = W.QComboBox()
    docker.control_module.addItems(list(ec.MODULES))
    docker.control_module.setToolTip("none: white lines on black; invert: black lines on white")
    docker.control_weight = W.QDoubleSpinBox()
    docker.control_weight.setRange(0.0, 2.0)
    docker.control_weight.setSingleStep(0.1)
    docker.control_weight.setValue(1.0)
    for widget in (
        docker.control_layer,
        docker.control_model,
        docker.control_module,
        docker.control_weight,
    ):
        row.addWidget(widget)
    form.addRow("Control", row)
    refresh_layers(docker)
    refresh_models(docker)


def refresh_layers(docker, doc=None) -> None:
    """The layer list of ``doc`` (default: the active document), the choice kept by name."""
    if doc is None:
        from krita import Krita

        doc = Krita.instance().activeDocument()
    box = docker.control_layer
    current = box.currentText()
    names = [n.name() for n in paint_layers(doc)]
    box.clear()
    box.addItems([NONE, *names])
    if current in names:
        box.setCurrentIndex(names.index(current) + 1)


def refresh_models(docker) -> None:
    """The server's control models; the row's model box is off when it has none."""
    names = docker.controller.conn.adapters("controls")
    box = docker.control_model
    if [box.itemText(i) for i in range(box.count())] == names:
        return
    box.clear()
    box.addItems(names)
    box.setEnabled(bool(names))


def choose(docker) -> tuple[ec.ControlChoice, str] | None:
    """What the row asks for (None: no control layer), as the controller keeps it."""
    layer = docker.control_layer.currentText()
    model = docker.control_model.currentText()
    if not layer or layer == NONE:
        return None
    if not model:
        raise geo.EditorError("the server offers no control model for the control layer")
    choice = ec.ControlChoice(
        model=model,
        weight=docker.control_weight.value(),
        module=docker.control_module.currentText(),
    )
    return choice, layer


def choose_for(docker) -> bool:
    """Before a docker action: the controller keeps the row's choice; False (and the
    reason shown) when the row cannot be used."""
    try:
        docker.controller.control_layer = choose(docker)
    except geo.EditorError as e:
        docker.controller.failed.emit(str(e))
        return False
    return True
