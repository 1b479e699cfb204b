"""Runs inside a full Krita with a window (under Xvfb), driven by tests/test_krita.py -k undo.

kritarunner has no window (its offscreen ``Krita.openWindow()`` crashes), and Krita's Undo
is an action of a window's view; so this module is imported by a small start-up plug-in
(written by the test) and runs once the main window exists. Through the installed plug-in's
docker: Live on (the toggle), frames for scripted strokes, Apply, then Krita's own
Edit > Undo for every step the Undo History docker lists; Live off. Writes report.json to
$SDKIT_OUT, then ends Krita (a normal quit would ask about the unsaved document).
"""

from __future__ import annotations

import json
import os
import traceback
import zlib

from krita_live_scenario import H, W, gradient, layers, spin, step


def names(doc):
    return layers(doc)


def history(window):
    """The texts of Krita's Undo History docker (its list is the document's undo stack:
    "<empty>" first, then one row per undo step)."""
    from sdkit_krita.qt import QtWidgets

    qwin = window.qwindow()
    for dock in qwin.findChildren(QtWidgets.QDockWidget):
        if dock.objectName() == "History":
            views = dock.findChildren(QtWidgets.QListView)
            if views and views[0].model() is not None:
                model = views[0].model()
                return [model.index(i, 0).data() for i in range(model.rowCount())]
    return None


def save(report):
    """report.json so far: a scenario that hangs still says how far it got."""
    with open(os.path.join(os.environ["SDKIT_OUT"], "report.json"), "w") as f:
        json.dump(report, f, indent=1)


def scenario():
    from krita import Krita
    from sdkit_krita.docker import current_docker
    from sdkit_krita.pictures import rgba_to_bgra

    app = Krita.instance()
    report = {}
    window = app.activeWindow()
    report["window"] = window is not None
    doc = app.createDocument(W, H, "undo", "RGBA", "U8", "", 72.0)
    paint = doc.rootNode().childNodes()[0]
    paint.setPixelData(rgba_to_bgra(gradient(W, H)), 0, 0, W, H)
    window.addView(doc)
    app.setActiveDocument(doc)
    doc.setActiveNode(paint)
    doc.refreshProjection()
    doc.waitForDone()
    undo = app.action("edit_undo")
    spin(lambda: False, 0.5)
    report["docks"] = sorted(d.objectName() for d in app.dockers())
    report["history_start"] = history(window)

    save(report)
    step("the docker connects")
    docker = current_docker()
    report["docker"] = docker is not None
    docker.address.setText(os.environ["SDKIT_ADDRESS"])
    docker.reconnect.click()
    report["connected"] = spin(lambda: docker.controller.conn.state == "connected", 60)
    docker.prompt.setPlainText("a red circle")
    docker.steps.setValue(4)
    docker.seed.setValue(7)
    docker.strength.setValue(0.6)
    live = docker.live

    save(report)
    step("Live on")
    docker.live_button.click()  # the toggle, as the artist clicks it
    report["live_on"] = live.on
    report["status_on"] = docker.live_status.text()
    report["first"] = spin(lambda: live.frames >= 1 and not live._pending, 120)
    for i in range(3):
        frames = live.frames
        block = rgba_to_bgra(bytes([255, 30, 30, 255]) * (12 * 12))
        paint.setPixelData(block, 6 + 18 * i, 10 + 14 * i, 12, 12)
        doc.refreshProjection()
        spin(lambda f=frames: live.frames > f and not live._pending, 120)
    report["frames"] = live.frames
    report["apply_enabled"] = docker.apply_button.isEnabled()
    paint_crc = zlib.crc32(bytes(paint.pixelData(0, 0, W, H)))

    save(report)
    step("Apply")
    docker.apply_button.click()
    doc.waitForDone()
    report["layers_applied"] = names(doc)
    spin(lambda: False, 0.3)
    report["history_applied"] = history(window)

    save(report)
    step("Undo until there is nothing to undo")
    report["sent_before_undo"] = len(live.sent)
    undos = []
    steps = len(report["history_applied"] or [None, None]) - 1  # all but "<empty>"
    while len(undos) < steps:
        undo.trigger()
        doc.waitForDone()
        spin(lambda: False, 0.3)  # let the live timer poll: nothing is sent for an undo
        undos.append(names(doc))
    report["undos"] = undos
    report["paint_same"] = zlib.crc32(bytes(paint.pixelData(0, 0, W, H))) == paint_crc
    report["sent_after_undo"] = len(live.sent)

    save(report)
    step("Live off")
    docker.live_button.click()
    doc.waitForDone()
    report["live_off"] = not live.on
    report["layers_off"] = names(doc)
    spin(lambda: False, 0.3)
    report["history_off"] = history(window)

    save(report)
    step("Live on and off again, then Undo")
    report["active_after_undo"] = doc.activeNode().name() if doc.activeNode() else None
    doc.setActiveNode(paint)  # the artist picks the layer to paint on (Undo may have moved it)
    spin(lambda: False, 0.3)
    docker.live_button.click()
    report["status_again"] = docker.live_status.text()
    frames = live.frames
    report["again_frame"] = spin(lambda: live.frames > frames and not live._pending, 120)
    report["history_again"] = history(window)
    docker.live_button.click()
    doc.waitForDone()
    spin(lambda: False, 0.3)
    report["history_again_off"] = history(window)
    undo.trigger()
    doc.waitForDone()
    spin(lambda: False, 0.3)
    report["layers_undo_off"] = names(doc)
    doc.setActiveNode(paint)
    spin(lambda: False, 0.3)
    docker.live_button.click()  # Live on again: the preview layer brought back is reused
    report["status_relive"] = docker.live_status.text()
    frames = live.frames
    report["relive_frame"] = spin(lambda: live.frames > frames and not live._pending, 120)
    report["layers_relive"] = names(doc)
    docker.live_button.click()
    doc.waitForDone()
    report["layers_relive_off"] = names(doc)
    return report


def run():
    out = os.environ["SDKIT_OUT"]
    try:
        report = scenario()
        report["complete"] = True
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        report = {"exception": traceback.format_exc()}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    os._exit(0)  # a normal quit would stop at "save the changes?"


def install():
    """Run the scenario once Krita's main window is up (called by the start-up plug-in)."""
    from krita import Extension, Krita
    from sdkit_krita.qt import QTimer

    class Driver(Extension):
        def setup(self):
            Krita.instance().notifier().windowCreated.connect(lambda: QTimer.singleShot(500, run))

        def createActions(self, window):
            pass

    Krita.instance().addExtension(Driver(Krita.instance()))
