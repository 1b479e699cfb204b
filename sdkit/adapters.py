"""Adapter files by name: the folders an engine searches, A1111's short hashes, and what
a LoRA or embedding file holds (read without loading it into a model).

Users name adapters as A1111 users do (`<lora:NAME:0.8>`, a prompt word equal to an
embedding's file name); the engine must find the file, refuse one that cannot work on its
model before a job starts, and write the hashes A1111 writes into the PNG. Loading into a
pipeline is `sdkit.adapter_loading`'s job; this module never touches a model.

Folders per kind ("lora", "embedding", "control"), searched in this order (first hit wins):
the ones passed to the engine (`lora_dirs=` ...), the environment (`SDKIT_LORA_DIRS`,
`SDKIT_EMBEDDING_DIRS`, `SDKIT_CONTROL_DIRS`, `os.pathsep`-separated), `loras/`,
`embeddings/`, `controlnet/` inside a local model folder and next to a local model (folder
or file), and for the embedded model its shipped examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkit.request import RequestError

KINDS = ("lora", "embedding", "control")
ENV = {
    "lora": "SDKIT_LORA_DIRS",
    "embedding": "SDKIT_EMBEDDING_DIRS",
    "control": "SDKIT_CONTROL_DIRS",
}
SUBFOLDER = {"lora": "loras", "embedding": "embeddings", "control": "controlnet"}
SUFFIXES = {
    "lora": (".safetensors",),
    "embedding": (".pt", ".safetensors", ".bin"),
    "control": (".safetensors", ".pth"),
}
_EMBEDDED = Path(__file__).resolve().parent / "embedded"
# The shipped examples share one folder, so each kind takes only its own file type there.
SHIPPED: dict[str, list[tuple[Path, tuple[str, ...]]]] = {
    "lora": [(_EMBEDDED / "adapters", (".safetensors",))],
    "embedding": [(_EMBEDDED / "adapters", (".pt",))],
    "control": [(_EMBEDDED / "control", SUFFIXES["control"])],
}
# Cross-attention width -> family, for LoRA files (the width their attn2 to_k/to_v read).
_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class Folder:
    path: Path
    suffixes: tuple[str, ...]


class AdapterFolders:
    """The folders an engine searches, per kind; listings are read fresh on every call (a
    file dropped into a folder is found without a restart)."""

    def __init__(
        self,
        *,
        lora_dirs: Iterable[str | Path] | None = None,
        embedding_dirs: Iterable[str | Path] | None = None,
        control_dirs: Iterable[str | Path] | None = None,
        model_path: str | Path | None = None,
        embedded: bool = False,
        environ: dict[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        given: dict[str, Iterable[str | Path] | None] = {
            "lora": lora_dirs,
            "embedding": embedding_dirs,
            "control": control_dirs,
        }
        local = Path(model_path) if model_path is not None else None
        self._folders: dict[str, list[Folder]] = {}
        for kind in KINDS:
            paths: list[Path] = [Path(p).expanduser() for p in given[kind] or ()]
            paths += [Path(p).expanduser() for p in env.get(ENV[kind], "").split(os.pathsep) if p]
            if local is not None:
                if local.is_dir():
                    paths.append(local / SUBFOLDER[kind])
                paths.append(local.parent / SUBFOLDER[kind])
            folders = [Folder(p.resolve(), SUFFIXES[kind]) for p in paths]
            if embedded:
                folders += [Folder(p, s) for p, s in SHIPPED[kind]]
            self._folders[kind] = list(dict.fromkeys(folders))  # in order, each once

    def folders(self, kind: str) -> list[Path]:
        """The folders searched for `kind`, in order (existing or not)."""
        return [f.path for f in self._check_kind(kind)]

    def names(self, kind: str) -> list[str]:
        """File stems (control: also model folders) found for `kind`, sorted, no duplicates."""
        return sorted(self._entries(kind))

    def find(self, kind: str, name: str, *, field: str | None = None) -> Path:
        """The file (or control model folder) named `name`; a `RequestError` naming the item
        and every folder searched when there is none."""
        entries = self._entries(kind)
        if name in entries:
            return entries[name]
        searched = ", ".join(str(p) for p in self.folders(kind)) or "(none)"
        what = {"lora": "LoRA", "embedding": "embedding", "control": "ControlNet model"}[kind]
        raise RequestError(
            field or {"lora": "loras", "embedding": "prompt", "control": "control"}[kind],
            f"{what} {name!r} not found; searched: {searched}",
        )

    def _check_kind(self, kind: str) -> list[Folder]:
        if kind not in self._folders:
            raise ValueError(f"unknown adapter kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self._folders[kind]

    def _entries(self, kind: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for folder in self._check_kind(kind):
            try:
                children = sorted(folder.path.iterdir())
            except OSError:
                continue
            for child in children:
                if child.name.startswith("."):
                    continue
                if child.is_file() and child.suffix.lower() in folder.suffixes:
                    out.setdefault(child.stem, child)
                elif kind == "control" and (child / "config.json").is_file():
                    out.setdefault(child.name, child)
        return out


# ---------------------------------------------------------------------------- hashes


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a `.safetensors` file, checked against the file's size (a
    truncated or non-safetensors file raises ValueError)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 1024 * 1024):
            raise ValueError("header length beyond the end of the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            shape = info["shape"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {key!r} has no shape/offsets") from None
        if not (0 <= start <= stop) or not isinstance(shape, list):
            raise ValueError(f"tensor {key!r}: bad offsets")
        end = max(end, stop)
    if 8 + n + end > size:
        raise ValueError(f"truncated: data ends at byte {8 + n + end}, file has {size}")
    return header


_hash_cache: dict[tuple, str] = {}
_hash_lock = threading.Lock()


def file_key(path: Path) -> tuple:
    """(path, mtime, size): what caches of this file's contents are keyed by."""
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def short_hash(path: str | Path, kind: str) -> str:
    """A1111's 12-hex short hash: a `.safetensors` LoRA hashes the bytes after its header
    (sd-webui-additional-networks' "addnet" hash, which A1111 uses for LoRAs so that
    editing the metadata keeps the hash); other files hash every byte (sha256)."""
    path = Path(path)
    key = (*file_key(path), kind)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if kind == "lora" and path.suffix.lower() == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()[:12]
    with _hash_lock:
        _hash_cache[key] = value
    return value


