#!/usr/bin/env python3
"""sdkit for GIMP 3: Filters > sdkit > Generate / Img2img selection / Inpaint selection.

A GIMP plug-in runs as a process of its own, so it may block while the server works;
it talks to a running ``sdkit serve`` over the bridge with the bundled standard-library
modules (``protocol``, ``zmtp``, ``tracker``, ``editor_*``, copied here by
``sdkit plugin install gimp``). Pixels go through GEGL buffers as "R'G'B'A u8" (babl has
no BGRA u8), the selection as "Y u8".

GIMP registers procedures when it starts, before any server answers, so there is one
procedure per kind of dialog (a new layer, or the selection redrawn or repainted), each
with a ``mode`` argument: the server's mode to run, checked against the modes its
``hello`` offers. Likewise the ``lora`` argument names one of the server's LoRAs (its
``hello`` lists them; the interactive dialog offers them in a combo box); it becomes
A1111's ``<lora:NAME:1>`` tag in the prompt. ``sdkit-loras`` returns (and shows) the list.
``sdkit-expand`` (Expand canvas) grows the image by the chosen sides and paints the new area
through the server's outpaint mode (``editor_expand``). The ``control-layer`` argument names a
layer whose pixels in the request's area steer the result as a ControlNet unit's image (its
``control-model`` one of ``hello``'s ``controls``, empty: the first; ``editor_control``).

Over 400 lines because GIMP runs one file as the plug-in's program: its procedures share
the pixel helpers (read, add a layer) that live here.
"""

from __future__ import annotations

import os
import sys

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, GLib, GObject  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import editor_actions as ea  # noqa: E402
import editor_control as ec  # noqa: E402
import editor_expand as ex  # noqa: E402
import editor_geometry as geo  # noqa: E402
import gimp_live  # noqa: E402
from editor_connection import DEFAULT_ADDRESS, Connection  # noqa: E402

# procedure: (default mode, takes a size (new layer) or a strength, menu label, blurb)
PROCEDURES = {
    "sdkit-generate": ("txt2img", "size", "_Generate…", "Generate a new layer from a prompt"),
    "sdkit-img2img": ("img2img", "strength", "_Img2img selection…", "Redraw the selection"),
    "sdkit-inpaint": ("inpaint", "strength", "I_npaint selection…", "Repaint the selection"),
}
LORAS_PROCEDURE = "sdkit-loras"  # the server's LoRA names, one per line
EXPAND_PROCEDURE = "sdkit-expand"  # Expand canvas: outpaint the whole image by some sides
NO_LORA = "(none)"
RGBA = "R'G'B'A u8"
MASK = "Y u8"


# --- pixels -------------------------------------------------------------------------


def check_image(image) -> None:
    if image.get_base_type() != Gimp.ImageBaseType.RGB:
        raise geo.EditorError(
            "sdkit works on RGB images; convert this one with Image > Mode > RGB first"
        )


def selection_rect(image) -> geo.Rect | None:
    """The selection's bounds, or None when nothing is selected."""
    result = Gimp.Selection.bounds(image)
    # (success, non_empty, x1, y1, x2, y2); older bindings leave out success.
    non_empty, x1, y1, x2, y2 = result[-5:]
    if not non_empty:
        return None
    return geo.Rect.from_corners(x1, y1, x2, y2)


def _rect(rect: geo.Rect):
    return Gegl.Rectangle.new(rect.x, rect.y, rect.width, rect.height)


def read_rgba(image, rect: geo.Rect) -> bytes:
    """The visible (merged) image under ``rect``, from a throw-away flattened copy."""
    copy = image.duplicate()
    try:
        layer = copy.merge_visible_layers(Gimp.MergeType.CLIP_TO_IMAGE)
        ox, oy = layer.get_offsets()[-2:]
        buffer = layer.get_buffer()
        local = geo.Rect(rect.x - ox, rect.y - oy, rect.width, rect.height)
        return bytes(buffer.get(_rect(local), 1.0, RGBA, Gegl.AbyssPolicy.NONE))
    finally:
        copy.delete()


def read_mask(image, rect: geo.Rect) -> bytes | None:
    """The selection's 8-bit soft mask under ``rect``, or None when nothing is selected."""
    if Gimp.Selection.is_empty(image):
        return None
    buffer = image.get_selection().get_buffer()
    return bytes(buffer.get(_rect(rect), 1.0, MASK, Gegl.AbyssPolicy.NONE))


