"""LoRAs and textual-inversion embeddings in a live pipeline, one job at a time.

An engine's pipelines share their UNet and text encoders (`from_pipe`), so adapters are
loaded once into the base pipeline and every mode sees them. LoRAs are loaded with
diffusers' own loader (peft; diffusers converts kohya files itself) under an adapter name
of their own and stay loaded (at most `max_loaded`, least recently used evicted), so a
second job with the same LoRA neither rereads nor re-injects it; each job sets its own
adapters and weights (`set_adapters`), and afterwards the LoRA layers are disabled, which
makes peft compute exactly the base layers: a job without LoRA after one with LoRA is
bit-identical to a fresh engine. A load that fails part-way is undone (its adapter deleted
from every component) and reported as a `RequestError` naming the file.

Embeddings (A1111's rule: a prompt word equal to the file name triggers it) are added to
the tokenizer with diffusers' `load_textual_inversion` the first time a prompt uses them
and stay: a prompt without the word tokenizes and encodes exactly as before.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkit.adapters import file_key, read_embedding, safetensors_header
from sdkit.models import quiet_loading
from sdkit.request import RequestError

_ADAPTER_IDS = itertools.count(1)  # adapter names unique in the process (peft keys)


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a job: its name as the user wrote it, file, weight, and the field that
    named it (for errors)."""

    name: str
    path: Path
    weight: float
    field: str = "loras"


@dataclass(frozen=True)
class EmbeddingUse:
    name: str
    path: Path
    field: str = "prompt"


