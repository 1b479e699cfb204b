"""Controls for every `Request` field, grouped, with mode tabs and per-field error slots.

The tabs and the fields each tab shows come from the mode registry (`sdkit.modes`, or
the loaded engine's `info()["modes"]`), so a newly registered mode needs no edit here.
Validation is the engine's (`Engine.check`, the same rule `submit` applies); this module
only shows its `RequestError` next to the control that `err.field` names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ipywidgets as w

from sdkit import schedulers
from sdkit.request import FILLS, RESIZE_MODES, Request, RequestError

from . import morerows

ModeInfo = Mapping[str, Any]  # ModeSpec.describe(): name, title, fields, required, inputs
Check = Callable[[Request], Any]  # Engine.check: raises RequestError, as submit would

# Shown until a model tells us its own defaults (SD 1.x values at the embedded model's size).
FALLBACK_DEFAULTS = {
    "num_inference_steps": 25,
    "guidance_scale": 7.5,
    "width": 64,
    "height": 64,
    "scheduler": "PNDM",
    "clip_skip": 1,  # the last CLIP layer; the request says None
}

# Rows grouped under a heading; a group shows when the current mode uses one of its rows.
GROUPS = {
    "prompts": ("", ("prompt", "negative_prompt", "loras")),
    "sampling": (
        "Sampling",
        ("num_inference_steps", "guidance_scale", "scheduler", "seed", "clip_skip"),
    ),
    "size": ("Size & batch", ("width", "height", "num_images")),
    "image": ("Input image", ("strength", "resize_mode")),
    "inpaint": ("Inpaint", ("mask_blur", "grow", "only_masked", "padding", "fill")),
    **morerows.GROUPS,
}

_STYLE = {"description_width": "7.5em"}
_NUM = w.Layout(width="13.5em")


class RequestControls:
    """The parameter panel. `request()` reads it, `set_request()` fills it."""

    def __init__(
        self,
        defaults: Mapping[str, Any] | None = None,
        scheduler_names: Iterable[str] | None = None,
        modes: Iterable[ModeInfo] | None = None,
    ) -> None:
        self.defaults = {**FALLBACK_DEFAULTS, **(defaults or {})}
        self.size_multiple = 8  # what the engine's check demands of width and height
        self.scheduler_names = list(scheduler_names or schedulers.scheduler_names())
        self.check: Check | None = None  # the engine's; None: Request.validate (no model yet)
        self._listeners: list[Callable[[str], None]] = []
        self.shown_error: str | None = None  # the field whose error is on display
        self.modes: list[ModeInfo] = []
        d = self.defaults

        self.mode_tabs = w.Tab()
        self.prompt = w.Textarea(
            placeholder="a red circle on a blue background",
            description="Prompt",
            style=_STYLE,
            layout=w.Layout(width="100%", height="4.2em"),
        )
        self.negative_prompt = w.Textarea(
            placeholder="what to avoid",
            description="Negative",
            style=_STYLE,
            layout=w.Layout(width="100%", height="2.8em"),
        )
        self.num_inference_steps = w.IntText(
            d["num_inference_steps"], description="Steps", style=_STYLE, layout=_NUM
        )
        self.guidance_scale = w.FloatText(
            d["guidance_scale"], step=0.5, description="Guidance", style=_STYLE, layout=_NUM
        )
        self.width = w.IntText(d["width"], step=8, description="Width", style=_STYLE, layout=_NUM)
        self.height = w.IntText(
            d["height"], step=8, description="Height", style=_STYLE, layout=_NUM
        )
        self.seed = w.IntText(0, description="Seed", style=_STYLE, layout=_NUM)
        self.random_seed = w.Checkbox(
            True, description="random", indent=False, layout=w.Layout(width="5.5em")
        )
        self.reuse_seed = w.Button(
            description="reuse last",
            disabled=True,
            tooltip="Use the seed of the last result",
            layout=w.Layout(width="6.5em"),
        )
        self.scheduler = w.Dropdown(
            options=self.scheduler_names,
            description="Scheduler",
            style=_STYLE,
            layout=w.Layout(width="18em"),
        )
        self.num_images = w.IntText(1, description="Images", style=_STYLE, layout=_NUM)
        self.clip_skip = w.IntText(
            1,
            description="Clip skip",
            tooltip="1: the last CLIP layer (off); 2: the penultimate (SD 1.x only)",
            style=_STYLE,
            layout=_NUM,
        )
        self.strength = w.FloatSlider(
            0.75,
            min=0.0,
            max=1.0,
            step=0.01,
            description="Strength",
            style=_STYLE,
            layout=w.Layout(width="20em"),
        )
        self.resize_mode = w.Dropdown(
            options=RESIZE_MODES,
            value="resize",
            description="Resize",
            style=_STYLE,
            layout=w.Layout(width="16em"),
        )
        self.mask_blur = w.IntText(4, description="Mask blur", style=_STYLE, layout=_NUM)
        self.grow = w.IntText(0, description="Grow", style=_STYLE, layout=_NUM)
        self.only_masked = w.Checkbox(
            False, description="only masked", indent=False, layout=w.Layout(width="8em")
        )
        self.padding = w.IntText(32, description="Padding", style=_STYLE, layout=_NUM)
        self.fill = w.Dropdown(
            options=FILLS,
            value="original",
            description="Fill",
            style=_STYLE,
            layout=w.Layout(width="16em"),
        )
        self._set_scheduler(d.get("scheduler"))
        for name in morerows.FIELDS:  # LoRAs, hires fix, outpaint, upscale
            setattr(self, name, morerows.make(name))

        # One error slot per control (image/mask slots are placed by the studio, next to the
        # painter); "request" catches errors that name no control.
        names = [n for _, rows in GROUPS.values() for n in rows]
        names += ["image", "mask", "mode", "request"]
        self.errors: dict[str, w.HTML] = {n: _error_html() for n in names}
        e = self.errors

        self.seed.observe(lambda _: setattr(self.random_seed, "value", False), "value")

        def row(*items: w.Widget) -> w.HBox:
            return w.HBox(list(items), layout=w.Layout(align_items="center", flex_flow="row wrap"))

        self.rows: dict[str, w.Widget] = {
            "prompt": w.VBox([self.prompt, e["prompt"]], layout=w.Layout(width="100%")),
            "negative_prompt": w.VBox(
                [self.negative_prompt, e["negative_prompt"]], layout=w.Layout(width="100%")
            ),
            "num_inference_steps": row(self.num_inference_steps, e["num_inference_steps"]),
            "guidance_scale": row(self.guidance_scale, e["guidance_scale"]),
            "width": row(self.width, e["width"]),
            "height": row(self.height, e["height"]),
            "seed": row(self.seed, self.random_seed, self.reuse_seed, e["seed"]),
            "scheduler": row(self.scheduler, e["scheduler"]),
            "num_images": row(self.num_images, e["num_images"]),
            "clip_skip": row(self.clip_skip, e["clip_skip"]),
            "strength": row(self.strength, e["strength"]),
            "resize_mode": row(self.resize_mode, e["resize_mode"]),
            "mask_blur": row(self.mask_blur, e["mask_blur"]),
            "grow": row(self.grow, e["grow"]),
            "only_masked": row(
                w.HTML("<span style='display:inline-block;width:7.5em'></span>"),
                self.only_masked,
                e["only_masked"],
            ),
            "padding": row(self.padding, e["padding"]),
            "fill": row(self.fill, e["fill"]),
            **{n: row(getattr(self, n), e[n]) for n in morerows.FIELDS},
        }
        self.groups = {
            key: _group(title, [self.rows[n] for n in rows])
            for key, (title, rows) in GROUPS.items()
        }
        self.body = w.VBox(
            [*self.groups.values(), e["mode"], e["request"]], layout=w.Layout(width="100%")
        )
        self.mode_tabs.observe(self._on_tab, "selected_index")
        self.set_modes(modes if modes is not None else registered_modes())

        for name in self.rows:
            control = getattr(self, name)
            control.observe(lambda _, n=name: self._changed(n), "value")
        self.random_seed.observe(lambda _: self._changed("seed"), "value")

    # ----- mode ------------------------------------------------------------------------
    def set_modes(self, modes: Iterable[ModeInfo]) -> None:
        """One tab per mode (the registry's order); the current mode stays selected."""
        current = self.mode if self.modes else None
        self.modes = [dict(m) for m in modes]
        names = [m["name"] for m in self.modes]
        tabs = self.mode_tabs
        tabs.children = [w.VBox() for _ in self.modes]
        tabs.titles = tuple(str(m.get("title") or m["name"]) for m in self.modes)
        index = names.index(current) if current in names else 0
        if tabs.selected_index == index:
            self._on_tab(None)
        else:
            tabs.selected_index = index  # _on_tab runs

    @property
    def spec(self) -> ModeInfo:
        """The current mode's description (name, title, fields, required, inputs)."""
        return self.modes[self.mode_tabs.selected_index or 0]

    @property
    def mode(self) -> str:
        return str(self.spec["name"])

    @mode.setter
    def mode(self, mode: str) -> None:
        names = [m["name"] for m in self.modes]
        if mode not in names:
            raise RequestError("mode", f"unknown mode {mode!r}; allowed: {', '.join(names)}")
        self.mode_tabs.selected_index = names.index(mode)

    def _on_tab(self, _: Any) -> None:
        if not self.modes:
            return
        index = self.mode_tabs.selected_index or 0
        used = set(self.spec["fields"])
        for name, row in self.rows.items():
            row.layout.display = None if name in used else "none"
        for key, (_title, rows) in GROUPS.items():
            self.groups[key].layout.display = None if used & set(rows) else "none"
        for i, tab in enumerate(self.mode_tabs.children):
            tab.children = (self.body,) if i == index else ()
        self._changed("mode")

    # ----- reading and writing ---------------------------------------------------------
    def request(self, **overrides: Any) -> Request:
        """The Request the controls describe (fields the mode does not use keep defaults)."""
        values: dict[str, Any] = {"mode": self.mode}
        for name in self.spec["fields"]:
            if name not in self.rows:  # picture inputs (the painter's) or no control yet
                continue
            if name == "seed":
                values["seed"] = None if self.random_seed.value else self.seed.value
            elif name == "clip_skip":  # 1 is the default layer: the request says None
                values[name] = None if self.clip_skip.value == 1 else self.clip_skip.value
            elif name in morerows.FIELDS:
                values[name] = morerows.read(name, getattr(self, name))
            else:
                values[name] = getattr(self, name).value
        values.update(overrides)
        return Request(**values)

    def set_request(self, request: Request) -> None:
        """Fill the controls from a request; its `None` fields show the model's defaults."""
        self.mode = request.mode
        for name in self.rows:
            if name == "seed":
                continue
            value = getattr(request, name)
            if name in morerows.FIELDS:
                morerows.write(name, getattr(self, name), value)
                continue
            if value is None:
                value = self.defaults.get(name)
            if value is None:
                continue
            if name == "scheduler":
                self._set_scheduler(value)
            else:
                getattr(self, name).value = value
        if request.seed is None:
            self.random_seed.value = True
        else:
            self.seed.value = int(request.seed)
            self.random_seed.value = False

    def apply_model(self, info: Mapping[str, Any], check: Check) -> None:
        """A model was loaded (`Engine.info()`): its modes, defaults, scheduler names and
        size rule show; `check` (its `Engine.check`) judges every value from now on."""
        previous = self.defaults
        self.defaults = {
            **FALLBACK_DEFAULTS,
            **{k: v for k, v in info["defaults"].items() if v is not None},
        }
        self.size_multiple = max(1, int(info["size_multiple"]))
        self.check = check
        names = list(info["scheduler_names"]) or schedulers.scheduler_names()
        current = self.scheduler.value
        self.scheduler_names = names
        self.scheduler.options = names
        for name in ("num_inference_steps", "guidance_scale", "width", "height"):
            control = getattr(self, name)
            if control.value == previous.get(name):  # untouched: follow the model
                control.value = self.defaults[name]
        self.width.step = self.height.step = self.size_multiple
        untouched = current == previous.get("scheduler")
        self._set_scheduler((untouched and self.defaults.get("scheduler")) or current)
        self.set_modes(info["modes"])

    def _set_scheduler(self, name: str | None) -> None:
        if not name:
            return
        options = list(self.scheduler.options)
        chosen = next((o for o in options if o.lower() == name.lower()), None)
        if chosen is None:
            try:
                canon = schedulers.canonical_name(name)
                chosen = next((o for o in options if o.lower() == canon.lower()), None)
            except KeyError:
                chosen = None
        if chosen is None:  # keep what the user or PNG asked for, so validation names it
            self.scheduler.options = [*options, name]
            chosen = name
        self.scheduler.value = chosen

    # ----- errors ----------------------------------------------------------------------
    def show_error(self, err: RequestError | None) -> None:
        """Show `err` next to its control (or in the general slot); None clears all."""
        for slot in self.errors.values():
            slot.value = ""
        self.shown_error = None
        if err is None:
            return
        base = err.field.split("[")[0].split(".")[0]  # loras[1].weight -> the loras row
        slot = self.errors.get(err.field if err.field in self.errors else base)
        slot = slot if slot is not None else self.errors["request"]
        slot.value = _error_text(str(err))
        self.shown_error = err.field

    def validate(self, request: Request) -> RequestError | None:
        """The loaded engine's verdict on `request` (what submit would say), or None.

        Before a model is loaded only the model-independent rules apply.
        """
        try:
            if self.check is not None:
                self.check(request)
            else:
                request.validate(scheduler_names=self.scheduler_names)
        except RequestError as err:
            return err
        return None

    def on_change(self, fn: Callable[[str], None]) -> None:
        """Call ``fn(field)`` whenever a control changes."""
        self._listeners.append(fn)

    def _changed(self, field: str) -> None:
        for fn in self._listeners:
            fn(field)


def registered_modes() -> list[ModeInfo]:
    """Every mode the registry knows (shown until an engine says which it serves)."""
    from sdkit import modes

    return [spec.describe() for spec in modes.registered()]


def _group(title: str, rows: list[w.Widget]) -> w.VBox:
    if not title:
        return w.VBox(rows)
    head = w.HTML(
        f"<b style='font-size:12px;color:#666;text-transform:uppercase;"
        f"letter-spacing:.05em'>{title}</b>"
    )
    return w.VBox([head, *rows], layout=w.Layout(margin="4px 0 0 0"))


def _error_html() -> w.HTML:
    return w.HTML("", layout=w.Layout(margin="0 0 0 6px"))


def _error_text(message: str) -> str:
    import html

    return (
        f"<span class='sdkit-error' style='color:#c62828;font-size:12px'>"
        f"{html.escape(message)}</span>"
    )
