"""Text conditioning the A1111 way: 75-token chunks, prompt weights, clip skip, editing.

diffusers reads a prompt as literal text, truncated at 77 tokens. A1111 users write
weights, BREAK, prompt editing and prompts longer than 75 tokens; this module encodes those
the way A1111 does and hands the result to diffusers' own pipelines as `prompt_embeds`:

* each prompt is split into chunks of 75 tokens (a BREAK closes a chunk; a chunk that fills
  up within 20 tokens of a comma moves the words after the comma into the next chunk); each
  chunk is wrapped in BOS/EOS, padded to 77, encoded alone, and the chunks are joined along
  the sequence axis; the negative prompt is padded with empty-prompt chunks to the same length;
* weights scale the chunk's hidden states per token, then the chunk is rescaled so its mean
  is what it was before weighting (A1111's "Original" emphasis); A1111 encodes all the
  entries of one prompt's schedule as one batch, so that mean is taken over the batch here too;
* clip skip (A1111's numbering, 1 = last layer): hidden state -N, then the text model's final
  layer norm. A1111 applies it to SD 1.x only: SD 2.x and SDXL ignore it (SDXL always takes
  the penultimate state of both encoders, no norm), and A1111 still writes `Clip skip: 2`
  into their PNGs, so `prompt_kwargs` ignores it there too (`effective_clip_skip`);
  `encode_prompt` on SDXL with N > 1 takes state -(N+1) (diffusers' convention);
* SDXL: both encoders' states concatenated per token, the pooled embedding from the second
  encoder's first chunk; an empty negative prompt is zeros when the pipeline's
  `force_zeros_for_empty_prompt` says so (as diffusers and A1111 do);
* prompt editing / alternation: one encoding per schedule entry; `PromptEmbeds.callback`
  swaps the pipeline's (negative+positive) `prompt_embeds` in `callback_on_step_end`.

`prompt_kwargs` is the runners' entry: plain prompts (no syntax, <= 75 tokens, clip skip 1)
go to diffusers unchanged, so their output stays bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sdkit.prompt_cache import PromptCache, encoder_key
from sdkit.prompt_syntax import BREAK, entry_at, has_syntax, parse_attention, schedule

CHUNK = 75
COMMA_BACKTRACK = 20


@dataclass
class Chunk:
    """77 token ids (BOS + 75 + EOS) and their weights."""

    tokens: list[int]
    weights: list[float]


# Words as A1111 users write embedding names between the syntax characters (the same rule
# as `sdkit.adapter_plan`, which picks the job's embeddings).
_WORD = re.compile(r"[^\s,()\[\]{}:|<>\\]+")


def embedding_spelling(pipe: Any, text: str) -> str:
    """`text` with every word equal to a loaded embedding's token but for case spelled as
    the token. A1111 matches embedding names case-insensitively (its tokenizer lowercases
    the prompt and the name alike), and so does CLIP's tokenizer here for the first vector,
    but diffusers expands a multi-vector embedding only where the spelling is exact."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or not text:
        return text
    special = set(tokenizer.all_special_tokens)
    added = {t.lower(): t for t in tokenizer.get_added_vocab() if t not in special}
    if not added:
        return text
    return _WORD.sub(lambda m: added.get(m.group(0).lower(), m.group(0)), text)


def _convert(pipe: Any, text: str, tokenizer: Any) -> str:
    """Multi-vector textual-inversion tokens expanded the way diffusers' own path does."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    if convert is None or not text:
        return text
    special = set(tokenizer.all_special_tokens)
    if not any(t in text for t in tokenizer.get_added_vocab() if t not in special):
        return text  # nothing loaded: skip (its tokenize() warns on long text)
    return convert(text, tokenizer)


def chunks(tokenizer: Any, text: str, pipe: Any = None) -> list[Chunk]:
    """`text` (A1111 syntax, no editing) as 77-token chunks, the A1111 way."""
    parsed = parse_attention(text)
    texts = ["" if _is_break(t, w) else _convert(pipe, t, tokenizer) for t, w in parsed]
    ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    out: list[Chunk] = []
    toks: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal toks, weights, last_comma
        pad = CHUNK - len(toks)
        out.append(Chunk([bos, *toks, *[eos] * pad, eos], [1.0, *weights, *[1.0] * pad, 1.0]))
        toks, weights, last_comma = [], [], -1

    for (piece, weight), piece_ids in zip(parsed, ids, strict=True):
        if _is_break(piece, weight):
            close()
            continue
        for token in piece_ids:
            if token == comma:
                last_comma = len(toks)
            elif len(toks) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                keep = last_comma + 1
                moved = toks[keep:], weights[keep:]
                toks, weights = toks[:keep], weights[:keep]
                close()
                toks, weights = list(moved[0]), list(moved[1])
            if len(toks) == CHUNK:
                close()
            toks.append(token)
            weights.append(weight)
    if toks or not out:
        close()
    return out


def _is_break(piece: str, weight: float) -> bool:
    return piece == BREAK and weight == -1.0  # parse_attention's marker


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of `text` read literally (no special tokens)."""
    return len(
        tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    )