class AdapterState:
    """The adapters loaded into one engine's base pipeline. Used on the engine's worker only."""

    def __init__(self, *, max_loaded: int = 8, max_cached_bytes: int = 1 << 30) -> None:
        self.max_loaded = max_loaded
        self.max_cached_bytes = max_cached_bytes
        self._files: OrderedDict[tuple, dict] = OrderedDict()  # file key -> state dict
        self._loaded: OrderedDict[tuple, str] = OrderedDict()  # file key -> adapter name
        self._embeddings: dict[str, tuple[tuple, int]] = {}  # token -> (file key, vectors)
        self._lock = threading.Lock()
        self.file_reads = 0  # LoRA files read from disk (tests, the benchmark)
        self.injections = 0  # load_lora_weights calls

    @property
    def loaded(self) -> list[str]:
        """Adapter names loaded now (least recently used first)."""
        return list(self._loaded.values())

    @contextlib.contextmanager
    def applied(
        self, pipe: Any, loras: list[LoraUse], embeddings: list[EmbeddingUse]
    ) -> Iterator[None]:
        """`pipe` with this job's embeddings loaded and exactly its LoRAs active at their
        weights; on exit every LoRA layer is disabled again (base behaviour)."""
        with self._lock:
            with quiet_loading():  # diffusers' and transformers' loading chatter
                for emb in embeddings:
                    self._ensure_embedding(pipe, emb)
                names = [self._ensure_lora(pipe, use, keep=loras) for use in loras]
                self._evict(pipe, loras)
            try:
                if names:
                    _set_enabled(pipe, True)
                    pipe.set_adapters(names, [use.weight for use in loras])
                yield
            finally:
                if self.injections:
                    _set_enabled(pipe, False)

    # ------------------------------------------------------------------ LoRA

    def _read(self, use: LoraUse, key: tuple) -> dict:
        sd = self._files.get(key)
        if sd is not None:
            self._files.move_to_end(key)
            return sd
        from safetensors.torch import load_file

        try:
            safetensors_header(use.path)
            sd = load_file(str(use.path))
        except Exception as err:  # noqa: BLE001 - any unreadable file is the request's fault
            raise RequestError(
                use.field, f"LoRA {use.name!r}: cannot read {use.path} ({err})"
            ) from err
        self.file_reads += 1
        self._files[key] = sd
        total = sum(_nbytes(d) for d in self._files.values())
        while total > self.max_cached_bytes and len(self._files) > 1:
            _, old = self._files.popitem(last=False)
            total -= _nbytes(old)
        return sd

    def _ensure_lora(self, pipe: Any, use: LoraUse, keep: list[LoraUse]) -> str:
        key = file_key(use.path)
        adapter = self._loaded.get(key)
        if adapter is not None:
            self._loaded.move_to_end(key)
            return adapter
        sd = self._read(use, key)
        self._evict(pipe, keep, room=1)
        adapter = f"{re.sub(r'[^0-9A-Za-z_]', '_', use.name)}_{next(_ADAPTER_IDS)}"
        try:
            with warnings.catch_warnings():  # peft: "multiple adapters" is what we want
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                pipe.load_lora_weights(dict(sd), adapter_name=adapter)
        except Exception as err:  # noqa: BLE001 - undo the partial load, then report it
            _delete_adapter(pipe, adapter)
            _set_enabled(pipe, False)
            raise RequestError(
                use.field, f"LoRA {use.name!r}: {use.path} cannot be loaded into this model ({err})"
            ) from err
        self.injections += 1
        self._loaded[key] = adapter
        return adapter

    def _evict(self, pipe: Any, keep: list[LoraUse], room: int = 0) -> None:
        """Delete least recently used adapters (not in `keep`) until `room` more fit."""
        keep_keys = {file_key(u.path) for u in keep}
        while len(self._loaded) + room > self.max_loaded:
            old = next((k for k in self._loaded if k not in keep_keys), None)
            if old is None:
                break
            _delete_adapter(pipe, self._loaded.pop(old))

    # ------------------------------------------------------------------ embeddings

    def _ensure_embedding(self, pipe: Any, use: EmbeddingUse) -> None:
        key = file_key(use.path)
        have = self._embeddings.get(use.name)
        if have is not None and have[0] == key:
            return
        if have is not None:  # the file changed since it was loaded
            n = have[1]
            tokens = [use.name, *(f"{use.name}_{i}" for i in range(1, n))]
            pipe.unload_textual_inversion(tokens)
            del self._embeddings[use.name]
        try:
            data = read_embedding(use.path)
            if "vectors" in data:
                pipe.load_textual_inversion(data["vectors"], token=use.name)
                n = len(data["vectors"])
            else:
                pipe.load_textual_inversion(
                    data["clip_l"],
                    token=use.name,
                    text_encoder=pipe.text_encoder,
                    tokenizer=pipe.tokenizer,
                )
                pipe.load_textual_inversion(
                    data["clip_g"],
                    token=use.name,
                    text_encoder=pipe.text_encoder_2,
                    tokenizer=pipe.tokenizer_2,
                )
                n = len(data["clip_l"])
        except Exception as err:  # noqa: BLE001 - reported as the request's fault
            raise RequestError(
                use.field, f"embedding {use.name!r}: {use.path} cannot be loaded ({err})"
            ) from err
        self._embeddings[use.name] = (key, n)


def _nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _tuner_layers(pipe: Any) -> Iterator[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name in _COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None:
            yield from (m for m in component.modules() if isinstance(m, BaseTunerLayer))


def _set_enabled(pipe: Any, enabled: bool) -> None:
    """Switch every LoRA layer of `pipe` on or off (off: peft runs the base layer alone)."""
    for layer in _tuner_layers(pipe):
        layer.enable_adapters(enabled)


def _delete_adapter(pipe: Any, adapter: str) -> None:
    """Remove `adapter` from every layer and component config that holds it (also after a
    load that failed part-way, e.g. in the text encoder after the UNet took it)."""
    with warnings.catch_warnings():  # peft: "was active ... setting active adapter to"
        warnings.simplefilter("ignore", UserWarning)
        for layer in _tuner_layers(pipe):
            if adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_B", {}):
                layer.delete_adapter(adapter)
    for name in _COMPONENTS:
        config = getattr(getattr(pipe, name, None), "peft_config", None)
        if isinstance(config, dict):
            config.pop(adapter, None)
