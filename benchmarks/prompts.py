"""Cost of A1111 prompt syntax: parsing + encoding a weighted 150-token prompt.

Times (median of `--rounds`) on the embedded model, or `--model SPEC`:
  plain     diffusers' own `encode_prompt` of a plain 75-token prompt (today's path)
  weighted  `sdkit.conditioning.encode` of a 150-token prompt with weights and an edit
            (two schedule entries, two chunks each, and the negative padded to match)
  job       one `--steps`-step txt2img job (the plain prompt, through the engine)
and prints each as a share of the job, and the extra cost (weighted - plain) / job
(target <= 2 %). Prints numbers; never fails. Run: `python benchmarks/prompts.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts(tokenizer) -> tuple[str, str]:
    """(plain of 75 tokens, weighted of ~150 tokens), from words the tokenizer knows."""
    words = [
        w for w in "red green blue yellow white black orange purple circle square star".split()
    ]
    words = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    plain = " ".join(words[i % len(words)] for i in range(75))
    body = [words[i % len(words)] for i in range(150)]
    body[3] = f"({body[3]}:1.4)"
    body[10] = f"[{body[10]}]"
    body[20] = f"(({body[20]}))"
    body[30] = f"[{body[30]}:{words[0]}:0.5]"
    return plain, " ".join(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch

    import sdkit
    from sdkit import conditioning
    from sdkit.prompt_syntax import parse_attention, schedule

    engine = sdkit.load(args.model, device=args.device)
    try:
        pipe = engine.pipeline("txt2img")
        plain, weighted = prompts(pipe.tokenizer)
        device = pipe.text_encoder.device
        n_tokens = sum(
            len(pipe.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
            for t, _ in parse_attention(schedule(weighted, args.steps)[0][1])
        )
        chunks = len(conditioning.chunks(pipe.tokenizer, schedule(weighted, args.steps)[0][1]))

        def plain_encode() -> object:
            with torch.no_grad():
                return pipe.encode_prompt(plain, device, 1, True, "")

        def weighted_encode() -> object:
            return conditioning.encode(pipe, weighted, "", steps=args.steps)

        def job() -> object:
            return engine.txt2img(plain, seed=1, num_inference_steps=args.steps, progress=False)

        job()  # warm-up
        weighted_encode()
        t_plain = median_time(plain_encode, args.rounds)
        t_weighted = median_time(weighted_encode, args.rounds)
        t_job = median_time(job, max(1, args.rounds // 2))
        print(f"# prompts benchmark: {engine!r}, {args.steps} steps, median of {args.rounds}")
        print(f"weighted prompt: {n_tokens} tokens, {chunks} chunks, 2 schedule entries\n")
        print("| what | seconds | share of job |")
        print("| --- | --- | --- |")
        for name, t in (("plain", t_plain), ("weighted", t_weighted), ("job", t_job)):
            print(f"| {name} | {t:.4f} | {100 * t / t_job:.2f} % |")
        extra = 100 * (t_weighted - t_plain) / t_job
        print(f"\nextra cost of the weighted prompt: {extra:.2f} % of a {args.steps}-step job")
        print("target <= 2 %:", "met" if extra <= 2 else "NOT met")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