def add_layer(image, placement: geo.Placement):
    """A new layer at the placement's position, above the selected layer; one undo step."""
    image.undo_group_start()
    try:
        layer = Gimp.Layer.new(
            image,
            placement.name,
            placement.width,
            placement.height,
            Gimp.ImageType.RGBA_IMAGE,
            100.0,
            Gimp.LayerMode.NORMAL,
        )
        parent, position = None, 0
        selected = [d for d in image.get_selected_layers() if d is not None]
        if selected:
            parent = selected[0].get_parent()
            position = image.get_item_position(selected[0])
        image.insert_layer(layer, parent, position)
        layer.set_offsets(placement.x, placement.y)
        buffer = layer.get_buffer()
        buffer.set(
            Gegl.Rectangle.new(0, 0, placement.width, placement.height), RGBA, placement.rgba
        )
        buffer.flush()
        layer.update(0, 0, placement.width, placement.height)
    finally:
        image.undo_group_end()
    Gimp.displays_flush()
    return layer


def attach_control_layer(image, conn, action, name: str, choice: ec.ControlChoice) -> None:
    """The layer called ``name`` (its own pixels, hidden or not) as the action's control."""
    layer = image.get_layer_by_name(name)
    if layer is None:
        raise geo.EditorError(f"the image has no layer {name!r} to use as control")
    offered = conn.adapters("controls")
    choice.model = ec.check_model(conn, choice.model or (offered[0] if offered else ""))
    ox, oy = layer.get_offsets()[-2:]
    buffer = layer.get_buffer()

    def read(rect: geo.Rect) -> bytes:
        local = geo.Rect(rect.x - ox, rect.y - oy, rect.width, rect.height)
        return bytes(buffer.get(_rect(local), 1.0, RGBA, Gegl.AbyssPolicy.NONE))

    size = (image.get_width(), image.get_height())
    ec.attach(action, choice, ec.control_picture(action, size, read))


# --- the action -----------------------------------------------------------------------


def run_action(
    image,
    mode: str,
    params: ea.Params,
    *,
    address: str = DEFAULT_ADDRESS,
    margin: int = geo.DEFAULT_MARGIN,
    timeout: float | None = None,
    progress: bool = True,
    lora: str = "",
    control_layer: str = "",
    control: ec.ControlChoice | None = None,
):
    """Everything a procedure does after its dialog: read, send, wait, add the layer."""
    check_image(image)
    conn = Connection(address, client="sdkit-gimp")
    try:
        conn.wait_ready()
        if lora:
            params.prompt = ea.with_lora(params.prompt, ea.check_lora(conn, lora))
        if params.width is None or params.height is None:
            w, h = conn.default_size()
            params.width = params.width or w
            params.height = params.height or h
        action = ea.plan_action(
            conn.mode(mode),
            params,
            (image.get_width(), image.get_height()),
            selection_rect(image),
            lambda rect: read_rgba(image, rect),
            lambda rect: read_mask(image, rect),
            margin=margin,
            multiple=conn.size_multiple,
        )
        if control_layer:
            choice = control or ec.ControlChoice("")
            attach_control_layer(image, conn, action, control_layer, choice)

        def on_progress(a: ea.Action) -> None:
            if progress:
                Gimp.progress_set_text(f"sdkit: {a.status}")
                Gimp.progress_update(a.fraction)

        if progress:
            Gimp.progress_init(f"sdkit: {mode}")
        placement = ea.run_blocking(conn, action, on_progress=on_progress, timeout=timeout)
    finally:
        conn.close()
    return add_layer(image, placement)


# --- the plug-in ----------------------------------------------------------------------


def server_loras(address: str, timeout: float | None = None) -> list[str]:
    """The LoRA names the server at ``address`` lists in its ``hello``."""
    conn = Connection(address, client="sdkit-gimp")
    try:
        conn.wait_ready(timeout)
        return conn.adapters("loras")
    finally:
        conn.close()


