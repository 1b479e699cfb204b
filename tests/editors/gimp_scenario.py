"""Runs inside GIMP 3 (python-fu-eval batch), driven by tests/test_gimp.py.

Calls the installed plug-in's procedures through GIMP's PDB, as a user's menu click
would (GIMP starts the plug-in as its own process), against a live sdkit server; writes
what it saw to $SDKIT_OUT for the test to judge. Settings come from the environment:
SDKIT_ADDRESS, SDKIT_DEAD_ADDRESS, SDKIT_OUT.
"""

from __future__ import annotations

import json
import os
import traceback

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp  # noqa: E402

W, H = 101, 77  # not multiples of 8
ELLIPSE = (23.5, 17.5, 41, 29)  # x, y, w, h at odd (and half-pixel) offsets
RGBA = "R'G'B'A u8"


def painting(width, height):
    px = bytearray()
    for y in range(height):
        for x in range(width):
            if 30 <= y < 40:
                px += bytes([20, 20, 20, 255])
            else:
                px += bytes([(x * 5) % 256, (y * 3) % 256, 160, 255])
    return bytes(px)


def merged(image):
    copy = image.duplicate()
    layer = copy.merge_visible_layers(Gimp.MergeType.CLIP_TO_IMAGE)
    data = layer.get_buffer().get(Gegl.Rectangle.new(0, 0, W, H), 1.0, RGBA, Gegl.AbyssPolicy.NONE)
    copy.delete()
    return bytes(data)


def call(name, image, layer, **props):
    """Run one of the plug-in's procedures non-interactively; (status, error text)."""
    proc = Gimp.get_pdb().lookup_procedure(name)
    if proc is None:
        return "missing", f"procedure {name} is not registered"
    config = proc.create_config()
    config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [layer])
    for key, value in props.items():
        config.set_property(key.replace("_", "-"), value)
    result = proc.run(config)
    status = result.index(0)
    error = None
    if status != Gimp.PDBStatusType.SUCCESS and result.length() > 1:
        error = str(result.index(1))  # the plug-in's GError message
    return status.value_nick, error


def loras(server):
    """The plug-in's sdkit-loras procedure, non-interactive: (status, names, error)."""
    proc = Gimp.get_pdb().lookup_procedure("sdkit-loras")
    if proc is None:
        return "missing", None, "procedure sdkit-loras is not registered"
    config = proc.create_config()
    config.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    config.set_property("server", server)
    result = proc.run(config)
    status = result.index(0)
    if status != Gimp.PDBStatusType.SUCCESS:
        return status.value_nick, None, str(result.index(1)) if result.length() > 1 else None
    text = result.index(1) or ""
    return status.value_nick, [n for n in text.split("\n") if n], None


def layer_info(layer):
    _, x, y = layer.get_offsets()
    return [layer.get_name(), x, y, layer.get_width(), layer.get_height()]


