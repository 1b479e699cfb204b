"""Krita's side of the pixels: read the merged image and selection, add the result layer.

Kept to the few libkis calls that exist in Krita 5.1 and 6; everything else is in
``editor_geometry`` and ``pictures``.
"""

from __future__ import annotations

from . import editor_geometry as geo
from .pictures import bgra_to_rgba, rgba_to_bgra


def check_document(doc) -> None:
    """Refuse what the byte-level code cannot read: anything but 8-bit RGBA."""
    if doc is None:
        raise geo.EditorError("no document is open")
    model, depth = doc.colorModel(), doc.colorDepth()
    if (model, depth) != ("RGBA", "U8"):
        raise geo.EditorError(
            f"sdkit works on 8-bit RGBA documents; this one is {model}/{depth}. "
            "Convert it with Image > Convert Image Color Space (RGB/Alpha, 8-bit integer)."
        )


def selection_rect(doc) -> geo.Rect | None:
    """The selection's bounds, or None when there is no selection at all."""
    sel = doc.selection()
    if sel is None:
        return None
    return geo.Rect(sel.x(), sel.y(), sel.width(), sel.height())


def read_rgba(doc, rect: geo.Rect) -> bytes:
    """The merged image under ``rect`` as straight RGBA8 (Krita stores BGRA)."""
    doc.waitForDone()
    data = bytes(doc.pixelData(rect.x, rect.y, rect.width, rect.height))
    return bgra_to_rgba(data)


def read_mask(doc, rect: geo.Rect) -> bytes | None:
    """The selection's 8-bit soft mask under ``rect``, or None without a selection."""
    sel = doc.selection()
    if sel is None:
        return None
    return bytes(sel.pixelData(rect.x, rect.y, rect.width, rect.height))


def add_layer(doc, placement: geo.Placement, above=None):
    """Add ``placement`` as a new paint layer above ``above`` (default: the active layer), as
    one undo step.

    The layer is filled before it is added, so adding it is the only change to the
    image and one undo removes it.
    """
    node = doc.createNode(placement.name, "paintlayer")
    node.setPixelData(
        rgba_to_bgra(placement.rgba), placement.x, placement.y, placement.width, placement.height
    )
    active = above if above is not None else doc.activeNode()
    parent = active.parentNode() if active is not None else None
    if parent is None or active.type() == "" or parent.type() == "":
        parent = doc.rootNode()
        # On top of the stack, but among the layers (the global selection is a child too).
        layers = [n for n in parent.childNodes() if n.type().endswith("layer")]
        above = layers[-1] if layers else None
    else:
        above = active
    parent.addChildNode(node, above)
    doc.refreshProjection()
    doc.waitForDone()
    return node


def grow_and_add_layer(doc, action):
    """Expand canvas: grow ``doc`` by the action's sides, then add its placement as a layer.

    Checked first (the document must still have the size that was sent); if adding the layer
    fails, the document goes back to its old size, so nothing is left half-written.
    """
    width, height = action.canvas_size
    if (doc.width(), doc.height()) != (width, height):
        raise geo.EditorError(
            f"the document is now {doc.width()}x{doc.height()}, not the {width}x{height} that "
            "was sent: expand it again"
        )
    s = action.sides
    doc.resizeImage(-s.left, -s.top, width + s.left + s.right, height + s.top + s.bottom)
    doc.waitForDone()
    try:
        return add_layer(doc, action.placement)
    except Exception:
        doc.resizeImage(s.left, s.top, width, height)
        doc.waitForDone()
        raise
