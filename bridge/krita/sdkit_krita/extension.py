"""Menu actions (Tools > Scripts > sdkit …) that run with the docker's fields.

Krita creates menu actions at start-up, before any server answers, so these are
shortcuts for the standard modes by name; a server that does not offer one says so.
The docker's buttons follow the server's own list.
"""

from __future__ import annotations

from krita import Extension

from . import editor_actions as ea
from .controller import shared
from .docker import current_docker
from .qt import QtWidgets

ACTIONS = (
    ("sdkit_generate", "sdkit: Generate", "txt2img"),
    ("sdkit_img2img", "sdkit: Img2img selection", "img2img"),
    ("sdkit_inpaint", "sdkit: Inpaint selection", "inpaint"),
    ("sdkit_cancel", "sdkit: Cancel", None),
)


class SdkitExtension(Extension):
    def __init__(self, parent):
        super().__init__(parent)

    def setup(self) -> None:
        pass

    def createActions(self, window) -> None:
        for action_id, text, mode in ACTIONS:
            action = window.createAction(action_id, text, "tools/scripts")
            action.triggered.connect(lambda _=False, m=mode: self.trigger(m))

    def trigger(self, mode: str | None) -> None:
        controller = shared()
        if mode is None:
            controller.cancel()
            return
        docker = current_docker()
        if docker is None or not docker.params().prompt:
            QtWidgets.QMessageBox.information(
                None, "sdkit", "Open Settings > Dockers > sdkit and type a prompt first."
            )
            return
        controller.run(mode, docker.params() if docker else ea.Params())
