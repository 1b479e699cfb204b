"""Live mode for Krita (issue 16.4): the picture follows the brush.

Krita has no "pixels changed" signal, so a QTimer polls a cheap checksum (CRC-32) of the
layer being painted on, the selection and the docker's fields every ``POLL_MS``. A change
sends the region as img2img (inpaint when there is a selection) with the ``replace`` policy
on one stream, so a newer frame supersedes the one waiting or running on the server. The
newest result is written in place into one locked ``[sdkit live]`` layer; *Apply* copies
the frame into a normal layer (one undo step).

The source is the layer the artist paints on, not the merged image: the preview layer is
then never read back into the next frame. Writing pixels into the preview layer is not an
undo step (only adding and removing it are), so live frames do not flood the history.
Nothing here blocks: the request is sent as a non-blocking message and the controller's
timer pumps the socket; this timer only looks at the jobs' states.

While the server is away the status says "reconnecting" and the stream resumes by itself
with the current picture once it answers again; if it comes back with another model, the
stream stops and says so (its frames were of the old model).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import replace

from . import canvas, protocol
from . import editor_actions as ea
from . import editor_geometry as geo
from .pictures import bgra_to_rgba, rgba_to_bgra
from .qt import QObject, QTimer, Signal

LIVE_LAYER = "[sdkit live]"
STREAM = "krita-live"
POLL_MS = 100
# sdkit.live.LIVE_DEFAULTS (the editor side imports no sdkit): used where the docker leaves
# the choice to the model, whose defaults are for full pictures, not live frames.
LIVE_STEPS, LIVE_GUIDANCE = 6, 1.0


class LiveMode(QObject):
    """One live stream on the shared controller's connection, for one document."""

    frame_shown = Signal(int)  # frames shown so far
    status_changed = Signal(str)
    stopped = Signal()  # by the user or because the model changed: the toggle goes off

    def __init__(self, controller, params, parent=None):
        super().__init__(parent)
        self.controller = controller
        self.params = params  # () -> ea.Params: the docker's fields, read at every poll
        self.doc = None
        self.source = None  # the paint layer followed
        self.layer = None  # the [sdkit live] preview layer
        self.frame: geo.Placement | None = None  # the result on show
        self.frames = 0
        self.sent: list[ea.Action] = []  # every live request, oldest first
        self._pending: list[tuple[int, ea.Action]] = []
        self._shown = 0
        self._checksum: int | None = None
        self._shown_rect: geo.Rect | None = None
        self.seed: int | None = None  # fixed while live is on and the docker says random
        self.model: tuple | None = None  # hello's model the frames are of, once connected
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)

    @property
    def on(self) -> bool:
        return self.timer.isActive()

    def start(self, doc=None, layer=None) -> None:
        """Follow ``layer`` (default: the active layer, else the top paint layer) of ``doc``
        (default: the active document)."""
        if doc is None:
            from krita import Krita

            doc = Krita.instance().activeDocument()
        canvas.check_document(doc)
        node = layer or doc.activeNode()
        if node is None:  # no view (scripts): the top paint layer
            painted = [n for n in doc.rootNode().childNodes() if n.type() == "paintlayer"]
            node = next((n for n in reversed(painted) if n.name() != LIVE_LAYER), None)
        if node is None or node.type() != "paintlayer" or node.name() == LIVE_LAYER:
            raise geo.EditorError("live mode follows a paint layer: select the one you paint on")
        self.doc, self.source, self._checksum, self.model = doc, node, None, None
        self.seed = random.randrange(2**31)
        if self.controller.conn.state in ("disconnected", "failed"):
            self.controller.connect_to()
        self.controller.timer.start()
        self.timer.start()
        self.status_changed.emit("live: watching " + node.name())

    def stop(self, message: str = "live off") -> None:
        """Stop watching, cancel what runs, remove the preview layer; say ``message``."""
        if not self.on:
            return
        self.timer.stop()
        for _, action in self._pending:
            action.cancel(self.controller.conn)
        self._pending.clear()
        if self.layer is not None:
            self.layer.remove()
            self.layer = None
        self.frame = None
        self.status_changed.emit(message)
        self.stopped.emit()

    # -- the timer
    def poll(self) -> None:
        self._collect()
        conn = self.controller.conn
        if conn.state != "connected":
            self.status_changed.emit(f"live: reconnecting ({conn.status_text()})")
            if conn.state == "failed":
                self.controller.connect_to()
            self._checksum = None  # send the current picture once connected again
            return
        model = (conn.model.get("spec"), conn.model.get("name"))
        if self.model is None:
            self.model = model
        elif model != self.model:  # the server came back with another model, or another server
            self.stop(f"live stopped: the model changed to {conn.model_text()}; turn Live on again")
            return
        try:
            checksum = self.checksum()
            if checksum != self._checksum:
                self._checksum = checksum
                self._send()
        except (geo.EditorError, RuntimeError) as e:  # a closed document, an empty selection
            self.status_changed.emit(f"live: {e}")

    def fields(self) -> ea.Params:
        """The docker's fields, the seed fixed: the picture changes only where the drawing does."""
        params = self.params()
        return replace(
            params,
            seed=self.seed if params.seed is None else params.seed,
            num_inference_steps=params.num_inference_steps or LIVE_STEPS,
            guidance_scale=LIVE_GUIDANCE
            if params.guidance_scale is None
            else params.guidance_scale,
        )

    def checksum(self) -> int:
        """CRC-32 of the followed layer's pixels, the selection and the fields."""
        doc, source = self.doc, self.source
        assert doc is not None and source is not None  # only polled while following
        w, h = doc.width(), doc.height()
        crc = zlib.crc32(bytes(source.pixelData(0, 0, w, h)))
        sel = doc.selection()
        if sel is not None:
            crc = zlib.crc32(bytes(sel.pixelData(0, 0, w, h)), crc)
        return zlib.crc32(repr(self.fields()).encode(), crc)

    def _send(self) -> None:
        conn, doc, source = self.controller.conn, self.doc, self.source
        assert doc is not None and source is not None  # only sent while following
        params = self.fields()
        if params.width is None or params.height is None:
            params.width, params.height = conn.default_size()
        selection = live_selection(doc)
        mode = conn.mode("inpaint" if selection is not None else "img2img")

        def read(rect: geo.Rect) -> bytes:
            return bgra_to_rgba(bytes(source.pixelData(rect.x, rect.y, rect.width, rect.height)))

        action = ea.plan_action(
            mode,
            params,
            (doc.width(), doc.height()),
            selection,
            read,
            lambda rect: canvas.read_mask(doc, rect) if selection is not None else None,
            multiple=conn.size_multiple,
        )
        if action.prepared is not None:
            geo.check_size(action.prepared.region, conn.limits.max_pixels)
        try:
            rid = conn.session.generate(
                **action.request_kwargs(), preview=0, policy="replace", stream=STREAM
            )
        except protocol.ProtocolError as e:  # over a limit from hello: refused before sending
            raise geo.EditorError(f"cannot send this request: {e.message}") from None
        except OSError as e:
            raise geo.EditorError(f"could not send the request: {e}") from e
        action.job = conn.session.jobs[rid]
        self.sent.append(action)
        self._pending.append((len(self.sent), action))

    def _collect(self) -> None:
        """Show the newest finished frame; forget ended requests (superseded ones too)."""
        still = []
        for seq, action in self._pending:
            job = action.job
            assert job is not None  # set right after the request was sent
            if job.result is not None and action.placement is None:
                action.handle(job.result)
            if action.placement is not None and seq > self._shown:
                self._show(seq, action.placement)
            elif action.done and action.state == "failed" and not job.superseded:
                self.status_changed.emit(f"live: {action.error}")
            if not action.done:
                still.append((seq, action))
        self._pending = still

    def _show(self, seq: int, placement: geo.Placement) -> None:
        doc = self.doc
        assert doc is not None  # frames arrive only while following a document
        if self.layer is None or self.layer.parentNode() is None:
            self.layer = self._preview_layer(doc)
        old = self._shown_rect
        if old is not None:  # clear the previous frame (the selection may have moved)
            self.layer.setPixelData(
                bytes(old.width * old.height * 4), old.x, old.y, old.width, old.height
            )
        p = placement
        self.layer.setPixelData(rgba_to_bgra(p.rgba), p.x, p.y, p.width, p.height)
        self._shown_rect = geo.Rect(p.x, p.y, p.width, p.height)
        doc.refreshProjection()
        self._shown, self.frame = seq, placement
        self.frames += 1
        self.frame_shown.emit(self.frames)
        self.status_changed.emit(f"live frame {self.frames}")

    def _preview_layer(self, doc):
        """The document's [sdkit live] layer, cleared: one that an Undo after Live off brought
        back is reused, never doubled. Else a new locked one on top (one undo step)."""
        root = doc.rootNode()
        layers = [n for n in root.childNodes() if n.type().endswith("layer")]
        self._shown_rect = None
        for node in layers:
            if node.name() == LIVE_LAYER and node.type() == "paintlayer":
                w, h = doc.width(), doc.height()
                node.setPixelData(bytes(w * h * 4), 0, 0, w, h)
                return node
        layer = doc.createNode(LIVE_LAYER, "paintlayer")
        root.addChildNode(layer, layers[-1] if layers else None)
        layer.setLocked(True)
        return layer

    def apply(self):
        """The frame on show as a normal layer above the followed one (one undo step)."""
        if self.frame is None:
            raise geo.EditorError("no live frame to apply yet")
        return canvas.add_layer(self.doc, self.frame, above=self.source)


