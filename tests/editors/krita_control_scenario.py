"""Runs inside Krita (`kritarunner -s krita_control_scenario`), driven by tests/test_krita.py.

A control layer (issue 15.5): a hidden paint layer holding a white ring on transparent is
chosen in the docker's Control row (sdkit_krita.control_layer); Generate then sends it as
the control frame, through the shared Controller polled by its QTimer, against a live
server on the embedded model. Once with the ring on the left, once on the right; then a
control layer that is gone is refused without a new layer. Writes report.json and each
result layer's pixels to $SDKIT_OUT.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

from krita_scenario import run_controller, spin

W, H = 96, 80
SIZE = 64  # the embedded model's default size: the result's


def ring(cx, cy, r=12.0, half=1.5):
    """White ring on transparent, straight RGBA8 of W x H."""
    px = bytearray(W * H * 4)
    for y in range(H):
        for x in range(W):
            if abs(math.hypot(x + 0.5 - cx, y + 0.5 - cy) - r) <= half:
                px[(y * W + x) * 4 : (y * W + x + 1) * 4] = b"\xff\xff\xff\xff"
    return bytes(px)


def scenario(out):
    from krita import Krita
    from sdkit_krita import control_layer as cl
    from sdkit_krita import controller
    from sdkit_krita import editor_control as ec
    from sdkit_krita.docker import SdkitDocker
    from sdkit_krita.pictures import bgra_to_rgba, rgba_to_bgra

    app = Krita.instance()
    shared = controller.shared()
    shared.connect_to(os.environ["SDKIT_ADDRESS"])
    docker = SdkitDocker()
    spin(lambda: shared.conn.state == "connected", 60)
    spin(lambda: docker.control_model.count() > 0, 5)
    docker.prompt.setPlainText("a red circle on a green background")
    docker.seed.setValue(1)
    report = {
        "models": [docker.control_model.itemText(i) for i in range(docker.control_model.count())]
    }
    for side, cx in (("left", 18), ("right", 46)):
        doc = app.createDocument(W, H, f"control {side}", "RGBA", "U8", "", 72.0)
        scribble = doc.createNode("scribble", "paintlayer")
        scribble.setPixelData(rgba_to_bgra(ring(cx, 32)), 0, 0, W, H)
        doc.rootNode().addChildNode(scribble, None)
        scribble.setVisible(False)  # a control layer need not show
        doc.refreshProjection()
        doc.waitForDone()
        cl.refresh_layers(docker, doc)
        layers = [docker.control_layer.itemText(i) for i in range(docker.control_layer.count())]
        docker.control_layer.setCurrentIndex(layers.index("scribble"))

        def start(doc=doc):
            return cl.choose_for(docker) and shared.run("txt2img", docker.params(), doc)

        seen = run_controller(shared, "txt2img", None, doc, start=start)
        layer = seen["layer"]
        request = shared.action.request_kwargs() if shared.action else {}
        frame = request.get("control", {}).get(0)
        report[side] = {
            "layers_offered": layers,
            "failed": seen["failed"],
            "watchdog": seen["watchdog"],
            "state": seen["state"],
            "unit": (request.get("request") or {}).get("control"),
            "frame": [frame.width, frame.height, frame.format] if frame is not None else None,
            "layer": layer.name() if layer is not None else None,
            "bounds": [layer.bounds().x(), layer.bounds().y(), layer.bounds().width(),
                       layer.bounds().height()] if layer is not None else None,
        }  # fmt: skip
        if frame is not None:
            with open(os.path.join(out, f"{side}_frame.bin"), "wb") as f:
                f.write(bytes(frame.data))
        if layer is not None:
            with open(os.path.join(out, f"{side}.bin"), "wb") as f:
                f.write(bgra_to_rgba(bytes(layer.pixelData(0, 0, SIZE, SIZE))))

    # The chosen layer is gone by the time the action starts: refused, nothing added.
    count = len(doc.rootNode().childNodes())
    shared.control_layer = (ec.ControlChoice("sdkscribble"), "gone")
    seen = run_controller(shared, "txt2img", docker.params(), doc)
    report["gone"] = {
        "failed": seen["failed"],
        "layers_added": len(doc.rootNode().childNodes()) - count,
    }
    shared.control_layer = None
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
