"""Cache of prompt encodings: a live stream re-sends the same prompt with every frame.

The text encoder's output depends on the prompt and negative prompt, the steps (prompt
editing schedules), clip skip, the text path taken (diffusers' own or A1111's chunks), the
LoRAs active on the text encoder at their weights, the tokenizer's added tokens (textual
inversion) and their vectors, and the encoder itself. `key` puts all of these in the key,
so a hit returns exactly the tensors the encoder would compute again (bit-identical: the
same function on the same inputs; tests/test_live.py checks it against uncached runs).
The cache lives on one engine (one model) and is used on its worker only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from sdkit.adapters import file_key

T = TypeVar("T")


class PromptCache:
    """Least-recently-used encodings, at most `size` of them (a few MB at SD 1.5 sizes)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.enabled = True  # benchmarks/live.py --profile measures with and without
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value for `key`, or `compute()` stored under it."""
        if not self.enabled:
            return compute()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = compute()
        with self._lock:
            self.misses += 1
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def adapters_key(loras: list[Any]) -> tuple:
    """A job's LoRAs as the text encoder sees them: file identity and weight, in order."""
    return tuple((file_key(u.path), float(u.weight)) for u in loras)


def encoder_key(pipe: Any) -> tuple:
    """The text encoders and tokenizers as they are now: object identity, added tokens
    (textual inversion) and those tokens' vectors."""
    parts: list[Any] = []
    for enc_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        encoder, tokenizer = getattr(pipe, enc_name, None), getattr(pipe, tok_name, None)
        if encoder is None or tokenizer is None:
            continue
        added = tuple(sorted(tokenizer.get_added_vocab().items()))
        rows = encoder.get_input_embeddings().weight[tokenizer.vocab_size :]
        parts += [id(encoder), id(tokenizer), added, rows.detach().cpu().numpy().tobytes()]
    return tuple(parts)
