"""Runs inside Krita (`kritarunner -s krita_live_scenario`), driven by tests/test_krita.py -k live.

Live mode through the installed plug-in (`sdkit_krita.live` on a Controller, both polled
by their QTimers) against a live sdkit server: toggle on, paint on the layer by script,
the `[sdkit live]` layer follows; a selection turns the stream into inpaint; Apply makes a
normal layer; live off removes the preview layer. Writes report.json to $SDKIT_OUT.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import zlib

W, H = 64, 64


def gradient(width, height):
    px = bytearray()
    for y in range(height):
        for x in range(width):
            px += bytes([(x * 4) % 256, (y * 4) % 256, 160, 255])
    return bytes(px)


def spin(condition, seconds):
    """Run Qt's event loop until condition() or timeout (the plug-in's timers run)."""
    from sdkit_krita.qt import QtCore

    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        loop = QtCore.QEventLoop()
        QtCore.QTimer.singleShot(20, loop.quit)
        loop.exec() if hasattr(loop, "exec") else loop.exec_()
    return condition()


def step(name):
    print("STEP", name, flush=True)  # the log says how far it got if Krita dies


def layers(doc):
    return [n.name() for n in doc.rootNode().childNodes() if n.type().endswith("layer")]


def pixels_crc(node):
    return zlib.crc32(bytes(node.pixelData(0, 0, W, H)))


def scenario(out):
    from krita import Krita, Selection
    from sdkit_krita import editor_actions as ea
    from sdkit_krita import live as lv
    from sdkit_krita.controller import Controller
    from sdkit_krita.pictures import rgba_to_bgra

    app = Krita.instance()
    report = {}
    controller = Controller(os.environ["SDKIT_ADDRESS"])
    controller.connect_to()
    report["connected"] = spin(lambda: controller.conn.state == "connected", 60)
    doc = app.createDocument(W, H, "live", "RGBA", "U8", "", 72.0)
    paint = doc.rootNode().childNodes()[0]
    paint.setPixelData(rgba_to_bgra(gradient(W, H)), 0, 0, W, H)
    doc.setActiveNode(paint)
    doc.refreshProjection()
    doc.waitForDone()
    # No view: in kritarunner (offscreen) Krita.openWindow() ends the process, so Krita's
    # own Undo action has no document to act on here; the test says what it can check.
    report["view"] = False

    params = lambda: ea.Params(  # noqa: E731 - the docker's fields
        prompt="a red circle", num_inference_steps=4, seed=7, strength=0.6
    )
    step("live = lv.LiveMode(")
    live = lv.LiveMode(controller, params)
    live.start(doc)
    report["first"] = spin(lambda: live.frames >= 1, 300)
    live_layer = live.layer
    first = pixels_crc(live_layer) if live_layer is not None else None
    sent_before = len(live.sent)
    # Nothing changes: no request is sent over ten polls.
    report["idle_sent"] = spin(lambda: len(live.sent) > sent_before, 1.0)

    step("# Three strokes")
    # Three strokes painted on the layer by script; the preview layer follows each.
    strokes = []
    for i in range(3):
        frames = live.frames
        block = bytes([255, 30, 30, 255]) * (12 * 12)
        paint.setPixelData(rgba_to_bgra(block), 6 + 18 * i, 10 + 14 * i, 12, 12)
        doc.refreshProjection()
        shown = spin(lambda f=frames: live.frames > f and not live._pending, 300)
        last = live.sent[-1]
        strokes.append(
            {
                "shown": shown,
                "crc": pixels_crc(live.layer),
                "mode": last.request_kwargs()["request"]["mode"],
                "seed": last.request_kwargs()["request"].get("seed"),
                "frame_equals_layer": bytes(live.layer.pixelData(0, 0, W, H))
                == rgba_to_bgra(live.frame.rgba),
            }
        )
    report["strokes"] = strokes
    report["first_crc"] = first

    step("# A selection")
    # A selection: the next frame is an inpaint of it.
    selection = Selection()
    selection.select(20, 20, 24, 24, 255)
    doc.setSelection(selection)
    frames = live.frames
    report["inpaint_shown"] = spin(lambda: live.frames > frames and not live._pending, 300)
    report["inpaint_mode"] = live.sent[-1].request_kwargs()["request"]["mode"]
    report["inpaint_bounds"] = [live.frame.x, live.frame.y, live.frame.width, live.frame.height]
    doc.setSelection(Selection())  # an empty selection object clears it
    doc.waitForDone()

    report["layers_live"] = layers(doc)
    report["live_locked"] = live.layer.locked()
    report["superseded"] = sum(1 for a in live.sent if a.job.superseded)
    report["sent"] = len(live.sent)

    step("# Apply:")
    # Apply: a normal layer with the frame's pixels, one undo step.
    applied = live.apply()
    doc.waitForDone()
    report["applied"] = {
        "name": applied.name(),
        "type": applied.type(),
        "locked": applied.locked(),
        "same_pixels": bytes(
            applied.pixelData(live.frame.x, live.frame.y, live.frame.width, live.frame.height)
        )
        == rgba_to_bgra(live.frame.rgba),
    }
    report["layers_applied"] = layers(doc)
    report["paint_crc"] = pixels_crc(paint)

    step("# The server restarts")
    report["restart"] = restart(live, doc, paint)

    step("live.stop()")
    live.stop()
    doc.waitForDone()
    report["layers_off"] = layers(doc)
    step("# The model changes")
    report["switch"] = switch_model(controller, doc, paint)
    step("report['docker'] = docker_row(")
    report["docker"] = docker_row()
    return report


def server(out, n, cmd):
    """Tell the test's server_control to ``cmd`` (stop, start, switch) and wait until done."""
    tmp = os.path.join(out, "server_cmd.tmp")
    with open(tmp, "w") as f:
        json.dump({"n": n, "cmd": cmd}, f)
    os.replace(tmp, os.path.join(out, "server_cmd.json"))
    ack = os.path.join(out, "server_ack.json")

    def done():
        try:
            with open(ack) as f:
                return json.load(f)["n"] == n
        except (OSError, ValueError):
            return False

    if not spin(done, 60):
        raise RuntimeError(f"the test's server did not {cmd}")
    with open(ack) as f:
        error = json.load(f)["error"]
    if error:
        raise RuntimeError(f"the test's server could not {cmd}: {error}")