def expand_canvas(server, out):
    """Expand canvas on a fresh image: refused requests leave it as it was; a good one grows
    it by the sides with one new layer, and the old pixels stay (the test judges)."""

    def pixels(image):
        copy = image.duplicate()
        layer = copy.merge_visible_layers(Gimp.MergeType.CLIP_TO_IMAGE)
        rect = Gegl.Rectangle.new(0, 0, image.get_width(), image.get_height())
        data = bytes(layer.get_buffer().get(rect, 1.0, RGBA, Gegl.AbyssPolicy.NONE))
        copy.delete()
        return data

    image = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
    bg = Gimp.Layer.new(image, "bg", W, H, Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
    image.insert_layer(bg, None, 0)
    buf = bg.get_buffer()
    buf.set(Gegl.Rectangle.new(0, 0, W, H), RGBA, painting(W, H))
    buf.flush()
    before = pixels(image)
    with open(os.path.join(out, "expand_before.bin"), "wb") as f:
        f.write(before)
    common = {"prompt": "a red circle", "steps": 6, "seed": 3, "server": server}
    report = {"refused": []}
    for sides in ({}, {"right": 4096}):  # nothing to add; over the size limit
        status, error = call("sdkit-expand", image, bg, **common, **sides)
        report["refused"].append(
            {
                "status": status,
                "error": error,
                "size": [image.get_width(), image.get_height()],
                "layers": len(image.get_layers()),
                "pixels_same": pixels(image) == before,
            }
        )
    report["result"] = call("sdkit-expand", image, bg, **common, left=24, bottom=16, seam=8)
    report.update(
        size=[image.get_width(), image.get_height()],
        sides=[24, 0, 0, 16],
        seam=8,
        layers=[layer_info(layer) for layer in image.get_layers()],
    )
    with open(os.path.join(out, "expand_after.bin"), "wb") as f:
        f.write(pixels(image))
    image.delete()
    return report


def control_layer(server, out):
    """Issue 15.5: a hidden layer with a white ring, named by Generate's control-layer
    argument, steers where the shape lands (left, then right); a missing layer is refused."""
    import math

    cw, ch = 96, 80
    report = {}
    for side, cx in (("left", 18), ("right", 46)):
        image = Gimp.Image.new(cw, ch, Gimp.ImageBaseType.RGB)
        args = (cw, ch, Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
        bg = Gimp.Layer.new(image, "bg", *args)
        image.insert_layer(bg, None, 0)
        ring = Gimp.Layer.new(image, "scribble", *args)
        image.insert_layer(ring, None, 0)
        px = bytearray(cw * ch * 4)
        for y in range(ch):
            for x in range(cw):
                if abs(math.hypot(x + 0.5 - cx, y + 0.5 - 32) - 12) <= 1.5:
                    px[(y * cw + x) * 4 : (y * cw + x + 1) * 4] = b"\xff\xff\xff\xff"
        buf = ring.get_buffer()
        buf.set(Gegl.Rectangle.new(0, 0, cw, ch), RGBA, bytes(px))
        buf.flush()
        ring.set_visible(False)
        status = call(
            "sdkit-generate",
            image,
            bg,
            prompt="a red circle on a green background",
            seed=1,
            control_layer="scribble",
            server=server,
        )
        top = image.get_layers()[0]
        report[side] = {"status": status, "layer": layer_info(top)}
        rect = Gegl.Rectangle.new(0, 0, top.get_width(), top.get_height())
        with open(os.path.join(out, f"control_{side}.bin"), "wb") as f:
            f.write(bytes(top.get_buffer().get(rect, 1.0, RGBA, Gegl.AbyssPolicy.NONE)))
        if side == "right":
            count = len(image.get_layers())
            report["missing"] = call(
                "sdkit-generate", image, bg, prompt="x", control_layer="gone", server=server
            )
            report["layers_added_when_missing"] = len(image.get_layers()) - count
        image.delete()
    return report


def scenario(out):
    report = {}
    image = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
    bg = Gimp.Layer.new(image, "bg", W, H, Gimp.ImageType.RGBA_IMAGE, 100.0, Gimp.LayerMode.NORMAL)
    image.insert_layer(bg, None, 0)
    buf = bg.get_buffer()
    buf.set(Gegl.Rectangle.new(0, 0, W, H), RGBA, painting(W, H))
    buf.flush()
    bg.update(0, 0, W, H)

    # A dead server: the procedure fails with a clear message and adds nothing.
    report["dead_server"] = call(
        "sdkit-generate",
        image,
        bg,
        prompt="x",
        width=8,
        height=8,
        server=os.environ["SDKIT_DEAD_ADDRESS"],
    )
    report["layers_after_dead"] = len(image.get_layers())

    # Inpaint an anti-aliased ellipse selection at odd offsets.
    Gimp.context_set_antialias(True)
    image.select_ellipse(Gimp.ChannelOps.REPLACE, *ELLIPSE)
    _, non_empty, x1, y1, x2, y2 = Gimp.Selection.bounds(image)
    report["selection_bounds"] = [x1, y1, x2 - x1, y2 - y1]
    mask = (
        image.get_selection()
        .get_buffer()
        .get(Gegl.Rectangle.new(0, 0, W, H), 1.0, "Y u8", Gegl.AbyssPolicy.NONE)
    )
    with open(os.path.join(out, "mask.bin"), "wb") as f:
        f.write(bytes(mask))
    with open(os.path.join(out, "before.bin"), "wb") as f:
        f.write(merged(image))
    server = os.environ["SDKIT_ADDRESS"]
    report["inpaint"] = call(
        "sdkit-inpaint",
        image,
        bg,
        prompt="a red circle",
        steps=8,
        seed=11,
        strength=1.0,
        server=server,
    )
    with open(os.path.join(out, "after.bin"), "wb") as f:
        f.write(merged(image))
    report["layers_after_inpaint"] = [layer_info(layer) for layer in image.get_layers()]

    # Generate adds a layer of the requested size at the selection's corner.
    report["txt2img"] = call(
        "sdkit-generate",
        image,
        bg,
        prompt="a blue square",
        steps=4,
        seed=5,
        width=64,
        height=48,
        server=server,
    )
    report["layers"] = [layer_info(layer) for layer in image.get_layers()]

    # The mode is the server's: one it does not offer is refused, naming those it does.
    report["unknown_mode"] = call(
        "sdkit-generate", image, bg, prompt="x", mode="outpaint-v9", server=server
    )

    # The server's LoRA list (issue 14.8), and a LoRA chosen by name on Generate.
    status, names, error = loras(server)
    report["loras"] = {"status": status, "names": names, "error": error}
    if names:
        report["lora_generate"] = call(
            "sdkit-generate",
            image,
            bg,
            prompt="a red x",
            lora=names[0],
            steps=2,
            seed=5,
            width=32,
            height=32,
            server=server,
        )
        report["lora_top_layer"] = layer_info(image.get_layers()[0])
    report["unknown_lora"] = call(
        "sdkit-generate", image, bg, prompt="x", lora="../nope", steps=1, server=server
    )
    image.delete()
    report["expand"] = expand_canvas(server, out)
    report["control"] = control_layer(server, out)
    return report


def main():
    out = os.environ["SDKIT_OUT"]
    try:
        report = scenario(out)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        report = {"exception": traceback.format_exc()}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


main()