def _lora_combo(window, config) -> None:
    """The dialog's LoRA chooser: a combo box of the server's LoRAs that sets ``lora``.

    Only when the server answers at once; otherwise the plain text field stays."""
    try:
        names = server_loras(config.get_property("server"), timeout=2.0)
    except geo.EditorError:
        return
    gi.require_version("Gtk", "3.0")
    from gi.repository import Gtk

    combo = Gtk.ComboBoxText()
    for name in (NO_LORA, *names):
        combo.append_text(name)
    current = config.get_property("lora")
    combo.set_active(names.index(current) + 1 if current in names else 0)
    combo.connect(
        "changed",
        lambda c: config.set_property(
            "lora", "" if c.get_active_text() == NO_LORA else c.get_active_text()
        ),
    )
    row = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
    row.pack_start(Gtk.Label(label="Server's LoRAs"), False, False, 0)
    row.pack_start(combo, True, True, 0)
    window.get_content_area().pack_start(row, False, False, 6)
    row.show_all()


def _config_params(config, dialog: str) -> tuple[ea.Params, str, str]:
    """(params, mode, server address) from a procedure's arguments."""
    steps = config.get_property("steps")
    seed = config.get_property("seed")
    params = ea.Params(
        prompt=config.get_property("prompt").strip(),
        negative_prompt=config.get_property("negative-prompt").strip(),
        num_inference_steps=steps or None,
        seed=None if seed < 0 else seed,
    )
    if dialog == "size":
        params.width = config.get_property("width") or None
        params.height = config.get_property("height") or None
    else:
        params.strength = config.get_property("strength")
    mode = config.get_property("mode").strip()
    return params, mode, config.get_property("server")


def _run(procedure, run_mode, image, drawables, config, data):
    dialog = PROCEDURES[procedure.get_name()][1]
    if run_mode == Gimp.RunMode.INTERACTIVE:
        gi.require_version("GimpUi", "3.0")
        from gi.repository import GimpUi

        GimpUi.init("sdkit-gimp")
        window = GimpUi.ProcedureDialog(procedure=procedure, config=config)
        window.fill(None)
        _lora_combo(window, config)
        ok = window.run()
        window.destroy()
        if not ok:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    params, mode, address = _config_params(config, dialog)
    control = ec.ControlChoice(
        model=config.get_property("control-model").strip(),
        weight=config.get_property("control-weight"),
        module=config.get_property("control-module").strip() or "none",
    )
    try:
        run_action(
            image,
            mode,
            params,
            address=address,
            lora=config.get_property("lora").strip(),
            control_layer=config.get_property("control-layer").strip(),
            control=control,
        )
    except geo.EditorError as e:
        return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(str(e)))
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


def _run_loras(procedure, config, data):
    """The server's LoRA names as the return value (one per line); shown to a user."""
    try:
        names = server_loras(config.get_property("server"))
    except geo.EditorError as e:
        return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(str(e)))
    if config.get_property("run-mode") == Gimp.RunMode.INTERACTIVE:
        listed = "\n".join(names) or "none"
        Gimp.message(f"The server's LoRAs (the Generate dialogs offer them):\n{listed}")
    retval = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
    retval.remove(1)
    retval.insert(1, GObject.Value(GObject.TYPE_STRING, "\n".join(names)))
    return retval


def _loras_procedure(plugin):
    procedure = Gimp.Procedure.new(
        plugin, LORAS_PROCEDURE, Gimp.PDBProcType.PLUGIN, _run_loras, None
    )
    procedure.set_menu_label("_LoRAs of the server…")
    procedure.add_menu_path("<Image>/Filters/sdkit")
    procedure.set_documentation(
        "List the server's LoRAs",
        "The LoRA names a running `sdkit serve` offers (its hello), one per line.",
        LORAS_PROCEDURE,
    )
    procedure.set_attribution("sdkit", "sdkit", "2026")
    rw = GObject.ParamFlags.READWRITE
    procedure.add_enum_argument(
        "run-mode", "Run mode", "The run mode", Gimp.RunMode, Gimp.RunMode.INTERACTIVE, rw
    )
    procedure.add_string_argument(
        "server", "Ser_ver", "Address of `sdkit serve`", DEFAULT_ADDRESS, rw
    )
    procedure.add_string_return_value("loras", "LoRAs", "The server's LoRA names", "", rw)
    return procedure


# --- Expand canvas -------------------------------------------------------------------


