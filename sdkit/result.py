"""`Result`: the images of one job with their seeds, the request, timings, and saving."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import overload

from PIL import Image, PngImagePlugin

from sdkit.request import Request


class Result(Sequence[Image.Image]):
    """A sequence of PIL images; image i was made with `seeds[i]` (request seed + i)."""

    def __init__(
        self,
        images: list[Image.Image],
        seeds: list[int],
        request: Request,
        timings: dict[str, float] | None = None,
    ):
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        self.images = list(images)
        self.seeds = list(seeds)
        self.request = request
        self.timings = dict(timings or {})
        self.infotexts = [request.to_infotext(seed=s) for s in self.seeds]
        for image, text in zip(self.images, self.infotexts, strict=True):
            image.info["parameters"] = text  # so image.save(..., pnginfo=...) is not needed

    @overload
    def __getitem__(self, i: int) -> Image.Image: ...
    @overload
    def __getitem__(self, i: slice) -> list[Image.Image]: ...
    def __getitem__(self, i):
        return self.images[i]

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        size = f"{self.images[0].width}x{self.images[0].height}" if self.images else "-"
        total = self.timings.get("total")
        took = f", {total:.2f} s" if total is not None else ""
        return f"<sdkit.Result {self.request.mode} {len(self)} x {size}, seeds {self.seeds}{took}>"

    def save(self, path: str | Path = ".") -> list[Path]:
        """Write PNGs carrying the A1111 `parameters` text chunk; returns their paths.

        A directory (existing, or a path without a .png suffix) gets `sdkit-<seed>-<n>.png`
        files; a `.png` path is used as is for one image, and gets `-<n>` before the
        suffix for several.
        """
        target = Path(path).expanduser()
        if target.suffix.lower() == ".png" and not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            if len(self) == 1:
                paths = [target]
            else:
                paths = [
                    target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(len(self))
                ]
        else:
            target.mkdir(parents=True, exist_ok=True)
            paths = [self._free_name(target, seed) for seed in self.seeds]
        for image, text, p in zip(self.images, self.infotexts, paths, strict=True):
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", text)
            image.save(p, format="PNG", pnginfo=info)
        return paths

    @staticmethod
    def _free_name(folder: Path, seed: int) -> Path:
        for n in range(100_000):
            p = folder / f"sdkit-{seed}-{n}.png"
            if not p.exists():
                return p
        raise FileExistsError(f"{folder}: no free file name for seed {seed}")

    def grid(self, columns: int | None = None) -> Image.Image:
        """All images in one picture, row-major."""
        if not self.images:
            return Image.new("RGB", (1, 1))
        cols = columns or min(len(self), 4)
        rows = -(-len(self) // cols)
        w = max(im.width for im in self.images)
        h = max(im.height for im in self.images)
        sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
        for i, im in enumerate(self.images):
            sheet.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
        return sheet

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.grid().save(buf, format="PNG")
        return buf.getvalue()

    def _repr_html_(self) -> str:
        cells = []
        for image, seed in zip(self.images, self.seeds, strict=True):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            width = max(128, min(image.width, 512))
            cells.append(
                f'<figure style="margin:4px;display:inline-block;text-align:center">'
                f'<img src="data:image/png;base64,{data}" width="{width}" '
                f'style="image-rendering:pixelated" title="seed {seed}"/>'
                f"<figcaption>seed {seed}</figcaption></figure>"
            )
        prompt = html.escape(self.request.prompt or f"({self.request.mode})")
        return f'<div><div style="font-family:monospace">{prompt}</div>{"".join(cells)}</div>'