def parse_hashes(text: str) -> dict[str, str]:
    """A1111's `Lora hashes` / `TI hashes` value ("name: hash, name2: hash") as a dict."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition(":")
        if sep and name.strip():
            out[name.strip()] = value.strip().lower()
    return out


def format_hashes(pairs: Sequence[tuple[str, str]]) -> str:
    """The value A1111 writes: names without ':' and ',', "name: hash" joined by ", "."""
    return ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in pairs)


# ------------------------------------------------------------------------ LoRA files


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file's keys say: its family (None: not known) and cross-attention width."""

    family: str | None
    width: int | None


def _is_lora_key(key: str) -> bool:
    return any(
        m in key
        for m in ("lora_down", "lora_A", "lora.down", "lora_linear_layer", "lora_B", "lora_up")
    )


def lora_info(path: Path) -> LoraInfo:
    """Family and cross-attention width from a LoRA file's header (kohya, diffusers, PEFT);
    ValueError for a file that is not a readable LoRA."""
    header = safetensors_header(path)
    keys = [k for k in header if k != "__metadata__"]
    if not any(_is_lora_key(k) for k in keys):
        raise ValueError("not a LoRA (no lora_down/lora_A weights)")
    width = None
    for key in keys:
        flat = key.replace(".", "_")
        if "attn2" in flat and ("to_k" in flat or "to_v" in flat) and _is_down(key):
            shape = header[key]["shape"]
            if len(shape) == 2:
                width = int(shape[1])
                break
    sdxl = any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "te2.")) for k in keys)
    family = "sdxl" if sdxl else _WIDTH_FAMILY.get(width) if width is not None else None
    return LoraInfo(family, width)


def _is_down(key: str) -> bool:
    return any(m in key for m in ("lora_down", "lora_A", "lora.down", ".down."))


def family_name(family: str | None, width: int | None = None) -> str:
    if family is not None:
        return FAMILY_NAMES.get(family, family)
    return f"a model with cross-attention width {width}"


# ---------------------------------------------------------------------- embeddings


def read_embedding(path: Path) -> dict[str, Any]:
    """An embedding file's vectors: {"vectors": (n, dim) tensor} for one text encoder, or
    {"clip_l": ..., "clip_g": ...} (SDXL). A1111 `.pt` (`string_to_param`), diffusers
    `.safetensors`/`.bin` ({token: tensor} or `emb_params`). ValueError when unreadable."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            safetensors_header(path)
            data: Any = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of every kind
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError("not an embedding (expected a dict of tensors)")
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    if isinstance(data.get("string_to_param"), dict):
        params = list(data["string_to_param"].values())
        vectors = params[0] if params else None
    elif "emb_params" in data:
        vectors = data["emb_params"]
    elif len(data) == 1:
        vectors = next(iter(data.values()))
    else:
        vectors = None
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
        raise ValueError("not an embedding (no string_to_param / emb_params / single tensor)")
    return {"vectors": vectors.reshape(-1, vectors.shape[-1]).detach()}