def run_expand(
    image,
    params: ea.Params,
    sides: ex.Sides,
    *,
    seam: int = ex.DEFAULT_SEAM,
    address: str = DEFAULT_ADDRESS,
    timeout: float | None = None,
    progress: bool = True,
):
    """Outpaint the whole image by ``sides``; the image grows only once the result is in."""
    check_image(image)
    size = (image.get_width(), image.get_height())
    conn = Connection(address, client="sdkit-gimp")
    try:
        conn.wait_ready()
        read = lambda rect: read_rgba(image, rect)  # noqa: E731
        action = ex.plan_expand(conn.mode(ex.MODE), params, sides, size, read, seam=seam)

        def on_progress(a: ea.Action) -> None:
            if progress:
                Gimp.progress_set_text(f"sdkit: {a.status}")
                Gimp.progress_update(a.fraction)

        if progress:
            Gimp.progress_init("sdkit: expand canvas")
        placement = ea.run_blocking(conn, action, on_progress=on_progress, timeout=timeout)
    finally:
        conn.close()
    return grow_and_add_layer(image, action, placement)


def grow_and_add_layer(image, action: ex.ExpandAction, placement: geo.Placement):
    """Grow the image by the action's sides and add the layer, as one undo step; if the
    layer cannot be added the image goes back to its old size."""
    width, height = action.canvas_size
    if (image.get_width(), image.get_height()) != (width, height):
        raise geo.EditorError("the image changed size while sdkit worked: expand it again")
    s = action.sides
    image.undo_group_start()
    try:
        image.resize(width + s.left + s.right, height + s.top + s.bottom, s.left, s.top)
        try:
            return add_layer(image, placement)
        except Exception:
            image.resize(width, height, -s.left, -s.top)
            raise
    finally:
        image.undo_group_end()


def _run_expand(procedure, run_mode, image, drawables, config, data):
    if run_mode == Gimp.RunMode.INTERACTIVE:
        gi.require_version("GimpUi", "3.0")
        from gi.repository import GimpUi

        GimpUi.init("sdkit-gimp")
        window = GimpUi.ProcedureDialog(procedure=procedure, config=config)
        window.fill(None)
        ok = window.run()
        window.destroy()
        if not ok:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    steps, seed = config.get_property("steps"), config.get_property("seed")
    params = ea.Params(
        prompt=config.get_property("prompt").strip(),
        negative_prompt=config.get_property("negative-prompt").strip(),
        strength=config.get_property("strength"),
        num_inference_steps=steps or None,
        seed=None if seed < 0 else seed,
    )
    sides = ex.Sides(**{side: config.get_property(side) for side in ex.Sides().as_request()})
    try:
        run_expand(
            image,
            params,
            sides,
            seam=config.get_property("seam"),
            address=config.get_property("server"),
        )
    except geo.EditorError as e:
        return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(str(e)))
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


def _expand_procedure(plugin):
    procedure = Gimp.ImageProcedure.new(
        plugin, EXPAND_PROCEDURE, Gimp.PDBProcType.PLUGIN, _run_expand, None
    )
    procedure.set_image_types("RGB*")
    procedure.set_sensitivity_mask(
        Gimp.ProcedureSensitivityMask.DRAWABLE
        | Gimp.ProcedureSensitivityMask.DRAWABLES
        | Gimp.ProcedureSensitivityMask.NO_DRAWABLES
    )
    procedure.set_menu_label("_Expand canvas…")
    procedure.add_menu_path("<Image>/Filters/sdkit")
    procedure.set_documentation(
        "Grow the image and paint the new area",
        "Adds pixels on the chosen sides and paints them (and a seam band of the old image) "
        "with Stable Diffusion through a running `sdkit serve` (its outpaint mode), as a new "
        "layer; the image is resized only once the result is in.",
        EXPAND_PROCEDURE,
    )
    procedure.set_attribution("sdkit", "sdkit", "2026")
    rw = GObject.ParamFlags.READWRITE
    procedure.add_string_argument("prompt", "_Prompt", "What to draw", "", rw)
    procedure.add_string_argument("negative-prompt", "_Negative prompt", "What to avoid", "", rw)
    for side, label in (
        ("left", "_Left"),
        ("right", "_Right"),
        ("top", "_Top"),
        ("bottom", "_Bottom"),
    ):
        procedure.add_int_argument(side, label, f"Pixels to add on the {side}", 0, 4096, 0, rw)
    procedure.add_int_argument(
        "seam", "Sea_m", "Pixels of the old image repainted softly", 0, 256, ex.DEFAULT_SEAM, rw
    )
    procedure.add_double_argument(
        "strength", "_Strength", "How much to change the filled area (0..1)", 0.01, 1.0, 0.75, rw
    )
    procedure.add_int_argument("steps", "S_teps", "0: the model's default", 0, 200, 0, rw)
    procedure.add_int_argument("seed", "S_eed", "-1: random", -1, 2**31 - 1, -1, rw)
    procedure.add_string_argument(
        "server", "Ser_ver", "Address of `sdkit serve`", DEFAULT_ADDRESS, rw
    )
    return procedure


