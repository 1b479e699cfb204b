"""What a job shows while it runs: Generate/Cancel, the progress bar, the status line, the preview.

Called on the widget's own event thread (`follow.JobFollower`), never the engine's. The
status line remembers the field error it names, so the studio can clear it once that
field is fixed. Also the studio's CSS, its upload buttons and its small HTML helpers.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w

from sdkit.jobs import EventKind
from sdkit.request import RequestError

from .gallery import png_bytes

CSS = """
<style>
.sdkit-studio { border: 1px solid #ddd; border-radius: 6px; padding: 8px; max-width: 960px; }
.sdkit-studio .widget-textarea textarea { font-family: inherit; }
.sdkit-studio img { image-rendering: pixelated; }
/* FileUpload writes "label (count)" as its text; show the label alone (kept in the title) */
.sdkit-studio .jupyter-button.sdkit-upload { font-size: 0; width: auto; }
.sdkit-studio .sdkit-upload > i { font-size: var(--jp-widgets-font-size, 13px); margin-right: 6px; }
.sdkit-studio .sdkit-upload::after {
  content: attr(title); font-size: var(--jp-widgets-font-size, 13px);
}
/* mode tabs as wide as their titles (the registry's), not a fixed 144px cut short; more
   modes than fit wrap onto a second row instead of shrinking their titles */
.sdkit-studio .jupyter-widgets.jupyter-widget-tab > .lm-TabBar .lm-TabBar-tab { flex: 0 0 auto; }
.sdkit-studio .jupyter-widgets.jupyter-widget-tab > .lm-TabBar .lm-TabBar-content {
  flex-wrap: wrap;
}
.sdkit-studio .jupyter-widgets.jupyter-widget-tab > .lm-TabBar { height: auto; min-height: 0; }
</style>
"""


def upload_button(label: str, accept: str, icon: str) -> w.FileUpload:
    """A FileUpload showing `label` alone: ipywidgets writes "label (count)" as the button's
    text, which the CSS hides, showing the title (= `label`) instead."""
    button = w.FileUpload(
        accept=accept, multiple=False, description=label, tooltip=label, icon=icon
    )
    button.add_class("sdkit-upload")
    return button


class RunPanel:
    """The run row and the preview; `errors` lists every error the status line showed."""

    def __init__(self) -> None:
        self.generate_button = w.Button(
            description="Generate",
            button_style="primary",
            icon="play",
            layout=w.Layout(width="8em"),
        )
        self.cancel_button = w.Button(
            description="Cancel", icon="stop", disabled=True, layout=w.Layout(width="7em")
        )
        self.progress = w.IntProgress(0, min=0, max=1, layout=w.Layout(width="14em"))
        self.status = w.HTML()
        self.preview = w.Image(
            format="png",
            layout=w.Layout(
                width="128px", height="128px", object_fit="contain", border="1px solid #eee"
            ),
        )
        self.errors: list[str] = []
        self.status_error: RequestError | None = None  # the field error the status names
        self.row = w.HBox(
            [self.generate_button, self.cancel_button, self.progress, self.status],
            layout=w.Layout(align_items="center", flex_flow="row wrap"),
        )
        for widget, name in (
            (self.generate_button, "sdkit-generate"),
            (self.cancel_button, "sdkit-cancel"),
            (self.status, "sdkit-status"),
        ):
            widget.add_class(name)  # stable hooks for styling and the browser test

    def set_status(self, text: str, *, error: bool | RequestError = False) -> None:
        """Show `text`; `error` a RequestError: the studio clears it once that field is fixed."""
        if error:
            self.errors.append(text)
        self.status_error = error if isinstance(error, RequestError) else None
        self.status.value = err_html(text) if error else info_html(text) if text else ""

    def reset(self, job: Any) -> None:
        """A job starts: an empty bar sized by its steps (progress events correct the total)."""
        self.progress.value = 0
        self.progress.max = max(1, int(job.request.num_inference_steps or 1))
        self.progress.bar_style = "info"

    def show(self, kind: EventKind, job: Any, event: Any, ours: bool) -> None:
        """Every event but "done" (the studio shows results: gallery, saving)."""
        who = "" if ours else " (submitted elsewhere)"
        if kind == EventKind.QUEUED:
            if not ours:
                self.set_status(f"job queued{who}")
        elif kind == EventKind.STARTED:
            self.reset(job)
            self.set_status(f"{job.request.mode} started{who}")
        elif kind == EventKind.PROGRESS and event is not None:
            self.progress.max = max(1, event.total)
            self.progress.value = event.step
            per_step = event.elapsed / max(1, event.step)
            self.set_status(
                f"step {event.step}/{event.total} · {per_step:.3f} s/step · "
                f"{event.elapsed:.1f} s{who}"
            )
            if event.preview is not None:
                self.preview.value = png_bytes(event.preview)
        elif kind == EventKind.CANCELLED:
            self.progress.bar_style = "warning"
            step = job.progress.step if job.progress is not None else 0
            self.set_status(f"cancelled at step {step}/{self.progress.max}{who}")
        elif kind == EventKind.FAILED:
            self.progress.bar_style = "danger"
            err = job.error
            field_error = err if isinstance(err, RequestError) and ours else None
            self.set_status(f"failed{who}: {err}", error=field_error or True)

    def done(self, result: Any, note: str, ours: bool) -> None:
        """A finished result: full bar, its first image, timings (and `note`, e.g. where
        it was saved)."""
        self.progress.value = self.progress.max
        self.progress.bar_style = "success"
        if result.images:
            self.preview.value = png_bytes(result.images[0])
        t = result.timings
        self.set_status(
            f"done: {len(result.images)} image(s) · "
            f"{t.get('per_step', 0.0):.3f} s/step · "
            f"{t.get('total', 0.0):.2f} s total{note}{'' if ours else ' (submitted elsewhere)'}"
        )


def info_html(text: str) -> str:
    return f"<span style='font-size:12px;color:#444'>{html.escape(text)}</span>"


def ok_html(text: str) -> str:
    """`text` is HTML already (the caller escapes what needs it)."""
    return f"<span style='font-size:12px;color:#2e7d32'>{text}</span>"


def err_html(text: str) -> str:
    return (
        f"<span class='sdkit-error' style='font-size:12px;color:#c62828'>{html.escape(text)}</span>"
    )
