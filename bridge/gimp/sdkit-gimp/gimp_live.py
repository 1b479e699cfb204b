"""Live mode for GIMP 3 (issue 16.4): Filters > sdkit > Live.

GIMP has no "pixels changed" signal for plug-ins either, so the procedure stays running in
its own process with a GLib main loop: every ``POLL_MS`` it takes a CRC-32 of the chosen
layer's pixels, the selection and the fields; a change sends the image as img2img (inpaint
with a selection) with the ``replace`` policy on one stream and a fixed seed; the newest
result is written in place into one content-locked ``[sdkit live]`` layer (unlocked for the
write: GIMP kills a plug-in that writes to a locked drawable; the undo stack frozen meanwhile,
so frames are no undo steps) and the displays are flushed. It stops when that layer is deleted, the image
closes, after ``frames`` frames or ``seconds``. ``sdkit-live-apply`` copies the frame into
a normal layer (one undo group).

GIMP limitation (measured with GIMP 3.0.4, tests/test_gimp.py -k live): a procedure that
another plug-in calls through the PDB runs *synchronously* for the caller, even one of type
PERSISTENT after ``persistent_ready()`` (the caller got its answer only when the loop ended:
4.33 s for a 4 s loop), and a plug-in's PDB calls are not thread-safe. So a script (the
batch interpreter, Script-Fu) cannot paint while Live runs; only a person can, with Live
started from the menu (GIMP runs menu procedures asynchronously). The test therefore checks
one frame per run and the in-place update across runs, not scripted strokes during one.
"""

from __future__ import annotations

import random
import time
import zlib

import editor_actions as ea
import editor_geometry as geo
import protocol
from editor_connection import Connection
from gi.repository import Gegl, Gimp, GLib

LIVE_LAYER = "[sdkit live]"
STREAM = "gimp-live"
POLL_MS = 100
LIVE_STEPS, LIVE_GUIDANCE = 6, 1.0  # sdkit.live.LIVE_DEFAULTS (the plug-in imports no sdkit)
RGBA = "R'G'B'A u8"
MASK = "Y u8"


def _rect(rect: geo.Rect):
    return Gegl.Rectangle.new(rect.x, rect.y, rect.width, rect.height)


def _read(drawable, rect: geo.Rect) -> bytes:
    """The drawable's own pixels under ``rect`` (image coordinates)."""
    ox, oy = drawable.get_offsets()[-2:]
    local = geo.Rect(rect.x - ox, rect.y - oy, rect.width, rect.height)
    return bytes(drawable.get_buffer().get(_rect(local), 1.0, RGBA, Gegl.AbyssPolicy.NONE))


def _selection(image) -> tuple[geo.Rect | None, bytes | None]:
    non_empty, x1, y1, x2, y2 = Gimp.Selection.bounds(image)[-5:]
    if not non_empty:
        return None, None
    whole = geo.Rect(0, 0, image.get_width(), image.get_height())
    mask = bytes(
        image.get_selection().get_buffer().get(_rect(whole), 1.0, MASK, Gegl.AbyssPolicy.NONE)
    )
    return geo.Rect.from_corners(x1, y1, x2, y2), mask


def find_live_layer(image):
    return next((layer for layer in image.get_layers() if layer.get_name() == LIVE_LAYER), None)


