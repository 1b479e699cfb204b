"""Runs inside Krita (`kritarunner -s krita_upscale_scenario`), driven by tests/test_upscale.py.

Upscale through the installed plug-in's own path (the docker's Upscale: `sdkit_krita.upscale`
on a Controller polled by its QTimer) against a live sdkit server: to a new document, to a
layer of the scaled document, cancelled, and refused by the server. Writes what it saw to
$SDKIT_OUT (report.json, the source and result pixels) for the test to judge.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

W, H = 32, 24


def gradient(width, height):
    px = bytearray()
    for y in range(height):
        for x in range(width):
            px += bytes([(x * 8) % 256, (y * 10) % 256, 160, 255])
    return bytes(px)


def new_painted(app, width, height, name):
    from sdkit_krita.pictures import rgba_to_bgra

    doc = app.createDocument(width, height, name, "RGBA", "U8", "", 72.0)
    doc.rootNode().childNodes()[0].setPixelData(
        rgba_to_bgra(gradient(width, height)), 0, 0, width, height
    )
    doc.refreshProjection()
    doc.waitForDone()
    return doc


def run_upscale(controller, params, factor, target, doc, cancel=False, start=None):
    """Start an Upscale on `controller` (or call `start()`) and spin Qt until it ends."""
    from sdkit_krita import upscale as up
    from sdkit_krita.qt import QtCore

    if start is None:
        start = lambda: up.upscale(controller, params, factor, target, doc)  # noqa: E731

    loop = QtCore.QEventLoop()
    seen = {"failed": None, "layer": None, "watchdog": False, "progress": 0}

    def on_progress(fraction, status, preview):
        seen["progress"] += 1
        if cancel and fraction > 0 and not seen.get("cancelled"):
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

    slots = (
        (controller.progress_changed, on_progress),
        (controller.failed, on_failed),
        (controller.finished, on_finished),
        (controller.busy_changed, on_busy),
    )
    for signal, slot in slots:
        signal.connect(slot)
    watchdog = QtCore.QTimer()
    watchdog.setSingleShot(True)
    watchdog.timeout.connect(lambda: (seen.update(watchdog=True), loop.quit()))
    watchdog.start(300_000)
    try:
        if start():
            loop.exec() if hasattr(loop, "exec") else loop.exec_()
    finally:
        for signal, slot in slots:
            signal.disconnect(slot)
    seen["state"] = controller.action.state if controller.action else None
    return seen


def layer_info(node):
    if node is None:
        return None
    r = node.bounds()
    return {"name": node.name(), "bounds": [r.x(), r.y(), r.width(), r.height()]}


def scenario(out):
    from krita import Krita
    from sdkit_krita import canvas
    from sdkit_krita import editor_actions as ea
    from sdkit_krita import editor_geometry as geo
    from sdkit_krita.controller import Controller

    app = Krita.instance()
    report = {}
    controller = Controller(os.environ["SDKIT_ADDRESS"])
    params = ea.Params(prompt="a red circle", num_inference_steps=8, seed=21, strength=0.5)

    # To a new document: the source stays as it was.
    doc = new_painted(app, W, H, "source")
    with open(os.path.join(out, "source.bin"), "wb") as f:
        f.write(canvas.read_rgba(doc, geo.Rect(0, 0, W, H)))
    seen = run_upscale(controller, params, 2.0, "document", doc)
    made = controller.action.result_document if controller.action else None
    new = [made] if made is not None and made is not doc else []
    report["document"] = {
        "failed": seen["failed"],
        "watchdog": seen["watchdog"],
        "state": seen["state"],
        "layer": layer_info(seen["layer"]),
        "new_document": bool(new),
        "new_name": new[0].name() if new else None,
        "new_size": [new[0].width(), new[0].height()] if new else None,
        "source_size": [doc.width(), doc.height()],
        "source_layers": len(doc.rootNode().childNodes()),
    }
    if new:
        with open(os.path.join(out, "result.bin"), "wb") as f:
            f.write(canvas.read_rgba(new[0], geo.Rect(0, 0, 2 * W, 2 * H)))

    # To a layer: the document is scaled to the result's size, the result on top.
    doc2 = new_painted(app, W, H, "scaled")
    layers = len(doc2.rootNode().childNodes())
    seen = run_upscale(controller, params, 2.0, "layer", doc2)
    report["layer"] = {
        "failed": seen["failed"],
        "state": seen["state"],
        "layer": layer_info(seen["layer"]),
        "size": [doc2.width(), doc2.height()],
        "layers_added": len(doc2.rootNode().childNodes()) - layers,
    }

    # Cancelled mid-run: nothing is added, nothing is scaled.
    doc3 = new_painted(app, 96, 96, "cancelled")
    slow = ea.Params(prompt="a red circle", num_inference_steps=40, seed=1, strength=0.5)
    seen = run_upscale(controller, slow, 2.0, "layer", doc3, cancel=True)
    report["cancel"] = {
        "state": seen["state"],
        "cancelled": bool(seen.get("cancelled")),
        "size": [doc3.width(), doc3.height()],
        "layers": len(doc3.rootNode().childNodes()),
        "new_document": controller.action.result_document is not None,
    }

    # Refused by the server (over 4096 per side): a message naming the field, no change.
    doc4 = app.createDocument(2100, 600, "too big", "RGBA", "U8", "", 72.0)
    seen = run_upscale(controller, params, 2.0, "layer", doc4)
    report["refused"] = {
        "state": seen["state"],
        "failed": seen["failed"],
        "size": [doc4.width(), doc4.height()],
        "layers": len(doc4.rootNode().childNodes()),
    }
    report["docker"] = docker_upscale(app)
    return report


def docker_upscale(app):
    """The docker's Upscale row: x4 to a new layer at the row's strength, through its
    shared controller; the server's upscale mode is among its buttons."""
    from sdkit_krita import controller
    from sdkit_krita import upscale as up
    from sdkit_krita.docker import SdkitDocker

    shared = controller.shared()
    shared.connect_to(os.environ["SDKIT_ADDRESS"])
    docker = SdkitDocker()
    spin(lambda: shared.conn.state == "connected", 30)
    spin(lambda: "upscale" in docker.buttons, 5)
    docker.prompt.setPlainText("a red circle")
    docker.steps.setValue(4)
    docker.seed.setValue(8)
    docker.upscale_factor.setCurrentIndex(1)  # x4
    docker.upscale_target.setCurrentIndex(1)  # new layer
    doc = new_painted(app, 16, 12, "docker")
    seen = run_upscale(shared, None, None, None, doc, start=lambda: up.run_from_docker(docker, doc))
    request = shared.action.request_kwargs()["request"] if shared.action else {}
    return {
        "buttons": list(docker.buttons),
        "factors": [
            docker.upscale_factor.itemText(i) for i in range(docker.upscale_factor.count())
        ],
        "state": seen["state"],
        "failed": seen["failed"],
        "size": [doc.width(), doc.height()],
        "request": {k: request.get(k) for k in ("upscale_factor", "strength", "seed")},
    }


def spin(condition, seconds):
    """Run Qt's event loop until condition() or timeout (the controller's timer pumps)."""
    import time

    from sdkit_krita.qt import QtCore

    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        loop = QtCore.QEventLoop()
        QtCore.QTimer.singleShot(20, loop.quit)
        loop.exec() if hasattr(loop, "exec") else loop.exec_()
    return condition()


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
