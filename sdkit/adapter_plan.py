"""Which LoRAs and embeddings a request uses, checked against an engine's model before the
job is queued, with the hashes A1111 writes into the PNG.

The LoRAs are the prompt's `<lora:NAME:WEIGHT>` tags followed by the `loras` field (a name
given twice is an error); the embeddings are the prompt and negative-prompt words equal to
an embedding file's name (A1111's rule). Every one must be found, readable and made for
this model; a `Lora hashes` / `TI hashes` entry in `extra` (from an A1111 PNG) must match
the file found, else the job would draw something else than the PNG it came from.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdkit.adapter_loading import EmbeddingUse, LoraUse
from sdkit.adapters import (
    family_name,
    file_key,
    format_hashes,
    lora_info,
    parse_hashes,
    read_embedding,
    short_hash,
)
from sdkit.prompt_syntax import lora_tags, without_lora_tags
from sdkit.request import LORA_WEIGHTS, Request, RequestError

if TYPE_CHECKING:
    from sdkit.engine import Engine

LORA_HASHES = "Lora hashes"
TI_HASHES = "TI hashes"
# Words of a prompt as A1111 users write embedding names between its syntax characters.
_WORD = re.compile(r"[^\s,()\[\]{}:|<>\\]+")
_checked: dict[tuple, Any] = {}  # file key -> LoraInfo or embedding width(s), or the error
_lock = threading.Lock()


@dataclass
class Plan:
    loras: list[LoraUse] = field(default_factory=list)
    embeddings: list[EmbeddingUse] = field(default_factory=list)


def plan(req: Request, engine: Engine) -> Plan:
    """The adapters `req` uses on `engine` (found, not yet checked against the model)."""
    from sdkit import modes

    out = Plan()
    fields = modes.get(req.mode).fields
    takes = engine.family != "unconditional" and "prompt" in fields
    if "loras" not in fields:
        return (
            out if not takes else _embeddings(out, without_lora_tags(req.prompt or ""), req, engine)
        )
    text = req.prompt or ""
    try:
        text, tags = lora_tags(text)
    except ValueError as err:
        raise RequestError("prompt", str(err)) from None
    lo, hi = LORA_WEIGHTS
    uses = []
    for name, weight in tags:
        if not lo <= weight <= hi:
            raise RequestError(
                "prompt", f"<lora:{name}:{weight:g}>: the weight must be in {lo}..{hi}"
            )
        uses.append((name, weight, "prompt"))
    uses += [(d["name"], float(d.get("weight", 1.0)), "loras") for d in req.loras]
    if uses and not takes:
        raise RequestError(uses[0][2], f"{engine.model.name} is not a text model: no LoRA")
    seen: set[str] = set()
    for name, weight, where in uses:
        if name in seen:
            raise RequestError(where, f"LoRA {name!r} is given twice (prompt tag and loras)")
        seen.add(name)
        path = engine.adapters.find("lora", name, field=where)
        out.loras.append(LoraUse(name, path, weight, where))
    return _embeddings(out, text, req, engine) if takes else out


def _embeddings(out: Plan, text: str, req: Request, engine: Engine) -> Plan:
    """`out` plus the embeddings named by words of `text` (the prompt as CLIP reads it) and
    of the negative prompt."""
    # case-insensitive, as in A1111 (its tokenizer lowercases prompt and names alike)
    names = {n.lower(): n for n in engine.adapters.names("embedding")}
    for where, prompt in (("prompt", text), ("negative_prompt", req.negative_prompt)):
        for word in _WORD.findall(prompt or ""):
            name = names.get(word.lower())
            if name is not None and all(e.name != name for e in out.embeddings):
                path = engine.adapters.find("embedding", name, field=where)
                out.embeddings.append(EmbeddingUse(name, path, where))
    return out


def check(req: Request, engine: Engine) -> None:
    """Check `req`'s adapters against `engine`'s model and write the hashes of what the job
    uses into `req.extra` (A1111's `Lora hashes` / `TI hashes`; removed when none)."""
    used = plan(req, engine)
    lora_hashes = []
    for use in used.loras:
        _check_lora(use, engine)
        lora_hashes.append((use.name, short_hash(use.path, "lora")))
    ti_hashes = []
    for emb in used.embeddings:
        _check_embedding(emb, engine)
        ti_hashes.append((emb.name, short_hash(emb.path, "embedding")))
    _missing_embeddings(req, used, engine)
    for key, pairs, what in (
        (LORA_HASHES, lora_hashes, "LoRA"),
        (TI_HASHES, ti_hashes, "embedding"),
    ):
        expected = parse_hashes(req.extra.get(key, ""))
        for name, actual in pairs:
            want = expected.get(name.replace(":", "").replace(",", ""))
            if want and actual[: len(want)] != want[:12]:
                uses: list[LoraUse | EmbeddingUse] = [
                    *(used.loras if what == "LoRA" else used.embeddings)
                ]
                found = next(u for u in uses if u.name == name)
                raise RequestError(
                    found.field,
                    f"{what} {name!r}: {found.path} has hash {actual}, but the request's "
                    f"{key} say {want} (another file of the same name)",
                )
        if pairs:
            req.extra[key] = format_hashes(pairs)
        else:
            req.extra.pop(key, None)


def _missing_embeddings(req: Request, used: Plan, engine: Engine) -> None:
    """An embedding the request's `TI hashes` name (an A1111 PNG) whose word is in a prompt
    but which no folder holds: an error naming it and the folders, never a silent word."""
    named = parse_hashes(req.extra.get(TI_HASHES, ""))
    found = {e.name.lower() for e in used.embeddings}  # A1111 matches regardless of case
    prompts = (
        ("prompt", without_lora_tags(req.prompt or "")),
        ("negative_prompt", req.negative_prompt),
    )
    for name in named:
        if name.lower() in found:
            continue
        for where, text in prompts:
            if name.lower() in (w.lower() for w in _WORD.findall(text or "")):
                engine.adapters.find("embedding", name, field=where)  # raises: not found


def _cached(path: Path, read: Any) -> Any:
    key = file_key(path)
    with _lock:
        hit = _checked.get(key)
    if hit is None:
        try:
            hit = read(path)
        except (OSError, ValueError) as err:
            hit = ValueError(str(err))
        with _lock:
            _checked[key] = hit
    return hit


def _check_lora(use: LoraUse, engine: Engine) -> None:
    info = _cached(use.path, lora_info)
    if isinstance(info, ValueError):
        raise RequestError(use.field, f"LoRA {use.name!r}: {use.path} is unusable ({info})")
    width = int(engine.model.pipe.unet.config.cross_attention_dim)
    wrong = info.family is not None and info.family != engine.family
    if wrong or (info.width is not None and info.width != width):
        raise RequestError(
            use.field,
            f"LoRA {use.name!r}: {use.path} is for {family_name(info.family, info.width)}, "
            f"but this model is {family_name(engine.family)} (cross-attention width {width})",
        )


def _embedding_widths(path: Path) -> dict[str, int]:
    data = read_embedding(path)
    return {k: int(v.shape[-1]) for k, v in data.items()}


def _check_embedding(emb: EmbeddingUse, engine: Engine) -> None:
    widths = _cached(emb.path, _embedding_widths)
    if isinstance(widths, ValueError):
        raise RequestError(emb.field, f"embedding {emb.name!r}: {emb.path} is unusable ({widths})")
    pipe = engine.model.pipe
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    need = {"vectors": _width(pipe.text_encoder)}
    if sdxl:
        need = {"clip_l": _width(pipe.text_encoder), "clip_g": _width(pipe.text_encoder_2)}
    if widths != need:
        have = ", ".join(f"{k} {v}" for k, v in widths.items())
        raise RequestError(
            emb.field,
            f"embedding {emb.name!r}: {emb.path} holds vectors of width {have}; this model "
            f"({family_name(engine.family)}) needs {', '.join(f'{k} {v}' for k, v in need.items())}",
        )
    vocab = engine.base_vocabulary  # (the live tokenizer may be growing on the worker)
    if emb.name in vocab or f"{emb.name}</w>" in vocab:
        raise RequestError(
            emb.field,
            f"embedding {emb.name!r}: {emb.path} is named like a word the tokenizer already "
            "knows; rename the file",
        )


def _width(encoder: Any) -> int:
    return int(encoder.get_input_embeddings().weight.shape[1])