class Live:
    """One live stream from ``drawable`` into the image's ``[sdkit live]`` layer."""

    def __init__(self, image, drawable, params: ea.Params, address: str):
        self.image, self.drawable, self.address = image, drawable, address
        if params.seed is None:
            params.seed = random.randrange(2**31)
        self.params = params
        self.layer = find_live_layer(image)
        self.frames = 0
        self.sent: list[ea.Action] = []
        self._pending: list[tuple[int, ea.Action]] = []
        self._shown = 0
        self._checksum: int | None = None
        self.error: str | None = None

    def run(self, *, frames: int = 0, seconds: float = 0.0) -> None:
        """Poll until the live layer is deleted, the image closes, ``frames`` frames were
        shown or ``seconds`` passed (0: no such limit)."""
        conn = Connection(self.address, client="sdkit-gimp")
        end = time.monotonic() + seconds if seconds else None
        loop = GLib.MainLoop()

        def tick() -> bool:
            try:
                self._tick(conn)
            except geo.EditorError as e:
                self.error = str(e)
            over = (
                self.error is not None
                or not self.image.is_valid()
                or (self.layer is not None and not self.layer.is_valid())
                or (frames and self.frames >= frames)
                or (end is not None and time.monotonic() > end)
            )
            if over:
                loop.quit()
            return not over

        try:
            conn.wait_ready()
            GLib.timeout_add(POLL_MS, tick)
            loop.run()
        finally:
            conn.close()

    def _tick(self, conn: Connection) -> None:
        conn.poll(0)  # applies the server's events to the session's jobs
        self._collect()
        if conn.state != "connected":
            raise geo.EditorError(conn.error or "lost the connection to the sdkit server")
        selection, mask = _selection(self.image)
        width, height = self.image.get_width(), self.image.get_height()
        crc = zlib.crc32(_read(self.drawable, geo.Rect(0, 0, width, height)))
        crc = zlib.crc32(repr((self.params, mask)).encode(), crc)
        if crc != self._checksum:
            self._checksum = crc
            self._send(conn, selection)

    def _send(self, conn: Connection, selection: geo.Rect | None) -> None:
        params = self.params
        if params.width is None or params.height is None:
            params.width, params.height = conn.default_size()
        mode = conn.mode("inpaint" if selection is not None else "img2img")

        def read_mask(rect: geo.Rect) -> bytes | None:
            if selection is None:
                return None
            data = self.image.get_selection().get_buffer()
            return bytes(data.get(_rect(rect), 1.0, MASK, Gegl.AbyssPolicy.NONE))

        action = ea.plan_action(
            mode,
            params,
            (self.image.get_width(), self.image.get_height()),
            selection,
            lambda rect: _read(self.drawable, rect),
            read_mask,
            multiple=conn.size_multiple,
        )
        if action.prepared is not None:
            geo.check_size(action.prepared.region, conn.limits.max_pixels)
        try:
            rid = conn.session.generate(
                **action.request_kwargs(), preview=0, policy="replace", stream=STREAM
            )
        except protocol.ProtocolError as e:
            raise geo.EditorError(f"cannot send this request: {e.message}") from None
        except OSError as e:
            raise geo.EditorError(f"could not send the request to {conn.address}: {e}") from e
        action.job = conn.session.jobs[rid]
        self.sent.append(action)
        self._pending.append((len(self.sent), action))

    def _collect(self) -> None:
        """Show the newest finished frame (never an older one after it)."""
        still = []
        for seq, action in self._pending:
            if action.job.result is not None and action.placement is None:
                action.handle(action.job.result)
            if action.placement is not None and seq > self._shown:
                self._show(seq, action.placement)
            elif action.state == "failed" and not action.job.superseded:
                raise geo.EditorError(action.error or "the live request failed")
            if not action.done:
                still.append((seq, action))
        self._pending = still

    def _show(self, seq: int, p: geo.Placement) -> None:
        image = self.image
        width, height = image.get_width(), image.get_height()
        if self.layer is None or not self.layer.is_valid():
            self.layer = Gimp.Layer.new(
                image, LIVE_LAYER, width, height, Gimp.ImageType.RGBA_IMAGE, 100.0,
                Gimp.LayerMode.NORMAL,
            )  # fmt: skip
            image.insert_layer(self.layer, None, 0)  # one undo step: "add layer"
        # GIMP kills a plug-in that writes to a content-locked drawable ("tried writing to a
        # locked drawable (killing)"): unlock, write, lock again, with the undo stack frozen
        # so that neither the lock toggles nor the frames become undo steps.
        image.undo_freeze()
        try:
            self.layer.set_lock_content(False)
            buffer = self.layer.get_buffer()
            buffer.set(_rect(geo.Rect(0, 0, width, height)), RGBA, bytes(width * height * 4))
            buffer.set(_rect(geo.Rect(p.x, p.y, p.width, p.height)), RGBA, p.rgba)
            buffer.flush()
            self.layer.update(0, 0, width, height)
            self.layer.set_lock_content(True)
        finally:
            image.undo_thaw()
        Gimp.displays_flush()
        self._shown = seq
        self.frames += 1


