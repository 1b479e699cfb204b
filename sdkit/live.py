"""Live painting: the one preset every face (widget, Krita, GIMP) uses for a live frame.

A live frame is an img2img (or inpaint, with a mask) of the user's canvas at a fixed seed,
so the picture changes only where the drawing changes, submitted with the `replace` queue
policy under one source per canvas, so a newer frame supersedes the older ones (see
`sdkit.jobs.QueuePolicy`).  The preset was chosen on the embedded model by the project's
classifier (`sdkit.embedded.shapes.classify`: colour, background and shape of the input
kept) over 24 rendered scenes: DPM++ 2M, 6 steps, strength 0.5 kept 17/24 with guidance 5
and 21/24 with guidance 1 (which also halves the UNet batch); 4 steps kept 14/24; Euler a
at 6 steps 17/24 (see benchmarks/RESULTS.md, "Live painting").

"LCM" (diffusers' LCMScheduler) is offered by its A1111/Forge name, but it only makes
sense with an LCM-distilled model (or an LCM LoRA): it treats every step as a jump to
the clean image, which a plain model such as the embedded one was not trained to make;
measured there at 4-8 steps it kept 4-8 of 16 scenes (DPM++ 2M: 8-12), so the preset
does not use it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from sdkit.request import Request, make_request

# Request fields of a live frame; a face lets the user change strength, seed and prompt.
LIVE_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "num_inference_steps": 6,
        "strength": 0.5,
        "scheduler": "DPM++ 2M",
        "guidance_scale": 1.0,  # no classifier-free guidance: half the UNet work
        "seed": 1,
    }
)
LIVE_DEBOUNCE_S = 0.15  # wait this long after the last change before sending a frame
LIVE_POLICY = "replace"


def live_request(image: Any, prompt: str = "", *, mask: Any = None, **fields: Any) -> Request:
    """The request of one live frame: img2img, or inpaint when a mask is given; `fields`
    override `LIVE_DEFAULTS` (a seed of None keeps the preset's fixed seed)."""
    values = {**LIVE_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}
    if mask is None:
        return make_request("img2img", image=image, prompt=prompt, **values)
    return make_request("inpaint", image=image, mask=mask, prompt=prompt, **values)