def _control_arguments(procedure, rw) -> None:
    """Control layer: a layer's name, the server's control model, its weight and module."""
    procedure.add_string_argument(
        "control-layer",
        "_Control layer",
        "A layer that steers where things go; empty: none",
        "",
        rw,
    )
    procedure.add_string_argument(
        "control-model", "Control _model", "One of the server's controls; empty: its first", "", rw
    )
    procedure.add_double_argument(
        "control-weight",
        "Control _weight",
        "How strongly the layer steers (0..2)",
        0.0,
        2.0,
        1.0,
        rw,
    )
    procedure.add_string_argument(
        "control-module",
        "Control pre_processor",
        "none (white lines on black), invert (black on white), scribble, canny",
        "none",
        rw,
    )


class SdkitPlugIn(Gimp.PlugIn):
    def do_query_procedures(self):
        return [*PROCEDURES, LORAS_PROCEDURE, EXPAND_PROCEDURE, *gimp_live.PROCEDURES]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        if name == LORAS_PROCEDURE:
            return _loras_procedure(self)
        if name == EXPAND_PROCEDURE:
            return _expand_procedure(self)
        if name in gimp_live.PROCEDURES:  # Live, Apply live frame (gimp_live.py)
            return gimp_live.create(self, name, DEFAULT_ADDRESS)
        mode, dialog, label, blurb = PROCEDURES[name]
        procedure = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, _run, None)
        procedure.set_image_types("RGB*")
        procedure.set_sensitivity_mask(
            Gimp.ProcedureSensitivityMask.DRAWABLE
            | Gimp.ProcedureSensitivityMask.DRAWABLES
            | Gimp.ProcedureSensitivityMask.NO_DRAWABLES
        )
        procedure.set_menu_label(label)
        procedure.add_menu_path("<Image>/Filters/sdkit")
        procedure.set_documentation(
            blurb,
            f"{blurb} with Stable Diffusion through a running `sdkit serve`; the result "
            "becomes a new layer over the selection.",
            name,
        )
        procedure.set_attribution("sdkit", "sdkit", "2026")
        rw = GObject.ParamFlags.READWRITE
        procedure.add_string_argument("prompt", "_Prompt", "What to draw", "", rw)
        procedure.add_string_argument(
            "negative-prompt", "_Negative prompt", "What to avoid", "", rw
        )
        if dialog == "strength":
            procedure.add_double_argument(
                "strength", "_Strength", "How much to change (0..1)", 0.01, 1.0, 0.75, rw
            )
        else:
            procedure.add_int_argument("width", "_Width", "0: the model's default", 0, 4096, 0, rw)
            procedure.add_int_argument(
                "height", "_Height", "0: the model's default", 0, 4096, 0, rw
            )
        procedure.add_string_argument(
            "lora", "_LoRA", "One of the server's LoRAs (see its hello); empty: none", "", rw
        )
        procedure.add_int_argument("steps", "S_teps", "0: the model's default", 0, 200, 0, rw)
        procedure.add_int_argument("seed", "S_eed", "-1: random", -1, 2**31 - 1, -1, rw)
        _control_arguments(procedure, rw)
        procedure.add_string_argument(
            "mode", "_Mode", "The server's mode to run (see its hello)", mode, rw
        )
        procedure.add_string_argument(
            "server", "Ser_ver", "Address of `sdkit serve`", DEFAULT_ADDRESS, rw
        )
        return procedure


if __name__ == "__main__":
    Gimp.main(SdkitPlugIn.__gtype__, sys.argv)