def apply(image):
    """The ``[sdkit live]`` frame as a normal layer under it (one undo group); the layer."""
    live = find_live_layer(image)
    if live is None:
        raise geo.EditorError("no [sdkit live] layer: run Filters > sdkit > Live first")
    image.undo_group_start()
    try:
        layer = live.copy()
        image.insert_layer(layer, None, image.get_item_position(live) + 1)
        layer.set_lock_content(False)
        layer.set_name("[sdkit] live frame")
    finally:
        image.undo_group_end()
    Gimp.displays_flush()
    return layer


# --- the procedures (registered by sdkit-gimp.py) ---------------------------------------

LIVE_PROCEDURE = "sdkit-live"
APPLY_PROCEDURE = "sdkit-live-apply"
PROCEDURES = (LIVE_PROCEDURE, APPLY_PROCEDURE)


def _run_live(procedure, run_mode, image, drawables, config, data):
    import gi
    from gi.repository import GObject

    if run_mode == Gimp.RunMode.INTERACTIVE:  # the menu: ask for the fields first
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
        num_inference_steps=steps or LIVE_STEPS,
        guidance_scale=LIVE_GUIDANCE,
        seed=None if seed < 0 else seed,
        strength=config.get_property("strength"),
    )
    layers = [d for d in drawables if d is not None and d.get_name() != LIVE_LAYER]
    if not layers:
        layers = [d for d in image.get_layers() if d.get_name() != LIVE_LAYER][:1]
    if not layers:
        return procedure.new_return_values(
            Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error("live mode needs a layer to follow")
        )
    live = Live(image, layers[0], params, config.get_property("server"))
    live.run(frames=config.get_property("frames"), seconds=config.get_property("seconds"))
    if live.error is not None:
        return procedure.new_return_values(
            Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(live.error)
        )
    retval = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
    retval.remove(1)
    retval.insert(1, GObject.Value(GObject.TYPE_INT, live.frames))
    return retval


def _run_apply(procedure, run_mode, image, drawables, config, data):
    try:
        apply(image)
    except geo.EditorError as e:
        return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR, GLib.Error(str(e)))
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())


def create(plugin, name: str, default_address: str):
    """The ``sdkit-live`` or ``sdkit-live-apply`` procedure of ``plugin``."""
    from gi.repository import GObject

    live = name == LIVE_PROCEDURE
    procedure = Gimp.ImageProcedure.new(
        plugin, name, Gimp.PDBProcType.PLUGIN, _run_live if live else _run_apply, None
    )
    procedure.set_image_types("RGB*")
    procedure.set_sensitivity_mask(
        Gimp.ProcedureSensitivityMask.DRAWABLE
        | Gimp.ProcedureSensitivityMask.DRAWABLES
        | Gimp.ProcedureSensitivityMask.NO_DRAWABLES
    )
    procedure.set_menu_label("_Live" if live else "_Apply live frame")
    procedure.add_menu_path("<Image>/Filters/sdkit")
    procedure.set_attribution("sdkit", "sdkit", "2026")
    if not live:
        procedure.set_documentation(
            "Keep the live frame", "Copies the [sdkit live] layer into a normal layer.", name
        )
        return procedure
    procedure.set_documentation(
        "Redraw the layer as you paint",
        "Watches the selected layer and redraws it (img2img; inpaint with a selection) into "
        "the [sdkit live] layer at every change; delete that layer to stop.",
        name,
    )
    rw = GObject.ParamFlags.READWRITE
    procedure.add_string_argument("prompt", "_Prompt", "What to draw", "", rw)
    procedure.add_double_argument("strength", "_Strength", "How much to change", 0.01, 1.0, 0.6, rw)
    procedure.add_int_argument("steps", "S_teps", "0: the live preset's 6", 0, 200, 0, rw)
    procedure.add_int_argument(
        "seed", "S_eed", "-1: random, fixed while live", -1, 2**31 - 1, -1, rw
    )
    procedure.add_int_argument(
        "frames", "_Frames", "Stop after this many (0: never)", 0, 10**6, 0, rw
    )
    procedure.add_double_argument(
        "seconds", "Se_conds", "Stop after this long (0: never)", 0.0, 10.0**6, 0.0, rw
    )
    procedure.add_string_argument(
        "server", "Ser_ver", "Address of `sdkit serve`", default_address, rw
    )
    procedure.add_int_return_value("frames", "Frames", "Frames shown", 0, 10**6, 0, rw)
    return procedure
