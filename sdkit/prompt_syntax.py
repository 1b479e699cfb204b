"""A1111 prompt syntax: attention weights, BREAK, prompt editing and alternation.

Read the way AUTOMATIC1111's web UI reads prompts (its documented rules and examples), so a
prompt copied from an A1111 PNG means the same here. Two independent passes, as in A1111:

* `schedule(prompt, steps)`: prompt editing `[from:to:when]`, `[to:when]`, `[from::when]`
  and alternation `[a|b|c]` resolved into `[(until_step, text), ...]`. A prompt the
  grammar cannot read (say a `|` outside brackets) is kept whole, as A1111 keeps it.
* `parse_attention(text)`: `(x)` x1.1, `[x]` /1.1, `(x:1.3)`, nesting multiplies,
  `\\(` `\\)` `\\[` `\\]` `\\\\` escapes, `BREAK`; unbalanced brackets are lenient: an unclosed
  bracket weights everything after it, a stray closer is literal text.

Pure Python, no dependency: the runners use `has_syntax` to keep plain prompts on diffusers'
own path (bit-identical output).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = "BREAK"
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_TEXT_RUN = re.compile(r"[^\\()\[\]:]+")
_NUMBER = re.compile(r"[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)")


# ------------------------------------------------------------------------ attention


def parse_attention(text: str) -> list[tuple[str, float]]:
    """`[(text, weight), ...]`, equal neighbouring weights merged; `(BREAK, -1.0)` marks a
    forced chunk break. An empty prompt is `[("", 1.0)]`.

    One deliberate difference from A1111: a BREAK inside brackets still breaks (A1111 would
    multiply its marker weight and then encode the word "BREAK").
    """
    res: list[list] = []  # [text, weight]; weight None marks BREAK
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, by: float) -> None:
        for item in res[start:]:
            if item[1] is not None:
                item[1] *= by

    def literal(s: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(s)):
            if i:
                res.append([BREAK, None])
            res.append([part, 1.0])

    pos, n = 0, len(text)
    while pos < n:
        c = text[pos]
        if c == "\\":
            nxt = text[pos + 1 : pos + 2]
            if nxt in ("(", ")", "[", "]", "\\"):
                res.append([nxt, 1.0])
                pos += 2
            else:  # a lone backslash vanishes (A1111's reading)
                res.append(["", 1.0])
                pos += 1
        elif c == "(":
            rounds.append(len(res))
            pos += 1
        elif c == "[":
            squares.append(len(res))
            pos += 1
        elif c == ":":
            m = _WEIGHT_CLOSE.match(text, pos)
            weight = _float(m.group(1)) if m else None
            if m and rounds and weight is not None:
                scale(rounds.pop(), weight)
            elif m:
                literal(m.group(0))
            else:
                literal(":")
            pos = m.end() if m else pos + 1
        elif c == ")":
            if rounds:
                scale(rounds.pop(), ROUND)
            else:
                literal(")")
            pos += 1
        elif c == "]":
            if squares:
                scale(squares.pop(), SQUARE)
            else:
                literal("]")
            pos += 1
        else:
            m = _TEXT_RUN.match(text, pos)
            assert m is not None
            literal(m.group(0))
            pos = m.end()
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list] = []
    for item in res or [["", 1.0]]:
        if merged and merged[-1][1] == item[1] and item[1] is not None:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, -1.0 if w is None else w) for t, w in merged]


def _float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:  # "1.2.3": A1111 would crash; read it as text
        return None


# ------------------------------------------------------------------------ editing


@dataclass
class _Edit:
    before: list | None
    after: list
    when: str  # the number as written
    at: int = 0  # resolved step


@dataclass
class _Alt:
    options: list[list]


class _Fail(Exception):
    pass


class _Reader:
    """Recursive descent over A1111's schedule grammar:

    start: (prompt | stray `[](): `)*        prompt: (emphasized | edit | alt | plain)*
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
    edit: "[" [prompt ":"] prompt ":" ws? NUMBER ws? "]"     alt: "[" prompt ("|" prompt?)+ "]"
    plain: (any char but \\ [ ] ( ) : | , or \\ + any char)+
    Items are str (text kept as written), `_Edit` or `_Alt`.
    """

    def __init__(self, text: str) -> None:
        self.s = text

    def start(self) -> list:
        items: list = []
        pos = 0
        while pos < len(self.s):
            got, pos2 = self.prompt(pos)
            items += got
            if pos2 < len(self.s):
                if self.s[pos2] not in "[]():":
                    raise _Fail  # `|` or a trailing `\`: the grammar does not read it
                items.append(self.s[pos2])
                pos2 += 1
            pos = pos2
        return items

    def prompt(self, pos: int) -> tuple[list, int]:
        items: list = []
        s = self.s
        while pos < len(s):
            c = s[pos]
            if c in "([":
                try:
                    item, pos = self.bracket(pos)
                except _Fail:
                    break
                items.append(item)
            elif c in "]):|":
                break
            else:
                start = pos
                while pos < len(s) and s[pos] not in "[]():|":
                    if s[pos] == "\\":
                        if pos + 1 >= len(s):
                            break
                        pos += 1
                    pos += 1
                if pos == start:
                    break
                items.append(s[start:pos])
        return items, pos

    def bracket(self, pos: int) -> tuple[object, int]:
        s = self.s
        if s[pos] == "(":
            inner, p = self.prompt(pos + 1)
            if p < len(s) and s[p] == ")":
                return ["(", *inner, ")"], p + 1
            if p < len(s) and s[p] == ":":
                second, q = self.prompt(p + 1)
                if q < len(s) and s[q] == ")":
                    return ["(", *inner, ":", *second, ")"], q + 1
            raise _Fail
        first, p = self.prompt(pos + 1)
        if p >= len(s):
            raise _Fail
        if s[p] == "]":
            return ["[", *first, "]"], p + 1
        if s[p] == "|":
            options = [first]
            while p < len(s) and s[p] == "|":
                opt, p = self.prompt(p + 1)
                options.append(opt)
            if p < len(s) and s[p] == "]":
                return _Alt(options), p + 1
            raise _Fail
        if s[p] == ":":
            number = self.number_close(p + 1)
            if number:
                return _Edit(None, first, number[0]), number[1]
            second, q = self.prompt(p + 1)
            if q < len(s) and s[q] == ":":
                number = self.number_close(q + 1)
                if number:
                    return _Edit(first, second, number[0]), number[1]
        raise _Fail

    def number_close(self, pos: int) -> tuple[str, int] | None:
        """ws? NUMBER ws? "]" at `pos`: (the number, position after "]") or None."""
        s = self.s
        while pos < len(s) and s[pos].isspace():
            pos += 1
        m = _NUMBER.match(s, pos)
        if not m:
            return None
        end = m.end()
        while end < len(s) and s[end].isspace():
            end += 1
        if end < len(s) and s[end] == "]":
            return m.group(0), end + 1
        return None


def schedule(
    prompt: str, steps: int, *, old_timelines: bool = False, first_pass: int | None = None
) -> list[tuple[int, str]]:
    """`[(until_step, text), ...]` for `steps` steps, as A1111's
    `get_learned_conditioning_prompt_schedules` computes it; the last entry ends at `steps`.

    `when` of an edit: a number with a decimal point is a fraction of `steps`, an integer
    is a step number (A1111's current rule); with `old_timelines` (A1111's "Old prompt
    editing timelines" option) any value below 1 is a fraction, anything else a step. Both
    agree on the documented forms (`0.25`, `.5`, `10`). Alternation switches every step.
    A1111 picks the entry for its 0-based sampler step i as the first with i <= until_step;
    `entry_at` does the same.

    `first_pass`: the schedule of a hires fix's second pass of `steps` steps after a first
    pass of `first_pass` steps, on A1111's one timeline for both: a step number counts the
    first pass's steps first (`when - first_pass`), a fraction spans 1 for the first pass
    and 1 more for the second (`(when - 1) * steps`), so `[a:b:0.5]` is `b` all through
    pass 2 and `[a:b:25]` after 20 first-pass steps switches after pass 2's step 5. The old
    timelines ignore it, as in A1111.
    """
    try:
        items = _Reader(prompt).start()
    except _Fail:
        return [(steps, prompt)]
    bounds = {steps}

    def collect(node: object) -> None:
        if isinstance(node, _Edit):
            value = float(node.when)
            if old_timelines:
                value = value * steps if value < 1 else value
            elif "." in node.when:
                value = (value - (0.0 if first_pass is None else 1.0)) * steps
            elif first_pass is not None:
                value -= first_pass
            node.at = min(steps, int(value))
            if node.at >= 1:
                bounds.add(node.at)
            for part in (node.before or [], node.after):
                collect(part)
        elif isinstance(node, _Alt):
            bounds.update(range(1, steps + 1))
            for opt in node.options:
                collect(opt)
        elif isinstance(node, list):
            for child in node:
                collect(child)

    collect(items)

    def render(node: object, step: int) -> str:
        if isinstance(node, str):
            return node
        if isinstance(node, _Edit):
            chosen = (node.before or []) if step <= node.at else node.after
            return render(chosen, step)
        if isinstance(node, _Alt):
            return render(node.options[(step - 1) % len(node.options)], step)
        assert isinstance(node, list)
        return "".join(render(child, step) for child in node)

    return [(b, render(items, b)) for b in sorted(bounds)]


def entry_at(ends: list[int], step: int) -> int:
    """Index of the schedule entry A1111 uses at 0-based sampler step `step`."""
    for i, end in enumerate(ends):
        if step <= end:
            return i
    return len(ends) - 1


def has_syntax(prompt: str, steps: int) -> bool:
    """Whether `prompt` means anything other than its literal text to A1111."""
    return schedule(prompt, steps) != [(steps, prompt)] or parse_attention(prompt) != [
        (prompt, 1.0)
    ]


# ------------------------------------------------------------------------ LoRA tags

# A1111's extra-network tag `<lora:NAME>` or `<lora:NAME:WEIGHT>` (its `<(\w+):([^>]+)>`),
# and `<lyco:...>`, which A1111's built-in Lora network takes as an alias of `lora` (the
# LyCORIS extension's tag; the same files). Other networks are not supported and stay.
_LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>")


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(`prompt` without its `<lora:NAME:WEIGHT>` / `<lyco:...>` tags, [(NAME, WEIGHT), ...])
    in order; the weight defaults to 1. Removed tags leave nothing behind, as in A1111 (a
    prompt without tags comes back as the same string). ValueError for a tag without a name or whose
    weight is not a number (A1111's te/unet/dyn extra arguments are not supported)."""
    found: list[tuple[str, float]] = []
    for m in _LORA_TAG.finditer(prompt):
        parts = m.group(1).split(":")
        name = parts[0].strip()
        if not name or len(parts) > 2:
            raise ValueError(f"{m.group(0)}: expected <lora:NAME> or <lora:NAME:WEIGHT>")
        weight = _float(parts[1].strip()) if len(parts) == 2 else 1.0
        if weight is None:
            raise ValueError(f"{m.group(0)}: the weight {parts[1]!r} is not a number")
        found.append((name, weight))
    return (_LORA_TAG.sub("", prompt) if found else prompt), found


def without_lora_tags(prompt: str) -> str:
    """`prompt` as it reaches CLIP: its `<lora:...>` tags removed (A1111's rule)."""
    return _LORA_TAG.sub("", prompt)
