"""`Engine.check`: the one validation every face calls. It returns the request as it would
run, or raises exactly the `RequestError` that `submit` raises; `info()["ranges"]` says
what it accepts; limits apply to the request as it will run (issue 13, findings 2 and 3)."""

from __future__ import annotations

import pytest
from PIL import Image

from sdkit.request import MAX_PIXELS, RANGES, Request, RequestError

PROMPT = "a red circle on a blue background"
IMAGE = Image.new("RGB", (32, 32), (200, 30, 30))
MASK = Image.new("L", (32, 32), 255)

BAD = [
    (dict(width=30), "width"),
    (dict(height=0), "height"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=10**30), "num_inference_steps"),
    (dict(guidance_scale=-1), "guidance_scale"),
    (dict(guidance_scale=10**400), "guidance_scale"),  # float() of it overflows
    (dict(guidance_scale=101), "guidance_scale"),
    (dict(seed=2**64), "seed"),
    (dict(num_images=10**20), "num_images"),
    (dict(scheduler="Nope"), "scheduler"),
    (dict(prompt=""), "prompt"),
    (dict(mode="img2img"), "image"),
    (dict(mode="img2img", image=IMAGE, strength=10**400), "strength"),
    (dict(mode="img2img", image=IMAGE, num_inference_steps=3, strength=0.2), "strength"),
    (dict(mode="inpaint", image=IMAGE, mask=MASK, grow=3000), "grow"),
    (dict(mode="inpaint", image=IMAGE, mask=MASK, mask_blur=10**9), "mask_blur"),
    (dict(mode="inpaint", image=IMAGE, mask=MASK, padding=513), "padding"),
    (dict(mode="unconditional", prompt="", guidance_scale=7), "guidance_scale"),
    (dict(mode="outpaint-v9"), "mode"),
]


@pytest.mark.parametrize("fields,field", BAD)
def test_check_raises_what_submit_raises(sd_engine, fields, field):
    req = dict(prompt=PROMPT, **fields) if "prompt" not in fields else fields
    with pytest.raises(RequestError) as checked:
        sd_engine.check(Request(**req))
    with pytest.raises(RequestError) as submitted:
        sd_engine.submit(Request(**req))
    assert checked.value.field == submitted.value.field == field
    assert checked.value.message == submitted.value.message
    assert len(str(checked.value)) < 700  # a 401-digit number is not printed in full


def test_check_returns_the_request_as_it_would_run(sd_engine):
    original = Request(prompt=PROMPT)
    checked = sd_engine.check(original)
    assert original.seed is None and original.width is None  # the caller's request is kept
    assert (checked.width, checked.height, checked.num_inference_steps) == (32, 32, 4)
    assert checked.scheduler == "PNDM" and checked.guidance_scale == 7.5
    assert isinstance(checked.seed, int) and checked.model == sd_engine.model.name
    assert sd_engine.check(checked) == checked  # checking twice changes nothing
    job = sd_engine.submit(checked)
    job.result(timeout=120)
    assert job.request == checked


def test_check_fills_the_size_from_the_input_image_and_forced_values(sd_engine):
    wide = Image.new("RGB", (44, 20), (0, 0, 0))
    checked = sd_engine.check(Request(mode="img2img", image=wide, prompt=PROMPT))
    assert (checked.width, checked.height) == (40, 16)  # rounded down to the size multiple
    uncond = sd_engine.check(Request(mode="unconditional", guidance_scale=0))
    assert uncond.guidance_scale == 1.0 and uncond.prompt == ""


def test_pixel_limit_applies_to_the_request_as_it_will_run(sd_engine):
    """Finding 13.3: width/height omitted, a big input image and many images."""
    big = Image.new("RGB", (4096, 4096))
    with pytest.raises(RequestError) as err:
        sd_engine.check(Request(mode="img2img", image=big, prompt=PROMPT, num_images=16))
    assert err.value.field == "num_images" and str(MAX_PIXELS) in err.value.message
    assert sd_engine.check(Request(mode="img2img", image=big, prompt=PROMPT)).width == 4096
    with pytest.raises(RequestError) as err:
        sd_engine.check(Request(prompt=PROMPT, width=2048, height=2048, num_images=5))
    assert err.value.field == "num_images"


def test_ranges_are_what_check_enforces(sd_engine):
    ranges = sd_engine.info()["ranges"]
    assert set(ranges) == set(RANGES)
    assert ranges["width"] == [8, 4096] and ranges["grow"] == [0, 256]
    base = dict(mode="inpaint", image=IMAGE, mask=MASK, prompt=PROMPT, num_inference_steps=4)
    for name, (lo, hi) in ranges.items():
        step = 1 if isinstance(lo, int) and isinstance(hi, int) else 0.5
        if name in ("width", "height"):
            step = sd_engine.size_multiple
        for ok in (lo, hi):
            fields = {**base, name: ok}
            if name == "strength" and ok == lo:  # strength x steps must leave one step
                fields["num_inference_steps"] = 1000
            if name == "num_inference_steps" and ok == lo:
                fields["strength"] = 1
            sd_engine.check(Request(**fields))
        for bad in (lo - step, hi + step):
            with pytest.raises(RequestError) as err:
                sd_engine.check(Request(**{**base, name: bad}))
            assert err.value.field == name, (name, bad)


def test_info_describes_the_served_modes(sd_engine, ddpm_engine):
    info = sd_engine.info()
    assert [m["name"] for m in info["modes"]][:4] == [
        "txt2img",
        "img2img",
        "inpaint",
        "unconditional",
    ]
    assert info["size_multiple"] == 8 and info["vae_factor"] == 4
    assert info["max_pixels"] == MAX_PIXELS
    ddpm = ddpm_engine.info()
    assert [m["name"] for m in ddpm["modes"]] == ["unconditional"]
    assert ddpm["ranges"]["width"] == [16, 16] and ddpm["size_multiple"] == 1
