"""Runs inside Krita (`kritarunner -s krita_scenario`), driven by tests/test_krita.py.

Uses the installed plug-in's own code path (the docker's Controller, polled by its
QTimer) against a live sdkit server, and writes what it saw to $SDKIT_OUT for the test
to judge: the merged image before and after, the selection mask, the layers.
Settings come from the environment: SDKIT_ADDRESS, SDKIT_DEAD_ADDRESS, SDKIT_OUT.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

W, H = 101, 77  # not multiples of 8
ELLIPSE = (23, 17, 41, 29)  # x, y, w, h at odd offsets


def ellipse_mask(width, height, box, samples=4):
    """An anti-aliased ellipse as an 8-bit mask (coverage from samples x samples)."""
    x0, y0, w, h = box
    cx, cy, rx, ry = x0 + w / 2, y0 + h / 2, w / 2, h / 2
    out = bytearray(width * height)
    n = samples * samples
    for y in range(max(0, y0 - 1), min(height, y0 + h + 1)):
        for x in range(max(0, x0 - 1), min(width, x0 + w + 1)):
            hits = 0
            for sy in range(samples):
                for sx in range(samples):
                    px = (x + (sx + 0.5) / samples - cx) / rx
                    py = (y + (sy + 0.5) / samples - cy) / ry
                    hits += px * px + py * py <= 1.0
            out[y * width + x] = (hits * 255 + n // 2) // n
    return bytes(out)


def painting(width, height):
    """Something to inpaint over: a gradient with a dark bar across the ellipse."""
    px = bytearray()
    for y in range(height):
        for x in range(width):
            if 30 <= y < 40:
                px += bytes([20, 20, 20, 255])
            else:
                px += bytes([(x * 5) % 256, (y * 3) % 256, 160, 255])
    return bytes(px)


def run_controller(controller, mode, params, doc, cancel_after_first_progress=False):
    """Run one action through the Controller and spin Qt until it ends."""
    from sdkit_krita.qt import QtCore

    loop = QtCore.QEventLoop()
    seen = {"progress": 0, "failed": None, "layer": None, "previews": 0}

    def on_progress(fraction, status, preview):
        seen["progress"] += 1
        if preview is not None:
            seen["previews"] += 1
        if cancel_after_first_progress and fraction > 0 and not seen.get("cancelled"):
            seen["cancelled"] = True
            controller.cancel()

    def on_failed(message):
        seen["failed"] = message
        loop.quit()

    def on_finished(layer):
        seen["layer"] = layer
        loop.quit()

    def on_busy(busy):
        if not busy:
            QtCore.QTimer.singleShot(0, loop.quit)

    controller.progress_changed.connect(on_progress)
    controller.failed.connect(on_failed)
    controller.finished.connect(on_finished)
    controller.busy_changed.connect(on_busy)
    watchdog = QtCore.QTimer()
    watchdog.setSingleShot(True)
    watchdog.timeout.connect(loop.quit)
    watchdog.start(180_000)
    try:
        if controller.run(mode, params, doc):
            loop.exec() if hasattr(loop, "exec") else loop.exec_()
    finally:
        for signal, slot in (
            (controller.progress_changed, on_progress),
            (controller.failed, on_failed),
            (controller.finished, on_finished),
            (controller.busy_changed, on_busy),
        ):
            signal.disconnect(slot)
    seen["state"] = controller.action.state if controller.action else None
    return seen


def bounds(node):
    r = node.bounds()
    return [r.x(), r.y(), r.width(), r.height()]


def scenario(out):
    from krita import Krita, Selection
    from sdkit_krita import canvas
    from sdkit_krita import editor_common as ec
    from sdkit_krita.controller import Controller

    report = {}
    app = Krita.instance()

    # A non-RGBA8 document is refused with a message.
    doc16 = app.createDocument(16, 16, "u16", "RGBA", "U16", "", 72.0)
    try:
        canvas.check_document(doc16)
        report["u16_refused"] = None
    except ec.EditorError as e:
        report["u16_refused"] = str(e)
    doc16.close()

    # A dead server gives a clear message, without hanging.
    dead = Controller(os.environ["SDKIT_DEAD_ADDRESS"])
    doc = app.createDocument(W, H, "sdkit test", "RGBA", "U8", "", 72.0)
    seen = run_controller(dead, "txt2img", ec.Params(prompt="x", width=8, height=8), doc)
    report["dead_server"] = seen["failed"]

    # Paint, select an anti-aliased ellipse, inpaint it.
    background = doc.rootNode().childNodes()[0]
    background.setPixelData(ec.rgba_to_bgra(painting(W, H)), 0, 0, W, H)
    doc.refreshProjection()
    doc.waitForDone()
    mask = ellipse_mask(W, H, ELLIPSE)
    selection = Selection()
    selection.setPixelData(mask, 0, 0, W, H)
    doc.setSelection(selection)
    sel = doc.selection()
    report["selection_bounds"] = [sel.x(), sel.y(), sel.width(), sel.height()]
    with open(os.path.join(out, "mask.bin"), "wb") as f:
        f.write(bytes(sel.pixelData(0, 0, W, H)))
    with open(os.path.join(out, "before.bin"), "wb") as f:
        f.write(canvas.read_rgba(doc, ec.Rect(0, 0, W, H)))

    controller = Controller(os.environ["SDKIT_ADDRESS"])
    params = ec.Params(prompt="a red circle", num_inference_steps=8, seed=11, strength=1.0)
    seen = run_controller(controller, "inpaint", params, doc)
    report["inpaint"] = {
        "failed": seen["failed"],
        "state": seen["state"],
        "progress_signals": seen["progress"],
        "previews": seen["previews"],
        "layer": seen["layer"].name() if seen["layer"] else None,
        "bounds": bounds(seen["layer"]) if seen["layer"] else None,
    }
    doc.refreshProjection()
    doc.waitForDone()
    with open(os.path.join(out, "after.bin"), "wb") as f:
        f.write(canvas.read_rgba(doc, ec.Rect(0, 0, W, H)))

    # Generate (txt2img) adds a layer of the requested size at the selection's corner.
    seen = run_controller(
        controller,
        "txt2img",
        ec.Params(prompt="a blue square", num_inference_steps=4, seed=5, width=64, height=48),
        doc,
    )
    report["txt2img"] = {
        "failed": seen["failed"],
        "layer": seen["layer"].name() if seen["layer"] else None,
        "bounds": bounds(seen["layer"]) if seen["layer"] else None,
    }

    # Cancel stops a running request; no layer is added.
    before = len(doc.rootNode().childNodes())
    seen = run_controller(
        controller,
        "txt2img",
        ec.Params(prompt="a green star", num_inference_steps=500, seed=1, width=64, height=64),
        doc,
        cancel_after_first_progress=True,
    )
    report["cancel"] = {
        "state": seen["state"],
        "failed": seen["failed"],
        "layers_added": len(doc.rootNode().childNodes()) - before,
    }
    report["layers"] = [[n.name(), n.type()] for n in doc.rootNode().childNodes()]
    return report


def __main__(args):
    out = os.environ["SDKIT_OUT"]
    try:
        report = scenario(out)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        report = {"exception": traceback.format_exc()}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    sys.stdout.flush()
    return 0