def stroke(doc, paint, x, y, colour):
    from sdkit_krita.pictures import rgba_to_bgra

    paint.setPixelData(rgba_to_bgra(bytes(colour) * (10 * 10)), x, y, 10, 10)
    doc.refreshProjection()


def restart(live, doc, paint):
    """The server stops while live is on and comes back on the same address: the status
    says reconnecting meanwhile; a stroke painted while it is down, and one after, each
    give a new frame without touching the toggle."""
    from sdkit_krita.pictures import rgba_to_bgra

    out = os.environ["SDKIT_OUT"]
    statuses = []
    live.status_changed.connect(statuses.append)
    seen = {"frames": live.frames, "sent": len(live.sent), "crc": pixels_crc(live.layer)}
    server(out, 1, "stop")
    seen["reconnecting"] = spin(lambda: any("reconnecting" in s for s in statuses), 30)
    # Down long enough for the connection to give up once (5 s hello timeout) and retry.
    seen["gave_up"] = spin(lambda: any("no sdkit server answers" in s for s in statuses), 60)
    stroke(doc, paint, 40, 4, (30, 200, 30, 255))
    seen["shown_while_down"] = spin(lambda: live.frames > seen["frames"], 1.0)
    seen["statuses_down"] = sorted(set(statuses))[:8]
    server(out, 2, "start")
    frames = live.frames
    seen["resumed"] = spin(lambda: live.frames > frames and not live._pending, 180)
    seen["status_resumed"] = statuses[-1] if statuses else None
    seen["crc_resumed"] = pixels_crc(live.layer)
    frames = live.frames
    stroke(doc, paint, 4, 44, (30, 30, 200, 255))
    seen["after"] = spin(lambda: live.frames > frames and not live._pending, 180)
    seen["crc_after"] = pixels_crc(live.layer)
    seen["sent_after"] = len(live.sent)
    seen["pending_after"] = len(live._pending)
    seen["frame_equals_layer"] = bytes(live.layer.pixelData(0, 0, W, H)) == rgba_to_bgra(
        live.frame.rgba
    )
    seen["live_layers"] = layers(doc).count("[sdkit live]")
    seen["on"] = live.on
    live.status_changed.disconnect(statuses.append)
    return seen


def switch_model(controller, doc, paint):
    """Live on through the docker; the server comes back with another model: the stream
    stops with a message, the toggle goes off, no request is sent any more."""
    from sdkit_krita import controller as ctl
    from sdkit_krita.docker import SdkitDocker

    out = os.environ["SDKIT_OUT"]
    ctl._shared = controller  # the docker's shared controller is the scenario's
    docker = SdkitDocker()
    docker.prompt.setPlainText("a red circle")
    docker.steps.setValue(4)
    docker.seed.setValue(7)
    live = docker.live
    docker.live_button.blockSignals(True)  # no active document without a view: start on doc
    docker.live_button.setChecked(True)
    docker.live_button.blockSignals(False)
    live.start(doc)
    seen = {"first": spin(lambda: live.frames >= 1 and not live._pending, 180)}
    seen["model_before"] = controller.conn.model.get("spec")
    server(out, 3, "switch")
    seen["stopped"] = spin(lambda: not live.on, 60)
    seen["model_after"] = controller.conn.model.get("spec")
    seen["status"] = docker.live_status.text()
    seen["checked"] = docker.live_button.isChecked()
    seen["layers"] = layers(doc)
    sent = len(live.sent)
    stroke(doc, paint, 50, 50, (200, 200, 30, 255))
    seen["sent_after_stop"] = spin(lambda: len(live.sent) > sent, 1.0)
    return seen


def docker_row():
    """The docker has the Live toggle and Apply, Apply disabled until a frame shows."""
    from sdkit_krita.docker import SdkitDocker

    docker = SdkitDocker()
    return {
        "live": docker.live_button.text(),
        "checkable": docker.live_button.isCheckable(),
        "apply_enabled": docker.apply_button.isEnabled(),
    }


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
