"""The engine's LoRAs and embeddings as buttons: a click puts one into the prompt.

A LoRA goes in as A1111's `<lora:NAME:1>` tag (edit the weight in the prompt), an
embedding as its name (A1111's rule: the word triggers it). The names are the engine's
(`Engine.info()["loras"|"embeddings"]`); an engine that lists none shows nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w

KINDS = {"loras": "LoRAs", "embeddings": "Embeddings"}


def lora_tag(name: str, weight: float = 1.0) -> str:
    return f"<lora:{name}:{weight:g}>"


def add_to_prompt(prompt: str, text: str) -> str:
    """`prompt` with `text` appended after a space (kept once: a second click adds nothing)."""
    if text in prompt.split() or (text.startswith("<lora:") and text in prompt):
        return prompt
    return f"{prompt.rstrip()} {text}" if prompt.strip() else text


class AdapterList:
    """`widget`: one row of buttons per kind; `buttons[kind][name]` for scripts and tests."""

    def __init__(self, insert: Callable[[str], None]) -> None:
        self._insert = insert
        self.buttons: dict[str, dict[str, w.Button]] = {kind: {} for kind in KINDS}
        self._rows = {
            kind: w.HBox(layout=w.Layout(flex_flow="row wrap", align_items="center"))
            for kind in KINDS
        }
        self.widget = w.VBox(list(self._rows.values()), layout=w.Layout(margin="4px 0"))
        self.widget.add_class("sdkit-adapters")
        self.prompted = True  # the current mode has a prompt to put them in
        self.show({})

    def names(self, kind: str) -> list[str]:
        return list(self.buttons[kind])

    def show(self, info: Mapping[str, Any]) -> None:
        """Buttons for the names `info` (an engine's `info()`) lists; hidden when none."""
        for kind, title in KINDS.items():
            names = [n for n in info.get(kind) or [] if isinstance(n, str)]
            self.buttons[kind] = {n: self._button(kind, n) for n in names}
            label = w.HTML(
                f"<b style='font-size:12px;color:#666;width:7.5em;display:inline-block'>{title}</b>"
            )
            row = self._rows[kind]
            row.children = (label, *self.buttons[kind].values()) if names else ()
            row.layout.display = None if names else "none"
        self._refresh()

    def for_mode(self, fields: Any) -> None:
        """Shown only for a mode with a prompt (and only when the engine has adapters)."""
        self.prompted = "prompt" in fields
        self._refresh()

    def _refresh(self) -> None:
        shown = self.prompted and any(self.buttons.values())
        self.widget.layout.display = None if shown else "none"

    def _button(self, kind: str, name: str) -> w.Button:
        text = lora_tag(name) if kind == "loras" else name
        b = w.Button(
            description=name,
            tooltip=f"add {text} to the prompt",
            layout=w.Layout(width="auto", margin="1px 3px"),
        )
        b.add_class(f"sdkit-{kind}-button")
        b.on_click(lambda _: self._insert(text))
        return b