def live_selection(doc) -> geo.Rect | None:
    """The selection's bounds; None without one or with an empty one (a script's Deselect
    leaves an empty selection): live then follows the whole layer instead of stopping."""
    rect = canvas.selection_rect(doc)
    if rect is None or rect.is_empty():
        return None
    mask = canvas.read_mask(doc, rect)
    return None if mask is None or geo.mask_is_empty(mask) else rect


def build_row(docker, form) -> None:
    """The docker's Live row: a Live toggle and Apply."""
    from .qt import QtWidgets as W

    docker.live = LiveMode(docker.controller, docker.params, docker)
    docker.live_button = W.QPushButton("Live")
    docker.live_button.setCheckable(True)
    docker.live_button.setToolTip("regenerate the layer you paint on at every change")
    docker.apply_button = W.QPushButton("Apply")
    docker.apply_button.setToolTip("keep the live frame as a normal layer")
    docker.apply_button.setEnabled(False)
    docker.live_status = W.QLabel("")

    def toggled(on: bool) -> None:
        try:
            docker.live.start() if on else docker.live.stop()
        except geo.EditorError as e:
            docker.live_button.setChecked(False)
            docker.live_status.setText(str(e))

    docker.live_button.toggled.connect(toggled)
    docker.apply_button.clicked.connect(lambda _=False: docker.live.apply())
    docker.live.frame_shown.connect(lambda _n: docker.apply_button.setEnabled(True))

    def stopped() -> None:  # also when the model changed: the toggle says live is off
        docker.apply_button.setEnabled(False)
        docker.live_button.setChecked(False)

    docker.live.stopped.connect(stopped)
    docker.live.status_changed.connect(docker.live_status.setText)
    row = W.QHBoxLayout()
    for widget in (docker.live_button, docker.apply_button, docker.live_status):
        row.addWidget(widget)
    form.addRow("Live", row)
