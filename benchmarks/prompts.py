"""Cost of A1111 prompt syntax: parsing + encoding a weighted 150-token prompt.

Times (median of `--rounds`) on the embedded model, or `--model SPEC`:
  plain     diffusers' own `encode_prompt` of a plain 75-token prompt (today's path)
  weighted  `sdkit.conditioning.encode` of a 150-token prompt with weights and an edit
            (two schedule entries, two chunks each, and the negative padded to match)
  job       one `--steps`-step txt2img job (the plain prompt, through the engine)
and prints each as a share of the job, and the extra cost (weighted - plain) / job
(target <= 2 %). Then LoRA loading (`lora_times`): the first job's load of a LoRA (read
the file, inject it with diffusers' `load_lora_weights`, set it) vs the cached switch of a
later job (the adapter stays loaded: `set_adapters` only), a reload from the cached state
dict after eviction (inject, no read), and putting the base model back after the job.
Prints numbers; never fails. Run: `python benchmarks/prompts.py`.
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


def lora_times(engine, lora: str | None, rounds: int) -> dict[str, float] | None:
    """Seconds (median of `rounds`) for a LoRA's first load, cached switch, reload from the
    cached file after eviction, and the restore after a job, on `engine`'s base pipeline."""
    from sdkit.adapter_loading import AdapterState, LoraUse

    names = engine.info()["loras"]
    name = lora or (names[0] if names else None)
    if name is None:
        return None
    use = LoraUse(name, engine.adapters.find("lora", name), 1.0)
    other = LoraUse(name, use.path, 0.5)
    base = engine.pipeline("txt2img")
    first, switch, reload, restore = [], [], [], []
    for _ in range(rounds):
        state = AdapterState()  # a fresh engine's: nothing read, nothing loaded
        t0 = time.perf_counter()
        with state.applied(base, [use], []):
            t1 = time.perf_counter()
        t2 = time.perf_counter()
        with state.applied(base, [other], []):
            t3 = time.perf_counter()
        state.max_loaded = 0  # evict: the next job injects again from the cached file
        state._evict(base, [])
        state.max_loaded = 8
        t4 = time.perf_counter()
        with state.applied(base, [use], []):
            t5 = time.perf_counter()
        state.max_loaded = 0
        state._evict(base, [])  # leave the pipeline as it was
        first.append(t1 - t0)
        switch.append(t3 - t2)
        reload.append(t5 - t4)
        restore.append(t2 - t1)
    med = statistics.median
    return {
        "name": name,
        "first load": med(first),
        "cached switch": med(switch),
        "reload from cached file": med(reload),
        "restore after job": med(restore),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec (default: the embedded model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lora", default=None, help="LoRA name (default: the first found)")
    ap.add_argument("--lora-dir", action="append", default=None, help="LoRA folder")
    args = ap.parse_args()

    import torch

    import sdkit
    from sdkit import conditioning
    from sdkit.prompt_syntax import parse_attention, schedule

    options = {"lora_dirs": args.lora_dir} if args.lora_dir else {}
    engine = sdkit.load(args.model, device=args.device, **options)
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
        lora = lora_times(engine, args.lora, args.rounds)
        if lora is None:
            print("\nno LoRA found for this model: LoRA timings skipped (pass --lora-dir)")
        else:
            print(f"\nLoRA {lora.pop('name')!r}, median of {args.rounds}:\n")
            print("| what | seconds | share of job |")
            print("| --- | --- | --- |")
            for what, t in lora.items():
                print(f"| {what} | {t:.4f} | {100 * t / t_job:.2f} % |")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
