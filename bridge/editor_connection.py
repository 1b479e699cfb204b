"""The plug-ins' link to a server: connect, greet, and learn its modes, sizes and limits.

Standard library only (plus the bundled ``protocol``, ``tracker`` and ``zmtp``), because
it runs inside the editors' own Pythons. The modes an editor offers, their titles, the
fields they read and the pictures they take come from the server's ``hello`` reply, never
from sdkit; so do the size multiple and the limits. A server whose ``hello`` lists bare
mode names (or none) gets today's three modes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

try:  # as part of sdkit.bridge, or copied next to a plug-in package
    from . import editor_geometry as geo
    from . import protocol, tracker, zmtp
except ImportError:  # copied next to a plug-in script (GIMP): top-level modules
    import editor_geometry as geo  # type: ignore[no-redef]
    import protocol  # type: ignore[no-redef]
    import tracker  # type: ignore[no-redef]
    import zmtp  # type: ignore[no-redef]

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"  # sdkit.bridge.server.DEFAULT_BIND
HELLO_TIMEOUT = 5.0
CLIENT_NAME = "sdkit-editor"
PICTURE_INPUTS = ("image", "mask")  # what an editor can read from a canvas


@dataclass(frozen=True)
class ModeInfo:
    """One generation mode as the server describes it (``hello``'s ``modes``)."""

    name: str
    title: str
    fields: tuple[str, ...]  # Request fields the mode reads
    required: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # () | ("image",) | ("image", "mask")

    @property
    def needs_selection(self) -> bool:
        return "mask" in self.inputs


_COMMON = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed")
_SIZED = (*_COMMON, "width", "height")
FALLBACK_MODES = (
    ModeInfo("txt2img", "Generate", _SIZED, ("prompt",)),
    ModeInfo("img2img", "Img2img selection", (*_SIZED, "strength"), ("image",), ("image",)),
    ModeInfo(
        "inpaint", "Inpaint selection", (*_SIZED, "strength"), ("image", "mask"), PICTURE_INPUTS
    ),
)
"""For a server whose ``hello`` does not describe its modes (bare names, or no list)."""


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def modes_from_hello(info: Mapping) -> tuple[ModeInfo, ...]:
    """The modes a server offers that an editor can run (inputs it can read from a canvas)."""
    raw = info.get("modes")
    if not isinstance(raw, list):
        return FALLBACK_MODES
    known = {m.name: m for m in FALLBACK_MODES}
    out = []
    for item in raw:
        if isinstance(item, str) and item in known:
            out.append(known[item])
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            inputs = _names(item.get("inputs"))
            if set(inputs) <= set(PICTURE_INPUTS):
                title = item.get("title")
                out.append(
                    ModeInfo(
                        item["name"],
                        title if isinstance(title, str) and title else item["name"],
                        _names(item.get("fields")),
                        _names(item.get("required")),
                        inputs,
                    )
                )
    return tuple(out)


class Connection:
    """The plug-in's link to a server: a stdlib ZMTP socket, a Session and the hello reply.

    Never blocks longer than asked, so Krita can pump it from a QTimer; GIMP, which
    runs a plug-in as a process of its own, may simply call ``wait_ready``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        client: str = CLIENT_NAME,
        hello_timeout: float = HELLO_TIMEOUT,
    ):
        self.address = address
        self.client = client
        self.hello_timeout = hello_timeout
        self.session: tracker.Session | None = None
        self.state = "disconnected"  # connecting | connected | failed
        self.error: str | None = None
        self._hello: str | None = None
        self._deadline = 0.0
        self._epoch = 0

    # -- lifecycle
    def open(self) -> None:
        """Start connecting (non-blocking); ``poll`` finishes the handshake."""
        self.close()
        try:
            transport = zmtp.Dealer(self.address)
        except (OSError, ValueError) as e:
            self._fail(f"cannot connect to {self.address}: {e}")
            return
        self.session = tracker.Session(transport, client=self.client)
        self._send_hello()

    def _send_hello(self) -> None:
        session = self.session
        if session is None:
            return
        self.state, self.error = "connecting", None
        if self._hello is not None:
            session.pending.pop(self._hello, None)
        try:
            self._hello = session.hello()
        except (OSError, ValueError) as e:
            self._fail(f"cannot reach the sdkit server at {self.address}: {e}")
            return
        self._deadline = time.monotonic() + self.hello_timeout

    def _fail(self, message: str) -> None:
        self.state, self.error, self._hello = "failed", message, None

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.close()
            except OSError:
                pass
        self.session, self._hello = None, None
        self.state = "disconnected"

    # -- pumping
    def poll(self, timeout: float = 0.0) -> list[protocol.Event]:
        """Events for the plug-in's requests; the hello exchange is handled here."""
        if self.session is None:
            return []
        try:
            events = self.session.poll(timeout)
        except OSError as e:
            self._fail(f"lost the connection to {self.address}: {e}")
            return []
        transport = self.session.transport
        if self.state == "connected" and transport.epoch != self._epoch:
            # The server went away (or restarted) while we were idle: greet it again, so a
            # dead server shows up as such instead of swallowing the next request.
            self._send_hello()
        out = []
        for ev in events:
            if self._hello is not None and ev.id == self._hello:
                self._on_hello(ev)
            elif ev.event == "error" and ev.code == "connection_lost":
                out.append(ev)  # the request is lost with the connection; say so, reconnect
                self._send_hello()
            else:
                out.append(ev)
        if self.state == "connecting" and time.monotonic() > self._deadline:
            reason = getattr(transport, "last_error", None)
            self._fail(
                f"no sdkit server answers at {self.address}"
                + (f" ({reason})" if reason else "")
                + ": start one with `sdkit serve` (or serve the engine from a notebook), "
                "then reconnect"
            )
        return out

    def _on_hello(self, ev: protocol.Event) -> None:
        self._hello = None
        if ev.event == "error":
            self._fail(f"the server refused the connection: {ev.message} ({ev.code})")
            return
        if self.session is not None:
            self._epoch = self.session.transport.epoch
        self.state = "connected"

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until connected; raise EditorError with the reason otherwise (GIMP, tests)."""
        if self.session is None and self.state != "failed":
            self.open()
        end = time.monotonic() + (self.hello_timeout + 1 if timeout is None else timeout)
        while self.state == "connecting" and time.monotonic() < end:
            self.poll(0.05)
        if self.state != "connected":
            raise geo.EditorError(self.error or f"could not connect to {self.address}")

    # -- what the server said
    @property
    def info(self) -> dict:
        return self.session.info if self.session is not None else {}

    @property
    def model(self) -> dict:
        model = self.info.get("model")
        return model if isinstance(model, dict) else {}

    @property
    def limits(self) -> protocol.Limits:
        limits = self.session.limits if self.session is not None else None
        return limits or protocol.Limits()

    @property
    def modes(self) -> tuple[ModeInfo, ...]:
        return modes_from_hello(self.info) if self.state == "connected" else FALLBACK_MODES

    def mode(self, name: str) -> ModeInfo:
        """The server's description of mode ``name``; EditorError if it does not offer it."""
        for m in self.modes:
            if m.name == name:
                return m
        offered = ", ".join(m.name for m in self.modes) or "none an editor can use"
        raise geo.EditorError(f"the server does not offer {name!r} (it offers: {offered})")

    @property
    def size_multiple(self) -> int:
        for v in (self.info.get("size_multiple"), self.model.get("size_multiple")):
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return geo.DEFAULT_MULTIPLE

    def field_range(self, name: str) -> tuple[float, float] | None:
        """``[lo, hi]`` of a Request field from the hello's ``ranges``, if the server gives it."""
        ranges = self.info.get("ranges") or self.model.get("ranges") or {}
        value = ranges.get(name) if isinstance(ranges, dict) else None
        if isinstance(value, list) and len(value) == 2:
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return value[0], value[1]
        return None

    def adapters(self, kind: str) -> list[str]:
        """Names of the server's ``loras``, ``embeddings`` or ``controls`` (``hello``'s lists;
        [] for a server that has none or predates them). Names only: a request names them."""
        value = self.info.get(kind) if self.state == "connected" else None
        return list(_names(value))

    def default_size(self) -> tuple[int, int]:
        defaults = self.model.get("defaults") or {}
        return int(defaults.get("width") or 512), int(defaults.get("height") or 512)

    def model_text(self) -> str:
        model = self.info.get("model") or {}
        if isinstance(model, dict):
            name = model.get("name") or model.get("spec") or "?"
            defaults = model.get("defaults") or {}
            size = f" {defaults.get('width')}x{defaults.get('height')}" if defaults else ""
            return f"{name} ({model.get('family', '?')}{size}, {model.get('device', '?')})"
        return str(model)

    def status_text(self) -> str:
        if self.state == "connected":
            return f"connected to {self.address}"
        if self.state == "connecting":
            return f"connecting to {self.address}…"
        if self.state == "failed":
            return self.error or "not connected"
        return "not connected"
