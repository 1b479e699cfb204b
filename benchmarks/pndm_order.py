"""Why PNDM (PLMS) shifts the embedded model's colours at 20 steps: `python benchmarks/pndm_order.py`.

PLMS is a linear multistep method: from step 4 on it extrapolates the noise prediction with
the 4th-order Adams-Bashforth weights (55, -59, 37, -9)/24. A component of the prediction
that alternates from step to step is multiplied by (55 + 59 + 37 + 9)/24 = 6.7 there, and
by (3 + 1)/2 = 2 under the 2nd-order weights. The embedded model's predicted *mean* (the
offset-noise component that carries the background colour) does alternate over the first
steps, and at 20 steps each step is large enough for the 4th-order extrapolation to throw
the colours off.

This script runs PLMS as diffusers ships it and with its history capped at order 3 and 2
(only the extrapolation changes: same timesteps, same model, same seeds), at 20 and 50
steps, and prints the per-step spatial mean of the noise prediction. Capping the order
fixes the colours at 20 steps, which locates the fault in the extrapolation, not in the
model's colours or the timesteps.
"""

from __future__ import annotations

import argparse

from diffusers import PNDMScheduler

import sdkit
from sdkit.embedded import shapes

_plain_step = PNDMScheduler.step_plms
_order = 4
_means: list[tuple[int, list[float]]] = []


def _capped_step(self, model_output, timestep, sample, return_dict=True):
    """PLMS with its history trimmed so that at most `_order` predictions are combined."""
    if self.counter != 1 and _order < 4:
        self.ets = self.ets[-(_order - 1) :]
    _means.append((int(timestep), model_output[0].mean(dim=(1, 2)).tolist()))
    return _plain_step(self, model_output, timestep, sample, return_dict)


def main() -> None:
    global _order
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="a diffusers folder instead of the shipped model")
    p.add_argument("--prompt", default="a yellow square on a black background")
    p.add_argument("--seeds", type=int, default=6)
    args = p.parse_args()
    expected = "{} on {}".format(*[w for w in args.prompt.split() if w in shapes.COLOURS][:2])
    PNDMScheduler.step_plms = _capped_step
    engine = sdkit.load(args.model)
    for order in (4, 3, 2):
        _order = order
        for steps in (20, 50):
            verdicts = []
            for seed in range(args.seeds):
                _means.clear()
                result = engine.txt2img(
                    args.prompt,
                    seed=seed,
                    num_inference_steps=steps,
                    guidance_scale=5.0,
                    scheduler="PNDM",
                    progress=False,
                )
                j = shapes.classify(result[0])
                verdicts.append(f"{j.colour} on {j.background}")
                if seed == 0 and steps == 20:
                    print(f"order {order}, 20 steps, seed 0: spatial mean of the prediction")
                    for t, m in _means[:8]:
                        print(f"  t={t:4d} " + " ".join(f"{v:+.2f}" for v in m))
            right = sum(v == expected for v in verdicts)
            print(f"order {order}, {steps} steps: {right}/{len(verdicts)} right {verdicts}")


if __name__ == "__main__":
    main()