def _empty_chunk(tokenizer: Any) -> Chunk:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return Chunk([bos] + [eos] * (CHUNK + 1), [1.0] * (CHUNK + 2))


def hidden_states(encoder: Any, ids: torch.Tensor, clip_skip: int, sdxl: bool) -> tuple:
    """(per-token states, pooled output or None) of one chunk batch for `clip_skip`."""
    out = encoder(ids, output_hidden_states=True)
    if sdxl:
        z = out.hidden_states[-(clip_skip + 1)]
    elif clip_skip > 1:
        model = getattr(encoder, "text_model", encoder)  # transformers 4 had the extra level
        z = model.final_layer_norm(out.hidden_states[-clip_skip])
    else:
        z = out[0]
    first = out[0]
    pooled = first if first.ndim == 2 else None  # CLIPTextModelWithProjection: text_embeds
    return z, pooled


def encode_texts(
    pipe: Any, encoder: Any, tokenizer: Any, texts: list[str], clip_skip: int, sdxl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode `texts` as one batch: (B, 77 * chunks, D) and the pooled (B, D) of chunk 0."""
    per_text = [chunks(tokenizer, t, pipe) for t in texts]
    count = max(len(c) for c in per_text)
    empty = _empty_chunk(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = encoder.device
    parts, pooled = [], None
    for i in range(count):
        batch = [c[i] if i < len(c) else empty for c in per_text]
        rows = []
        for chunk in batch:
            row = list(chunk.tokens)
            if pad is not None and pad != eos:  # tokens after the first EOS become padding
                first = row.index(eos)
                row[first + 1 :] = [pad] * (len(row) - first - 1)
            rows.append(row)
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        z, p = hidden_states(encoder, ids, clip_skip, sdxl)
        parts.append(_emphasis(z, [c.weights for c in batch]))
        if i == 0:
            pooled = p
    return torch.cat(parts, dim=1), pooled


def _emphasis(z: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's state by its weight, then rescale the
    batch so its mean is what it was (all weights 1: untouched, which is the same numbers)."""
    if all(w == 1.0 for row in weights for w in row):
        return z
    mean = z.mean()
    z = z * torch.tensor(weights, dtype=z.dtype, device=z.device).unsqueeze(-1)
    new_mean = z.mean()
    return z * (mean / new_mean) if new_mean != 0 else z


@dataclass
class Encoded:
    """One prompt's conditioning per schedule entry: entry k holds until step `ends[k]`."""

    ends: list[int]
    embeds: torch.Tensor  # (entries, tokens, dim)
    pooled: torch.Tensor | None  # (entries, dim), SDXL

    def padded(self, tokens: int, filler: torch.Tensor) -> Encoded:
        """Extend to `tokens` with repeats of `filler` (one empty-prompt chunk)."""
        missing = (tokens - self.embeds.shape[1]) // filler.shape[1]
        if missing <= 0:
            return self
        extra = filler.expand(self.embeds.shape[0], -1, -1).repeat(1, missing, 1)
        return Encoded(self.ends, torch.cat([self.embeds, extra.to(self.embeds)], 1), self.pooled)


def is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    if is_sdxl(pipe):
        pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
    return [(e, t) for e, t in pairs if e is not None]


@torch.no_grad()
def encode_prompt(
    pipe: Any, prompt: str, steps: int, clip_skip: int = 1, first_pass: int | None = None
) -> Encoded:
    """`prompt`'s schedule encoded with every text encoder of `pipe` (`first_pass`: for a
    hires pass after that many steps, `prompt_syntax.schedule`)."""
    plan = schedule(prompt, steps, first_pass=first_pass)
    texts = [text for _, text in plan]
    sdxl = is_sdxl(pipe)
    states, pooled = [], None
    for encoder, tokenizer in _encoders(pipe):
        z, p = encode_texts(pipe, encoder, tokenizer, texts, clip_skip, sdxl)
        states.append(z)
        pooled = p if sdxl else None
    tokens = max(z.shape[1] for z in states)
    states = [z if z.shape[1] == tokens else _pad_tokens(z, tokens) for z in states]
    return Encoded([end for end, _ in plan], torch.cat(states, dim=-1), pooled)


def _pad_tokens(z: torch.Tensor, tokens: int) -> torch.Tensor:
    """Two tokenizers that chunked differently: repeat the last state (A1111's stack rule)."""
    return torch.cat([z, z[:, -1:].expand(-1, tokens - z.shape[1], -1)], dim=1)


@dataclass
class PromptEmbeds:
    """Positive and negative conditioning of one job, switched per step as A1111 does."""

    positive: Encoded
    negative: Encoded
    sdxl: bool

    def indices(self, step: int) -> tuple[int, int]:
        return entry_at(self.positive.ends, step), entry_at(self.negative.ends, step)

    @property
    def switches(self) -> bool:
        return len(self.positive.ends) > 1 or len(self.negative.ends) > 1

    def kwargs(self, step: int = 0) -> dict:
        """Pipeline keyword arguments for the conditioning in force at `step`."""
        p, n = self.indices(step)
        out = {
            "prompt_embeds": self.positive.embeds[p : p + 1],
            "negative_prompt_embeds": self.negative.embeds[n : n + 1],
        }
        if self.sdxl:
            assert self.positive.pooled is not None and self.negative.pooled is not None
            out["pooled_prompt_embeds"] = self.positive.pooled[p : p + 1]
            out["negative_pooled_prompt_embeds"] = self.negative.pooled[n : n + 1]
        return out

    def tensor_inputs(self) -> list[str]:
        return ["latents", "prompt_embeds", *(["add_text_embeds"] if self.sdxl else [])]

    def callback(self, inner: Callable | None) -> Callable:
        """callback_on_step_end: `inner`'s work, then the next step's conditioning when it
        changes (the pipeline's in-loop `prompt_embeds` is negative+positive under CFG)."""

        def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            result = dict(inner(pipe, i, t, kwargs) or {}) if inner is not None else {}
            if not self.switches or self.indices(i + 1) == self.indices(i):
                return result
            current = kwargs["prompt_embeds"]
            batch = current.shape[0] // (2 if pipe.do_classifier_free_guidance else 1)
            new = self.kwargs(i + 1)
            result["prompt_embeds"] = self._stack(
                pipe, new["negative_prompt_embeds"], new["prompt_embeds"], batch
            ).to(current)
            if self.sdxl:
                result["add_text_embeds"] = self._stack(
                    pipe, new["negative_pooled_prompt_embeds"], new["pooled_prompt_embeds"], batch
                ).to(kwargs["add_text_embeds"])
            return result

        return on_step_end

    @staticmethod
    def _stack(pipe: Any, negative: torch.Tensor, positive: torch.Tensor, batch: int) -> Any:
        pos = positive.repeat_interleave(batch, dim=0)
        if not pipe.do_classifier_free_guidance:
            return pos
        return torch.cat([negative.repeat_interleave(batch, dim=0), pos])


@torch.no_grad()
def encode(
    pipe: Any,
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    clip_skip: int = 1,
    first_pass: int | None = None,
) -> PromptEmbeds:
    """Both prompts encoded, the negative padded (or the positive) to the same length."""
    sdxl = is_sdxl(pipe)
    positive = encode_prompt(pipe, prompt, steps, clip_skip, first_pass)
    zero_negative = (
        sdxl and not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    )
    if zero_negative:
        pooled = positive.pooled[:1] if positive.pooled is not None else None
        negative = Encoded(
            [steps],
            torch.zeros_like(positive.embeds[:1]),
            torch.zeros_like(pooled) if pooled is not None else None,
        )
    else:
        negative = encode_prompt(pipe, negative_prompt, steps, clip_skip, first_pass)
        tokens = max(positive.embeds.shape[1], negative.embeds.shape[1])
        if positive.embeds.shape[1] != negative.embeds.shape[1]:  # A1111's pad_cond_uncond
            empty = negative if not negative_prompt else encode_prompt(pipe, "", steps, clip_skip)
            filler = empty.embeds[:1]
            positive = positive.padded(tokens, filler)
            negative = negative.padded(tokens, filler)
    return PromptEmbeds(positive, negative, sdxl)


def effective_clip_skip(pipe: Any, clip_skip: int | None, family: str | None = None) -> int:
    """Clip skip as A1111 applies it: SD 1.x only (its SD 2.x and SDXL paths ignore it)."""
    if is_sdxl(pipe) or family in ("sd2", "sdxl"):
        return 1
    return clip_skip or 1


def needs_embeds(pipe: Any, prompt: str, negative_prompt: str, steps: int, clip_skip: int) -> bool:
    """Whether diffusers' own prompt handling would read these prompts differently from A1111."""
    if clip_skip > 1:
        return True
    for text in (prompt, negative_prompt):
        # multi-vector embeddings count as their vectors (diffusers would truncate them)
        expanded = _convert(pipe, text, pipe.tokenizer)
        if text and (has_syntax(text, steps) or token_count(pipe.tokenizer, expanded) > CHUNK):
            return True
    return False


@torch.no_grad()
def _diffusers_encoding(pipe: Any, prompt: str, negative_prompt: str) -> tuple:
    """What the pipeline's own call computes for a plain prompt (batch 1; its repeat per
    image happens in the call), with the negative it encodes under guidance."""
    return pipe.encode_prompt(prompt, pipe._execution_device, 1, True, negative_prompt or None)


def prompt_kwargs(
    pipe: Any,
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    first_pass: int | None = None,
    clip_skip: int | None = None,
    callback: Callable | None = None,
    family: str | None = None,
    cache: PromptCache | None = None,
    adapters: tuple = (),
) -> dict:
    """Prompt keyword arguments for `pipe(...)`, with the step-end `callback` (which may be
    wrapped to switch the conditioning). Plain prompts: exactly what diffusers takes today,
    or, with a `cache` (`sdkit.prompt_cache`), diffusers' own `encode_prompt` output for
    them, computed once per key. `adapters`: the job's LoRAs (`prompt_cache.adapters_key`).
    `family` ("sd1", "sd2", "sdxl"): the model's, for A1111's clip-skip rule. `first_pass`:
    these are a hires fix's second pass of `steps` steps after that many (prompt editing on
    A1111's one timeline for both passes, `prompt_syntax.schedule`)."""
    skip = effective_clip_skip(pipe, clip_skip, family)
    prompt = embedding_spelling(pipe, prompt)
    negative_prompt = embedding_spelling(pipe, negative_prompt)
    plain = not needs_embeds(pipe, prompt, negative_prompt, steps, skip)
    key = None
    if cache is not None:
        edits = None if plain else first_pass  # plain prompts read the same in either pass
        key = (plain, prompt, negative_prompt, steps, edits, skip, adapters, encoder_key(pipe))
    if plain and (key is None or is_sdxl(pipe)):  # SDXL's encode_prompt differs: not cached
        return {
            "prompt": prompt,
            "negative_prompt": negative_prompt or None,
            "callback_on_step_end": callback,
        }
    if plain:
        assert cache is not None and key is not None
        positive, negative = cache.get(
            key, lambda: _diffusers_encoding(pipe, prompt, negative_prompt)
        )
        return {
            "prompt_embeds": positive,
            "negative_prompt_embeds": negative,
            "callback_on_step_end": callback,
        }
    if cache is None:
        embeds = encode(
            pipe, prompt, negative_prompt, steps=steps, clip_skip=skip, first_pass=first_pass
        )
    else:
        embeds = cache.get(
            key,
            lambda: encode(
                pipe, prompt, negative_prompt, steps=steps, clip_skip=skip, first_pass=first_pass
            ),
        )
    return {
        **embeds.kwargs(0),
        "callback_on_step_end": embeds.callback(callback),
        "callback_on_step_end_tensor_inputs": embeds.tensor_inputs(),
    }
