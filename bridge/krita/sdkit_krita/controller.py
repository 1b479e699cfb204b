"""Runs the plug-in's actions: reads the document, talks to the server, adds the layer.

The socket is pumped from a QTimer on the UI thread (``Connection.poll(0)`` never
blocks), so Krita stays responsive while the server works and Cancel always reacts.
"""

from __future__ import annotations

from . import canvas
from . import control_layer as cl
from . import editor_actions as ea
from . import editor_expand as ex
from . import editor_geometry as geo
from . import upscale as up
from .editor_connection import DEFAULT_ADDRESS, Connection
from .pictures import rgba8
from .qt import QObject, QtGui, QTimer, Signal

POLL_MS = 30


def picture_to_qimage(pic) -> QtGui.QImage | None:
    """A preview picture as a QImage that owns its bytes (None for what it cannot show)."""
    try:
        data = rgba8(pic) if pic is not None else None
    except ValueError:  # a PNG preview: the plug-in asks for rgba8, so never in practice
        return None
    if data is None:
        return None
    image = QtGui.QImage(
        data, pic.width, pic.height, pic.width * 4, QtGui.QImage.Format.Format_RGBA8888
    )
    return image.copy()  # detach from the Python buffer


class Controller(QObject):
    """One connection and at most one action at a time, shared by the docker and actions."""

    status_changed = Signal(str, bool)  # status line, connected
    progress_changed = Signal(float, str, object)  # fraction, status, QImage preview or None
    finished = Signal(object)  # the new layer (krita Node)
    failed = Signal(str)  # what went wrong, for a message box / status line
    busy_changed = Signal(bool)

    def __init__(self, address: str = DEFAULT_ADDRESS, parent=None):
        super().__init__(parent)
        self.conn = Connection(address, client="sdkit-krita")
        self.action: ea.Action | None = None  # the latest action
        self._open: ea.Action | None = None  # the action whose end is not reported yet
        self.document = None
        self.last_layer = None
        self._last_status: tuple[str, bool] | None = None
        self._waiting: tuple | None = None  # an action waiting for the connection
        self.control_layer = None  # (ControlChoice, layer name): see control_layer.py
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)

    # -- connection
    @property
    def busy(self) -> bool:
        return self._waiting is not None or self._open is not None

    def connect_to(self, address: str | None = None) -> None:
        """(Re)connect; the hello reply or the failure arrives through ``poll``."""
        if address and address != self.conn.address:
            self.conn.close()
            self.conn = Connection(address, client="sdkit-krita")
        self.conn.open()
        self._emit_status()
        self.timer.start()

    def model_text(self) -> str:
        return self.conn.model_text() if self.conn.state == "connected" else "—"

    def _emit_status(self) -> None:
        status = (self.conn.status_text(), self.conn.state == "connected")
        if status != self._last_status:
            self._last_status = status
            self.status_changed.emit(*status)

    # -- actions
    def run(
        self, mode: str, params: ea.Params, doc=None, *, margin: int = geo.DEFAULT_MARGIN, plan=None
    ):
        """Start ``mode`` on ``doc`` (default: the active document). False if refused.

        ``plan(mode_info, doc)`` makes the action instead of ``plan_action`` (Expand canvas).

        Without a connection the action waits (without blocking Krita) until the server
        has answered hello, or fails with the connection's message.
        """
        if self.busy:
            self.failed.emit("sdkit is still working on the previous request (Cancel it first)")
            return False
        try:
            if doc is None:
                from krita import Krita

                doc = Krita.instance().activeDocument()
            canvas.check_document(doc)
        except geo.EditorError as e:
            self.failed.emit(str(e))
            return False
        self.document = doc
        if self.conn.state != "connected":
            self._waiting = (mode, params, doc, margin, plan)
            if self.conn.state != "connecting":
                self.connect_to()
            self.busy_changed.emit(True)
            self.progress_changed.emit(0.0, self.conn.status_text(), None)
            self.timer.start()
            return True
        return self._start(mode, params, doc, margin, plan)

    def expand(self, params: ea.Params, sides: ex.Sides, doc=None, *, seam: int = ex.DEFAULT_SEAM):
        """Expand canvas: outpaint the whole document by ``sides``; the document grows and
        gets the new area (and the seam) as a layer once the result is in."""

        def plan(mode, doc):
            size = (doc.width(), doc.height())
            read = lambda rect: canvas.read_rgba(doc, rect)  # noqa: E731
            return ex.plan_expand(mode, params, sides, size, read, seam=seam)

        return self.run(ex.MODE, params, doc, plan=plan)

    def _start(self, mode: str, params: ea.Params, doc, margin: int, plan=None) -> bool:
        try:
            if params.width is None or params.height is None:
                w, h = self.conn.default_size()
                params.width = params.width or w
                params.height = params.height or h
            if plan is not None:
                action = plan(self.conn.mode(mode), doc)
            else:
                action = ea.plan_action(
                    self.conn.mode(mode),
                    params,
                    (doc.width(), doc.height()),
                    canvas.selection_rect(doc),
                    lambda rect: canvas.read_rgba(doc, rect),
                    lambda rect: canvas.read_mask(doc, rect),
                    margin=margin,
                    multiple=self.conn.size_multiple,
                )
            cl.apply(self, action, doc)  # the control layer, for modes that take one
            action.start(self.conn)
        except geo.EditorError as e:
            self.busy_changed.emit(False)
            self.failed.emit(str(e))
            return False
        self.action = self._open = action
        self.busy_changed.emit(True)
        self.progress_changed.emit(0.0, action.status, None)
        self.timer.start()
        return True

    def cancel(self) -> None:
        if self._waiting is not None:
            self._waiting = None
            self.busy_changed.emit(False)
            self.progress_changed.emit(0.0, "cancelled", None)
        elif self._open is not None:
            action = self._open
            action.cancel(self.conn)
            self.progress_changed.emit(action.fraction, action.status, None)

    # -- the timer
    def poll(self) -> None:
        events = self.conn.poll(0)
        if self._waiting is not None:
            if self.conn.state == "connected":
                waiting, self._waiting = self._waiting, None
                self._start(*waiting)
            elif self.conn.state == "failed":
                self._waiting = None
                self.busy_changed.emit(False)
                self.progress_changed.emit(0.0, self.conn.error or "not connected", None)
                self.failed.emit(self.conn.error or "not connected")
        # The session has already applied the events to the action's job: an action may be
        # done before it sees them, so "not reported yet" is what counts here.
        action = self._open
        if action is not None:
            changed = False
            for ev in events:
                changed |= action.handle(ev)
            if not action.done and self.conn.state == "failed":
                action.fail(self.conn.error or "lost the connection")
            if changed and not action.done:
                self.progress_changed.emit(
                    action.fraction, action.status, picture_to_qimage(action.preview)
                )
            if action.done:
                self._open = None
                self._finish(action)
        self._emit_status()
        if self.conn.state == "failed" and not self.busy:
            self.timer.stop()

    def _finish(self, action: ea.Action) -> None:
        self.busy_changed.emit(False)
        if action.state == "done" and action.placement is not None:
            try:
                canvas.check_document(self.document)
                if isinstance(action, ex.ExpandAction):
                    self.last_layer = canvas.grow_and_add_layer(self.document, action)
                elif isinstance(action, up.UpscaleAction):  # a new document, or scaled
                    self.last_layer = up.add_result(self.document, action)
                else:
                    self.last_layer = canvas.add_layer(self.document, action.placement)
            except Exception as e:  # noqa: BLE001 - the document may have been closed
                self.failed.emit(f"could not add the layer: {e}")
                return
            self.progress_changed.emit(1.0, action.status, picture_to_qimage(action.preview))
            self.finished.emit(self.last_layer)
        elif action.state == "cancelled":
            self.progress_changed.emit(0.0, "cancelled", None)
        else:
            self.progress_changed.emit(0.0, action.error or "failed", None)
            self.failed.emit(action.error or "the request failed")


_shared: Controller | None = None


def shared() -> Controller:
    """The one controller of this Krita process (docker and menu actions share it)."""
    global _shared
    if _shared is None:
        _shared = Controller()
    return _shared
