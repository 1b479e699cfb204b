"""Gallery / history: every result image with its seed and parameters, and what to do with it.

Runs on the widget's own thread (never the engine's): each image is encoded to PNG once,
when it arrives.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as w
from PIL import Image

from sdkit.request import Request

MAX_ITEMS = 200  # oldest entries drop out of the history beyond this


@dataclass
class GalleryItem:
    """One image of one result; `index` is its position in `result`."""

    number: int
    result: Any  # sdkit.Result
    index: int
    source: str  # "widget" or "engine" (a job someone else submitted to the shared engine)
    path: Path | None = None  # where it was auto-saved, if it was
    box: Any = field(default=None, repr=False)  # its thumbnail widget, built once

    @property
    def image(self) -> Image.Image:
        return self.result.images[self.index]

    @property
    def seed(self) -> int:
        return int(self.result.seeds[self.index])

    @property
    def request(self) -> Request:
        return self.result.request

    @property
    def infotext(self) -> str:
        texts = getattr(self.result, "infotexts", None)
        if texts and self.index < len(texts):
            return texts[self.index]
        return self.result.request.to_infotext(seed=self.seed)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Gallery:
    """Thumbnails (click to select) and a detail pane with the actions."""

    def __init__(self, thumb_px: int = 96, detail_px: int = 256) -> None:
        self.items: list[GalleryItem] = []
        self.selected: GalleryItem | None = None
        self._count = 0
        self._thumb_px = thumb_px
        self._handlers: dict[str, list[Callable[[GalleryItem], None]]] = {
            "use": [],
            "inpaint": [],
            "rerun": [],
            "select": [],
        }

        self.thumbs = w.HBox(
            layout=w.Layout(flex_flow="row wrap", max_height="250px", overflow="auto")
        )
        self.detail_image = w.Image(
            format="png",
            layout=w.Layout(width=f"{detail_px}px", height=f"{detail_px}px", object_fit="contain"),
        )
        self.detail_info = w.HTML(layout=w.Layout(width="320px"))
        self.use_button = w.Button(
            description="Use as input", icon="arrow-right", layout=w.Layout(width="11em")
        )
        self.inpaint_button = w.Button(
            description="Send to inpaint", icon="paint-brush", layout=w.Layout(width="11em")
        )
        self.rerun_button = w.Button(
            description="Re-run",
            icon="repeat",
            tooltip="Re-run with these settings and this seed",
            layout=w.Layout(width="11em"),
        )
        self.save_button = w.Button(description="Save", icon="save", layout=w.Layout(width="11em"))
        self.save_dir = w.Text(
            "outputs",
            description="to",
            style={"description_width": "1.5em"},
            layout=w.Layout(width="12em"),
        )
        self.message = w.HTML()
        self.use_button.on_click(lambda _: self._fire("use"))
        self.inpaint_button.on_click(lambda _: self._fire("inpaint"))
        self.rerun_button.on_click(lambda _: self._fire("rerun"))
        self.save_button.on_click(lambda _: self.save_selected())
        actions = w.VBox(
            [
                self.use_button,
                self.inpaint_button,
                self.rerun_button,
                w.HBox([self.save_button, self.save_dir]),
                self.message,
            ]
        )
        self.detail = w.HBox(
            [self.detail_image, w.VBox([self.detail_info, actions])],
            layout=w.Layout(display="none", gap="12px"),
        )
        self.empty = w.HTML("<span style='color:#888;font-size:12px'>No results yet.</span>")
        self.widget = w.VBox([self.empty, self.thumbs, self.detail])
        self._set_actions_enabled(False)

    # ----- content ---------------------------------------------------------------------
    def add_result(
        self, result: Any, source: str = "widget", paths: list[Path] | None = None
    ) -> list[GalleryItem]:
        """Add every image of `result` (newest first) and select the first; `paths`: where
        each image was saved."""
        new = []
        for i in range(len(result.images)):
            self._count += 1
            path = paths[i] if paths and i < len(paths) else None
            item = GalleryItem(self._count, result, i, source, path)
            item.box = self._thumb(item)
            new.append(item)
        self.items = (list(reversed(new)) + self.items)[:MAX_ITEMS]
        self.thumbs.children = [item.box for item in self.items]
        self.empty.layout.display = "none" if self.items else None
        if new:
            self.select(new[0])
        return new

    def _thumb(self, item: GalleryItem) -> w.VBox:
        img = w.Image(
            value=png_bytes(item.image),
            format="png",
            layout=w.Layout(
                width=f"{self._thumb_px}px", height=f"{self._thumb_px}px", object_fit="contain"
            ),
        )
        button = w.Button(
            description=f"#{item.number} · {item.seed}",
            tooltip=item.infotext,
            layout=w.Layout(width=f"{self._thumb_px}px", height="24px", padding="0"),
        )
        button.on_click(lambda _: self.select(item))
        button.add_class("sdkit-thumb")
        return w.VBox([img, button], layout=w.Layout(margin="2px"))

    def select(self, item: GalleryItem) -> None:
        self.selected = item
        for it in self.items:
            it.box.children[1].button_style = "info" if it is item else ""
        self.detail_image.value = png_bytes(item.image)
        origin = "" if item.source == "widget" else " <i>(submitted elsewhere)</i>"
        size = f"{item.image.width}×{item.image.height}"
        saved = (
            ""
            if item.path is None
            else f"<div class='sdkit-saved' style='color:#666'>{html.escape(str(item.path))}</div>"
        )
        self.detail_info.value = (
            f"<div style='font-size:12px'><b>#{item.number}</b> · {item.request.mode} · "
            f"seed <b class='sdkit-seed'>{item.seed}</b> · {size}{origin}"
            f"{infotext_html(item.infotext)}{saved}</div>"
        )
        self.message.value = ""
        self.detail.layout.display = None
        self._set_actions_enabled(True)
        for fn in self._handlers["select"]:
            fn(item)

    def _set_actions_enabled(self, enabled: bool) -> None:
        for b in (self.use_button, self.inpaint_button, self.rerun_button, self.save_button):
            b.disabled = not enabled

    # ----- actions ---------------------------------------------------------------------
    def on(self, action: str, fn: Callable[[GalleryItem], None]) -> None:
        """Register for "use", "inpaint", "rerun" or "select" on the selected item."""
        self._handlers[action].append(fn)

    def _fire(self, action: str) -> None:
        if self.selected is None:
            return
        for fn in self._handlers[action]:
            fn(self.selected)

    def save_selected(self, directory: str | Path | None = None) -> Path | None:
        """Save the selected image as a PNG carrying its parameters (Result.save)."""
        item = self.selected
        if item is None:
            return None
        target = Path(directory if directory is not None else self.save_dir.value or ".")
        try:
            path = save_item(item, target)
        except Exception as e:  # shown in the widget: a bad folder is the user's to fix
            self.message.value = (
                f"<span class='sdkit-error' style='color:#c62828'>save failed: "
                f"{html.escape(str(e))}</span>"
            )
            return None
        self.message.value = (
            f"<span style='color:#2e7d32;font-size:12px'>saved {html.escape(str(path))}</span>"
        )
        return path


def infotext_html(text: str) -> str:
    """Infotext that wraps at commas, never inside a word.

    The "Key: value" pairs of the parameters line (the last) are unbreakable spans with a
    break opportunity after each comma; prompt lines wrap between words. The styles are
    inline because JupyterLab's output CSS breaks `pre` text anywhere (word-break: break-all).
    """
    lines = text.split("\n")
    out = [html.escape(line) for line in lines[:-1]]
    pairs = lines[-1].split(", ")
    kv = "<span class='sdkit-kv' style='white-space:nowrap'>{}</span>"
    if len(lines) == 1 and len(pairs) < 2:  # a prompt alone
        out.append(html.escape(lines[-1]))
    else:
        out.append(", <wbr>".join(kv.format(html.escape(p)) for p in pairs))
    style = (
        "white-space:pre-wrap;word-break:normal;overflow-wrap:normal;font-family:monospace;"
        "font-size:11px;line-height:1.35;margin:4px 0"
    )
    return f"<div class='sdkit-infotext' style='{style}'>" + "\n".join(out) + "</div>"


def save_item(item: GalleryItem, directory: Path) -> Path:
    """Save one image of a result through `Result.save` (PNG with its infotext)."""
    result = item.result
    if len(result.images) != 1:
        result = single_result(result, item.index)
    paths = result.save(directory)
    return Path(paths[0])


def single_result(result: Any, index: int) -> Any:
    """A Result holding only image `index` of `result` (same request, its own seed)."""
    return type(result)(
        images=[result.images[index]],
        seeds=[result.seeds[index]],
        request=result.request,
        timings=dict(result.timings),
    )
