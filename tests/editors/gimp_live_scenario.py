"""Runs inside GIMP 3 (python-fu-eval batch), driven by tests/test_gimp.py -k live.

Calls the installed plug-in's sdkit-live and sdkit-live-apply through the PDB against a
live sdkit server. A PDB call from a script is synchronous (see gimp_live.py), so each
sdkit-live run here shows one frame (frames=1): the first of the layer as it is, then one
after a scripted stroke, then one with a selection; the [sdkit live] layer is updated in
place. Writes report.json to $SDKIT_OUT.
"""

from __future__ import annotations

import json
import os
import traceback
import zlib

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp  # noqa: E402

W, H = 64, 64
RGBA = "R'G'B'A u8"


def gradient():
    return b"".join(
        bytes([(x * 4) % 256, (y * 4) % 256, 160, 255]) for y in range(H) for x in range(W)
    )


def pixels(layer):
    rect = Gegl.Rectangle.new(0, 0, W, H)
    return bytes(layer.get_buffer().get(rect, 1.0, RGBA, Gegl.AbyssPolicy.NONE))


def live_layers(image):
    return [layer for layer in image.get_layers() if layer.get_name() == "[sdkit live]"]


def call(name, image, layer, **props):
    proc = Gimp.get_pdb().lookup_procedure(name)
    if proc is None:
        return "missing", f"procedure {name} is not registered", None
    config = proc.create_config()
    config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [layer])
    for key, value in props.items():
        config.set_property(key.replace("_", "-"), value)
    result = proc.run(config)
    status = result.index(0)
    if status != Gimp.PDBStatusType.SUCCESS:
        return status.value_nick, str(result.index(1)) if result.length() > 1 else None, None
    return status.value_nick, None, result.index(1) if result.length() > 1 else None


def alpha_bounds(data):
    xs = [i % W for i in range(W * H) if data[4 * i + 3]]
    ys = [i // W for i in range(W * H) if data[4 * i + 3]]
    return [min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1] if xs else None


def scenario():
    server = os.environ["SDKIT_ADDRESS"]
    image = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
    bg = Gimp.Layer.new(image, "bg", W, H, Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
    image.insert_layer(bg, None, 0)
    buf = bg.get_buffer()
    buf.set(Gegl.Rectangle.new(0, 0, W, H), RGBA, gradient())
    buf.flush()
    common = {"prompt": "a red circle", "steps": 4, "seed": 7, "strength": 0.6, "server": server}
    report = {"runs": []}
    for step in ("first", "stroke", "selection"):
        if step == "stroke":
            buf = bg.get_buffer()
            buf.set(Gegl.Rectangle.new(10, 10, 14, 14), RGBA, bytes([255, 30, 30, 255]) * 196)
            buf.flush()
        if step == "selection":
            image.select_rectangle(Gimp.ChannelOps.REPLACE, 20, 20, 24, 24)
        status, error, frames = call("sdkit-live", image, bg, frames=1, seconds=300.0, **common)
        lives = live_layers(image)
        data = pixels(lives[0]) if lives else b""
        report["runs"].append(
            {
                "step": step,
                "status": status,
                "error": error,
                "frames": frames,
                "live_layers": len(lives),
                "locked": bool(lives and lives[0].get_lock_content()),
                "crc": zlib.crc32(data),
                "alpha_bounds": alpha_bounds(data) if data else None,
                "id": lives[0].get_id() if lives else None,
            }
        )
    Gimp.Selection.none(image)
    live = live_layers(image)[0]
    status, error, _ = call("sdkit-live-apply", image, bg)
    layers = image.get_layers()
    applied = [layer for layer in layers if layer.get_name() == "[sdkit] live frame"]
    report["apply"] = {
        "status": status,
        "error": error,
        "layers": [layer.get_name() for layer in layers],
        "same_pixels": bool(applied) and pixels(applied[0]) == pixels(live),
        "locked": bool(applied) and applied[0].get_lock_content(),
    }
    image.remove_layer(live)
    report["apply_without_live"] = call("sdkit-live-apply", image, bg)[:2]
    return report


try:
    result = scenario()
except Exception:  # noqa: BLE001 - reported to the test
    result = {"exception": traceback.format_exc()}
with open(os.path.join(os.environ["SDKIT_OUT"], "report.json"), "w") as f:
    json.dump(result, f, indent=1)
