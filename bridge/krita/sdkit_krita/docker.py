"""The sdkit docker: prompt, parameters, one button per server mode, progress with a preview.

The buttons are the modes the server's ``hello`` describes (their titles), rebuilt when
the docker connects to another server; before any server answers, today's three modes.
"""

from __future__ import annotations

from krita import DockWidget

from . import control_layer as cl
from . import editor_actions as ea
from . import editor_expand as ex
from . import live as lv
from . import upscale as up
from .controller import shared
from .qt import Qt, QtGui, QtWidgets

PREVIEW_SIZE = 160

_dockers: list[SdkitDocker] = []


def current_docker() -> SdkitDocker | None:
    """The docker whose fields the menu actions use (the visible one, else the newest)."""
    visible = [d for d in _dockers if d.isVisible()]
    pool = visible or _dockers
    return pool[-1] if pool else None


class SdkitDocker(DockWidget):
    """Settings > Dockers > sdkit. All work goes through the shared Controller."""

    def __init__(self):
        super().__init__()
        self.setWindowTitle("sdkit")
        self.controller = shared()
        self._build()
        _dockers.append(self)
        c = self.controller
        c.status_changed.connect(self._on_status)
        c.progress_changed.connect(self._on_progress)
        c.busy_changed.connect(self._on_busy)
        c.failed.connect(self._on_failed)
        c.finished.connect(self._on_finished)
        if c.conn.state == "disconnected":
            c.connect_to()
        else:
            self._on_status(c.conn.status_text(), c.conn.state == "connected")

    def _build(self) -> None:
        W = QtWidgets
        root = W.QWidget(self)
        form = W.QFormLayout()
        self.address = W.QLineEdit(self.controller.conn.address)
        self.reconnect = W.QPushButton("Reconnect")
        self.reconnect.clicked.connect(lambda: self.controller.connect_to(self.address.text()))
        addr_row = W.QHBoxLayout()
        addr_row.addWidget(self.address, 1)
        addr_row.addWidget(self.reconnect)
        form.addRow("Server", addr_row)
        self.status = W.QLabel("not connected")
        self.status.setWordWrap(True)
        form.addRow("Status", self.status)
        self.model = W.QLabel("—")
        self.model.setWordWrap(True)
        form.addRow("Model", self.model)

        self.prompt = W.QPlainTextEdit()
        self.prompt.setPlaceholderText("a red circle on a blue background")
        self.prompt.setMaximumHeight(70)
        form.addRow("Prompt", self.prompt)
        self.negative = W.QPlainTextEdit()
        self.negative.setMaximumHeight(45)
        form.addRow("Negative", self.negative)
        self.loras = W.QComboBox()
        self.loras.setToolTip("The server's LoRAs: choosing one adds <lora:NAME:1> to the prompt")
        self.loras.activated.connect(self._on_lora)
        self._show_loras()
        form.addRow("LoRA", self.loras)
        cl.build_row(self, form)  # layer, model, module, weight (sdkit_krita.control_layer)

        self.strength = W.QDoubleSpinBox()
        self.strength.setRange(0.01, 1.0)
        self.strength.setSingleStep(0.05)
        self.strength.setValue(0.75)
        form.addRow("Strength", self.strength)
        self.steps = W.QSpinBox()
        self.steps.setRange(0, 200)
        self.steps.setSpecialValueText("model default")
        self.steps.setValue(0)
        form.addRow("Steps", self.steps)
        self.seed = W.QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setSpecialValueText("random")
        self.seed.setValue(-1)
        form.addRow("Seed", self.seed)

        self._build_expand(form)
        up.build_row(self, form)  # factor, target, strength, Upscale (sdkit_krita.upscale)
        lv.build_row(self, form)  # Live toggle, Apply (sdkit_krita.live)

        self.button_grid = W.QGridLayout()
        self.buttons: dict[str, QtWidgets.QPushButton] = {}
        self._show_modes()

        self.progress = W.QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.progress.setTextVisible(True)
        self.cancel = W.QPushButton("Cancel")
        self.cancel.setEnabled(False)
        self.cancel.clicked.connect(self.controller.cancel)
        prog_row = W.QHBoxLayout()
        prog_row.addWidget(self.progress, 1)
        prog_row.addWidget(self.cancel)
        self.preview = W.QLabel()
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.setMinimumHeight(PREVIEW_SIZE)

        layout = W.QVBoxLayout(root)
        layout.addLayout(form)
        layout.addLayout(self.button_grid)
        layout.addLayout(prog_row)
        layout.addWidget(self.preview)
        layout.addStretch(1)
        self.setWidget(root)

    def _show_modes(self) -> None:
        """One button per mode the server offers; rebuilt only when the modes change."""
        modes = self.controller.conn.modes
        if tuple(m.name for m in modes) == tuple(self.buttons):
            return
        for b in self.buttons.values():
            self.button_grid.removeWidget(b)
            b.deleteLater()
        self.buttons = {}
        for i, mode in enumerate(modes):
            b = QtWidgets.QPushButton(mode.title)
            b.setToolTip(f"{mode.name}: " + (", ".join(mode.inputs) or "a new layer"))
            b.clicked.connect(lambda _=False, name=mode.name: self.run(name))
            b.setEnabled(not self.controller.busy)
            self.button_grid.addWidget(b, i // 2, i % 2)
            self.buttons[mode.name] = b
        steps = self.controller.conn.field_range("num_inference_steps")
        if steps is not None:
            self.steps.setMaximum(int(steps[1]))

    def _show_loras(self) -> None:
        """The server's LoRA names (hello's ``loras``) after a placeholder first entry."""
        names = self.controller.conn.adapters("loras")
        if self.loras.count() and names == self.lora_names():
            return
        self.loras.clear()
        self.loras.addItem("add a LoRA…" if names else "(the server has no LoRAs)")
        self.loras.addItems(names)
        self.loras.setEnabled(bool(names))

    def lora_names(self) -> list[str]:
        """The LoRA names the combo box offers (without its placeholder)."""
        return [self.loras.itemText(i) for i in range(1, self.loras.count())]

    def _on_lora(self, index: int) -> None:
        if index > 0:
            self.choose_lora(self.loras.itemText(index))
        self.loras.setCurrentIndex(0)

    def choose_lora(self, name: str) -> None:
        """Add ``<lora:NAME:1>`` to the prompt (the weight can be edited there)."""
        self.prompt.setPlainText(ea.with_lora(self.prompt.toPlainText(), name))

    def params(self) -> ea.Params:
        steps, seed = self.steps.value(), self.seed.value()
        return ea.Params(
            prompt=self.prompt.toPlainText().strip(),
            negative_prompt=self.negative.toPlainText().strip(),
            strength=self.strength.value(),
            num_inference_steps=steps or None,
            seed=None if seed < 0 else seed,
        )

    def run(self, mode: str) -> None:
        if not cl.choose_for(self):  # the Control row's layer, if one is chosen
            return
        if mode == ex.MODE:  # the server's outpaint mode is Expand canvas here
            self.expand()
            return
        if mode == up.MODE:  # the upscale mode's result is a new document or a scaled one
            up.run_from_docker(self)
            return
        self.controller.run(mode, self.params())

    # -- Expand canvas
    def _build_expand(self, form) -> None:
        """The Expand row: pixels to add per side and the Expand canvas button."""
        W = QtWidgets
        row = W.QHBoxLayout()
        self.expand_sides: dict[str, QtWidgets.QSpinBox] = {}
        for side, label in (("left", "←"), ("right", "→"), ("top", "↑"), ("bottom", "↓")):
            box = W.QSpinBox()
            box.setRange(0, 4096)
            box.setSingleStep(8)
            box.setPrefix(label + " ")
            box.setToolTip(f"pixels to add on the {side}")
            row.addWidget(box)
            self.expand_sides[side] = box
        self.expand_button = W.QPushButton("Expand canvas")
        self.expand_button.setToolTip(
            "grow the document by these pixels and paint the new area (a new layer)"
        )
        self.expand_button.clicked.connect(lambda _=False: self.expand())
        row.addWidget(self.expand_button)
        form.addRow("Expand", row)

    def expand(self) -> None:
        """Grow the document by the chosen pixels; the new area comes back as a layer."""
        sides = ex.Sides(**{side: box.value() for side, box in self.expand_sides.items()})
        self.controller.expand(self.params(), sides)

    # -- controller signals
    def _on_status(self, text: str, ok: bool) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("" if ok else "color: #c0392b;")
        self.model.setText(self.controller.model_text())
        if ok:
            self._show_modes()
            self._show_loras()
            cl.refresh_models(self)

    def _on_progress(self, fraction: float, status: str, preview) -> None:
        self.progress.setValue(int(fraction * 1000))
        self.progress.setFormat(status or "%p%")
        if preview is not None:
            pix = QtGui.QPixmap.fromImage(preview).scaled(
                PREVIEW_SIZE,
                PREVIEW_SIZE,
                Qt.AspectRatioMode.KeepAspectRatio,
                Qt.TransformationMode.SmoothTransformation,
            )
            self.preview.setPixmap(pix)

    def _on_busy(self, busy: bool) -> None:
        for b in self.buttons.values():
            b.setEnabled(not busy)
        self.expand_button.setEnabled(not busy)
        self.cancel.setEnabled(busy)

    def _on_failed(self, message: str) -> None:
        self.progress.setFormat(message)
        self.status.setToolTip(message)
        if self.isVisible():
            QtWidgets.QMessageBox.warning(self, "sdkit", message)

    def _on_finished(self, layer) -> None:
        self.progress.setFormat(f"added {layer.name()}")

    def canvasChanged(self, canvas) -> None:  # required by DockWidget
        pass
