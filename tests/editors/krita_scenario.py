"""Runs inside Krita (`kritarunner -s krita_scenario`), driven by tests/test_krita.py.

Uses the installed plug-in's own code path (the docker's Controller, polled by its
QTimer) against a live sdkit server, and writes what it saw to $SDKIT_OUT for the test
to judge: the merged image before and after, the selection mask, the layers.
Settings come from the environment: SDKIT_ADDRESS, SDKIT_DEAD_ADDRESS, SDKIT_OUT, and
SDKIT_DOOMED_1/SDKIT_DOOMED_2 ("address pid" of servers this scenario SIGKILLs to show
that Krita survives the server going away at any moment).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
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


def run_controller(controller, mode, params, doc, cancel_after_first_progress=False, start=None):
    """Run one action through the Controller and spin Qt until it ends (``start()``: how to
    start it, default ``controller.run(mode, params, doc)``)."""
    from sdkit_krita.qt import QtCore

    loop = QtCore.QEventLoop()
    seen = {"progress": 0, "failed": None, "layer": None, "previews": 0, "watchdog": False}

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
    watchdog.timeout.connect(lambda: (seen.update(watchdog=True), loop.quit()))
    watchdog.start(180_000)
    try:
        if (start or (lambda: controller.run(mode, params, doc)))():
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


def spin(condition, seconds):
    """Run Qt's event loop (the controllers' timers keep pumping) until condition() or timeout."""
    from sdkit_krita.qt import QtCore

    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        loop = QtCore.QEventLoop()
        QtCore.QTimer.singleShot(20, loop.quit)
        loop.exec() if hasattr(loop, "exec") else loop.exec_()
    return condition()


def kill_and_wait(pid):
    """SIGKILL the server and wait until the kernel has closed its sockets (it is a zombie)."""
    os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.005)
    raise RuntimeError(f"server {pid} did not die")


def server_gone(doc):
    """Kill a server right after a heartbeat (then Generate) and mid-request (then Cancel).

    Both clicks write to a connection whose peer is dead: without MSG_NOSIGNAL the second
    write in a row raises SIGPIPE, whose default action kills Krita (and this scenario
    with it). With bridge/zmtp.py as first committed, the img2img click did just that.
    """
    from sdkit_krita import editor_actions as ea
    from sdkit_krita.controller import Controller

    report = {
        "sigpipe_at_start": str(signal.getsignal(signal.SIGPIPE)),
        "sigpipe_blocked": signal.SIGPIPE in signal.pthread_sigmask(signal.SIG_BLOCK, []),
    }
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # what Krita's embedded Python leaves

    # Four dockers' connections to servers in one process: four chances for the race
    # between a write and the RST that the write before it provoked.
    addresses, pid = os.environ["SDKIT_DOOMED_1"].split()
    controllers = [Controller(address) for address in addresses.split(",")]
    for c in controllers:
        c.connect_to()
    report["connected"] = spin(lambda: all(c.conn.state == "connected" for c in controllers), 60)
    transports = [c.conn.session.transport for c in controllers]
    since = time.monotonic()
    report["heartbeat"] = spin(  # a PING went out and the server's traffic came back after it
        lambda: all(
            since < getattr(t, "_last_ping", 0) < getattr(t, "_last_recv", 0) for t in transports
        ),
        15,
    )
    # Kill between heartbeats, once the server has read all we sent (its sockets then close
    # with a FIN, not a RST, and it is the second write after that which raises SIGPIPE).
    last = [getattr(t, "_last_recv", 0) for t in transports]
    spin(
        lambda: all(getattr(t, "_last_recv", 0) > x for t, x in zip(transports, last, strict=True)),
        5,
    )
    settled = time.monotonic() + 0.2
    spin(lambda: time.monotonic() > settled, 1)
    kill_and_wait(int(pid))
    # Img2img sends the request and its picture as several frames: several writes in a row.
    # All clicks come before Qt pumps any socket, so none has seen the server go yet.
    failures = []
    for c in controllers:
        failures.append([])
        c.failed.connect(failures[-1].append)
        c.run("img2img", ea.Params(prompt="x", num_inference_steps=4), doc)
    ended = spin(lambda: all(not c.busy and c.conn.state == "failed" for c in controllers), 60)
    report["after_heartbeat"] = [
        {
            "failed": failed[0] if failed else None,
            "state": c.action.state if c.action else None,
            "status": c.conn.status_text(),
            "watchdog": not ended,
        }
        for c, failed in zip(controllers, failures, strict=True)
    ]

    address, pid = os.environ["SDKIT_DOOMED_2"].split()
    c = Controller(address)
    c.connect_to()
    spin(lambda: c.conn.state == "connected", 60)
    killed = {}

    def kill_then_cancel(fraction, status, preview):
        if fraction > 0 and not killed:
            killed["at"] = status
            kill_and_wait(int(pid))
            c.cancel()  # the artist gives up: a write to the dead connection

    c.progress_changed.connect(kill_then_cancel)
    params = ea.Params(prompt="x", num_inference_steps=500, width=64, height=64)
    seen = run_controller(c, "txt2img", params, doc)
    spin(lambda: c.conn.state == "failed", 30)
    report["mid_request"] = {
        "killed_at": killed.get("at"),
        "failed": seen["failed"],
        "state": seen["state"],
        "status": c.conn.status_text(),
        "watchdog": seen["watchdog"],
    }
    return report


def docker_buttons():
    """The docker's mode buttons once its controller is connected: the server's titles."""
    from sdkit_krita import controller
    from sdkit_krita.docker import SdkitDocker

    shared = controller.shared()
    shared.connect_to(os.environ["SDKIT_ADDRESS"])
    docker = SdkitDocker()
    before = [b.text() for b in docker.buttons.values()]
    spin(lambda: shared.conn.state == "connected", 30)
    spin(lambda: [b.text() for b in docker.buttons.values()] != before, 5)
    chosen = docker.lora_names()[:1]
    docker.prompt.setPlainText("a red x")
    if chosen:  # the artist picks the first LoRA from the combo box
        docker.loras.setCurrentIndex(1)
        docker.loras.activated.emit(1)
    return {
        "loras": {
            "hello": shared.conn.info.get("loras"),
            "docker": docker.lora_names(),
            "enabled": docker.loras.isEnabled(),
            "chosen": chosen,
            "prompt": docker.prompt.toPlainText(),
            "combo_index": docker.loras.currentIndex(),
        },
        "before": before,
        "after": {name: b.text() for name, b in docker.buttons.items()},
        "hello": [m.get("title") for m in shared.conn.info.get("modes", []) if isinstance(m, dict)],
        "steps_max": docker.steps.maximum(),
    }


def expand_canvas(app, controller, out):
    """Expand canvas on a fresh document: refused requests leave it as it was; a good one
    grows it by the sides, adds one layer, and the old pixels stay (the test judges)."""
    from sdkit_krita import canvas
    from sdkit_krita import editor_actions as ea
    from sdkit_krita import editor_expand as ex
    from sdkit_krita import editor_geometry as geo
    from sdkit_krita.pictures import rgba_to_bgra

    doc = app.createDocument(W, H, "sdkit expand", "RGBA", "U8", "", 72.0)
    doc.rootNode().childNodes()[0].setPixelData(rgba_to_bgra(painting(W, H)), 0, 0, W, H)
    doc.refreshProjection()
    doc.waitForDone()
    before = canvas.read_rgba(doc, geo.Rect(0, 0, W, H))
    with open(os.path.join(out, "expand_before.bin"), "wb") as f:
        f.write(before)
    params = ea.Params(prompt="a red circle", num_inference_steps=6, seed=3)
    report = {"refused": []}

    def layers():
        return [n.name() for n in doc.rootNode().childNodes()]

    names = layers()
    for sides in (ex.Sides(), ex.Sides(right=4096)):  # nothing to add; over the size limit
        seen = run_expand(controller, params, sides, doc)
        report["refused"].append(
            {
                "failed": seen["failed"],
                "size": [doc.width(), doc.height()],
                "layers_same": layers() == names,
                "pixels_same": canvas.read_rgba(doc, geo.Rect(0, 0, W, H)) == before,
            }
        )
    sides = ex.Sides(left=24, bottom=16)
    seen = run_expand(controller, params, sides, doc, seam=8)
    doc.refreshProjection()
    doc.waitForDone()
    size = [doc.width(), doc.height()]
    with open(os.path.join(out, "expand_after.bin"), "wb") as f:
        f.write(canvas.read_rgba(doc, geo.Rect(0, 0, *size)))
    report.update(
        watchdog=seen["watchdog"],
        failed=seen["failed"],
        state=seen["state"],
        size=size,
        sides=[sides.left, sides.right, sides.top, sides.bottom],
        seam=8,
        layer=seen["layer"].name() if seen["layer"] else None,
        layer_bounds=bounds(seen["layer"]) if seen["layer"] else None,
        layers=layers(),
        before_layers=names,
    )
    doc.close()
    return report


def run_expand(controller, params, sides, doc, seam=32):
    """`run_controller` for Expand canvas (what the docker's button calls)."""
    start = lambda: controller.expand(params, sides, doc, seam=seam)  # noqa: E731
    return run_controller(controller, None, params, doc, start=start)


def bounds(node):
    r = node.bounds()
    return [r.x(), r.y(), r.width(), r.height()]


def scenario(out):
    from krita import Krita, Selection
    from sdkit_krita import canvas
    from sdkit_krita import editor_actions as ea
    from sdkit_krita import editor_geometry as geo
    from sdkit_krita.controller import Controller
    from sdkit_krita.pictures import rgba_to_bgra

    report = {}
    app = Krita.instance()

    # A non-RGBA8 document is refused with a message.
    doc16 = app.createDocument(16, 16, "u16", "RGBA", "U16", "", 72.0)
    try:
        canvas.check_document(doc16)
        report["u16_refused"] = None
    except geo.EditorError as e:
        report["u16_refused"] = str(e)
    doc16.close()

    # A dead server gives a clear message, without hanging.
    dead = Controller(os.environ["SDKIT_DEAD_ADDRESS"])
    doc = app.createDocument(W, H, "sdkit test", "RGBA", "U8", "", 72.0)
    seen = run_controller(dead, "txt2img", ea.Params(prompt="x", width=8, height=8), doc)
    report["dead_server"] = seen["failed"]

    # Paint, select an anti-aliased ellipse, inpaint it.
    background = doc.rootNode().childNodes()[0]
    background.setPixelData(rgba_to_bgra(painting(W, H)), 0, 0, W, H)
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
        f.write(canvas.read_rgba(doc, geo.Rect(0, 0, W, H)))

    controller = Controller(os.environ["SDKIT_ADDRESS"])
    params = ea.Params(prompt="a red circle", num_inference_steps=8, seed=11, strength=1.0)
    seen = run_controller(controller, "inpaint", params, doc)
    report["inpaint"] = {
        "watchdog": seen["watchdog"],
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
        f.write(canvas.read_rgba(doc, geo.Rect(0, 0, W, H)))

    # Generate (txt2img) adds a layer of the requested size at the selection's corner.
    seen = run_controller(
        controller,
        "txt2img",
        ea.Params(prompt="a blue square", num_inference_steps=4, seed=5, width=64, height=48),
        doc,
    )
    report["txt2img"] = {
        "watchdog": seen["watchdog"],
        "failed": seen["failed"],
        "layer": seen["layer"].name() if seen["layer"] else None,
        "bounds": bounds(seen["layer"]) if seen["layer"] else None,
    }

    # Cancel stops a running request; no layer is added.
    before = len(doc.rootNode().childNodes())
    seen = run_controller(
        controller,
        "txt2img",
        ea.Params(prompt="a green star", num_inference_steps=500, seed=1, width=64, height=64),
        doc,
        cancel_after_first_progress=True,
    )
    report["cancel"] = {
        "state": seen["state"],
        "failed": seen["failed"],
        "layers_added": len(doc.rootNode().childNodes()) - before,
        "watchdog": seen["watchdog"],
    }
    report["layers"] = [[n.name(), n.type()] for n in doc.rootNode().childNodes()]
    report["expand"] = expand_canvas(app, controller, out)
    report["docker_buttons"] = docker_buttons()
    dump(out, report)  # what follows may kill Krita: keep what was seen so far
    report["server_gone"] = server_gone(doc)
    report["alive_after_server_gone"] = True
    return report


def dump(out, report):
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


def __main__(args):
    out = os.environ["SDKIT_OUT"]
    try:
        report = scenario(out)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        report = {"exception": traceback.format_exc()}
    dump(out, report)
    sys.stdout.flush()
    return 0
