"""Hires fix target size (A1111's "Resize width/height to", issue 14.5) and prompt editing on
A1111's one timeline over both passes (issue 14.6), on tiny real pipelines.

A1111's rules, from its `calculate_target_resolution` and `sample_hr_pass`: both sizes 0 ->
the scale; one 0 -> the other side from the aspect ratio; both set -> upscale to cover the
target, then cut (upscaled - target) // 8 latent cells, half each side (odd one at the
right / bottom). Prompt editing in pass 2 (`get_learned_conditioning_prompt_schedules` with
hires steps): integer steps count pass 1's steps first, fractions span 1 per pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdkit import conditioning, hires, modes
from sdkit.infotext import format_infotext
from sdkit.prompt_syntax import schedule
from sdkit.request import MAX_PIXELS, Request, RequestError
from sdkit.schedulers import make_scheduler

PROMPT = "a red circle on a blue background"


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def run(engine, **fields):
    return engine.generate(Request(prompt=PROMPT, seed=7, **fields), progress=False)


def plan(width, height, rx=0, ry=0, scale=None):
    req = Request(prompt="x", width=width, height=height, hires_width=rx, hires_height=ry)
    req.hires_scale = scale
    return hires.upscale(req, 8, 8)


# ------------------------------------------------------------------ A1111's size rules


def test_both_sizes_zero_is_the_scale():
    assert plan(512, 768, scale=1.5) == hires.Upscale((768, 1152))
    assert plan(512, 512, scale=1.3).output == hires.target_size(512, 512, 1.3, 8) == (664, 664)


def test_one_side_keeps_the_aspect_ratio_from_the_other():
    assert plan(64, 48, rx=128) == hires.Upscale((128, 96))  # 128 * 48 // 64
    assert plan(64, 48, ry=96) == hires.Upscale((128, 96))  # 96 * 64 // 48
    assert plan(512, 768, rx=1024).output == (1024, 1536)
    assert plan(768, 512, ry=1000).size == (1496, 1000)  # 1000*768//512 = 1500 -> floored 1496
    assert plan(64, 48, ry=40).size == (48, 40)  # 40*64//48 = 53 -> 48


def test_both_sides_cover_the_target_then_crop_it():
    # 4:3 into 1:1 -> match the height, the width overshoots: 128*64//48 = 170, cut 5 cells
    p = plan(64, 48, rx=128, ry=128)
    assert (p.size, p.crop, p.output) == ((170, 128), (5, 0), (128, 128))
    # 4:3 into 2:1 -> match the width: 192*48//64 = 144 tall, cut (144-96)//8 = 6 cells
    p = plan(64, 48, rx=192, ry=96)
    assert (p.size, p.crop, p.output) == ((192, 144), (0, 6), (192, 96))
    # A1111's numbers for 512x512 to 1024x768: upscale to 1024x1024, 32 cells cut
    p = plan(512, 512, rx=1024, ry=768)
    assert (p.size, p.crop, p.output) == ((1024, 1024), (0, 32), (1024, 768))
    # overshoot under one cell: nothing to cut, the latent grid drops the odd pixel column
    p = plan(48, 40, rx=56, ry=48)
    assert (p.size, p.crop, p.output) == ((57, 48), (0, 0), (56, 48))
    # same aspect: nothing cut; the scale is ignored when a size is set (A1111)
    p = plan(32, 32, rx=64, ry=64, scale=3)
    assert (p.size, p.crop, p.output) == ((64, 64), (0, 0), (64, 64))


# ------------------------------------------------------------------ real pipelines


def two_passes_by_hand(engine, *, size, upscaled, target, upscaler, left=None, steps=4):
    """Pass 1 at `size`, upscaled to `upscaled`, cut to `target` by A1111's truncate formula
    (`samples[:, :, ty//2 : H-(ty+1)//2, tx//2 : W-(tx+1)//2]`, Lanczos: the same cells in
    pixels), pass 2 as diffusers' img2img: the rule written out with diffusers calls."""
    (w, h), (uw, uh), (tw, th) = size, upscaled, target
    f = engine.vae_factor
    tx, ty = (uw - tw) // f, (uh - th) // f
    denoise = 0.7
    pipe = engine.pipeline("txt2img")
    pipe.scheduler = make_scheduler("PNDM", engine.scheduler_config)
    latent = upscaler == "Latent"
    low = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=w,
        height=h,
        generator=[torch.Generator("cpu").manual_seed(7)],
        output_type="latent" if latent else "pil",
    ).images
    if latent:
        init = F.interpolate(low, size=(uh // f, uw // f), mode="bilinear", antialias=False)
        H, W = init.shape[2:]
        if left is None:  # A1111's formula, literally
            init = init[:, :, ty // 2 : H - (ty + 1) // 2, tx // 2 : W - (tx + 1) // 2]
        else:  # another cut of the same size, for the test that the cut matters
            init = init[:, :, ty // 2 : H - (ty + 1) // 2, left : left + tw // f]
    else:
        big = low[0].resize((uw, uh), Image.LANCZOS)
        left, top = (tx // 2 if left is None else left) * f, ty // 2 * f
        init = [big.crop((left, top, left + tw, top + th))]
    schedule_len = int(steps / denoise)
    pipe2 = engine.pipeline("img2img")
    pipe2.scheduler = make_scheduler("PNDM", engine.scheduler_config)
    return pipe2(
        PROMPT,
        image=init,
        strength=(steps + 0.5) / schedule_len,
        num_inference_steps=schedule_len,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(7)],
    ).images


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_cover_and_crop_equals_the_rule_written_out(sd_engine, upscaler):
    # 32x24 (4:3) to 64x64: upscale to 64*32//24 = 85 x 64, then cut (85-64)//f cells of
    # the width (f = 4 here: 5 cells, 2 on the left and 3 on the right)
    fields = dict(width=32, height=24, hires_width=64, hires_height=64, hires_upscaler=upscaler)
    ours = run(sd_engine, **fields)
    assert ours[0].size == (64, 64)
    p = hires.upscale(sd_engine.check(Request(prompt=PROMPT, **fields)), 8, sd_engine.vae_factor)
    assert p.size == (85, 64) and p.crop == ((85 - 64) // sd_engine.vae_factor, 0)
    plain = two_passes_by_hand(
        sd_engine, size=(32, 24), upscaled=(85, 64), target=(64, 64), upscaler=upscaler
    )
    assert np.array_equal(arr(ours[0]), arr(plain[0]))
    # and not just any 64x64 cut: the left-aligned one is another picture
    other = two_passes_by_hand(
        sd_engine, size=(32, 24), upscaled=(85, 64), target=(64, 64), upscaler=upscaler, left=0
    )
    assert not np.array_equal(arr(ours[0]), arr(other[0]))


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_an_overshoot_under_one_cell_still_makes_the_target_size(sd_engine, upscaler):
    fields = dict(width=48, height=40, hires_width=56, hires_height=48, hires_upscaler=upscaler)
    assert run(sd_engine, **fields)[0].size == (56, 48)
    assert hires.output_size(sd_engine.check(Request(prompt="x", **fields)), 8) == (56, 48)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_one_side_runs_as_the_matching_scale(sd_engine, upscaler):
    by_scale = run(sd_engine, hires_scale=2, hires_upscaler=upscaler)
    for fields in (
        {"hires_width": 64},
        {"hires_height": 64},
        {"hires_width": 64, "hires_height": 64},
    ):
        by_size = run(sd_engine, hires_upscaler=upscaler, **fields)
        assert by_size[0].size == (64, 64)
        assert np.array_equal(arr(by_size[0]), arr(by_scale[0])), fields
    by_size = run(sd_engine, hires_height=48, hires_upscaler=upscaler)
    assert np.array_equal(
        arr(by_size[0]), arr(run(sd_engine, hires_scale=1.5, hires_upscaler=upscaler)[0])
    )


def test_the_scale_path_is_unchanged_by_zero_sizes(sd_engine):
    a = run(sd_engine, hires_scale=1.5)
    b = run(sd_engine, hires_scale=1.5, hires_width=0, hires_height=0)
    assert a[0].size == (48, 48) and np.array_equal(arr(a[0]), arr(b[0]))
    assert hires.output_size(
        sd_engine.check(Request(prompt="x", hires_width=64, hires_height=40)), 8
    ) == (64, 40)


def test_bad_target_sizes_name_their_field(sd_engine):
    for field, value in (
        ("hires_width", 33),
        ("hires_height", -8),
        ("hires_width", 4104),
        ("hires_height", 2.5),
    ):
        with pytest.raises(RequestError) as err:
            sd_engine.check(Request(prompt=PROMPT, **{field: value}))
        assert err.value.field == field, (field, value)
    # the cover upscale itself may not exceed the side limit: 2:1 into 64x4096 -> 8192 wide
    with pytest.raises(RequestError) as err:
        sd_engine.check(
            Request(prompt=PROMPT, width=64, height=32, hires_width=64, hires_height=4096)
        )
    assert err.value.field in ("hires_width", "hires_height") and "8192x4096" in str(err.value)
    with pytest.raises(RequestError) as err:
        sd_engine.check(Request(prompt=PROMPT, hires_width=4096, hires_height=4096, num_images=2))
    assert err.value.field == "hires_width" and str(MAX_PIXELS) in str(err.value)


def test_infotext_writes_and_reads_hires_resize(sd_engine):
    result = run(sd_engine, hires_width=64, hires_height=40, hires_steps=3)
    text = result.infotexts[0]
    assert "Size: 32x32" in text and "Hires resize: 64x40, Hires steps: 3" in text
    assert "Hires upscale:" not in text  # A1111 writes one or the other
    again = Request.from_infotext(text)
    assert (again.hires_width, again.hires_height, again.hires_steps) == (64, 40, 3)
    assert np.array_equal(arr(sd_engine.generate(again, progress=False)[0]), arr(result[0]))
    a1111 = Request.from_infotext(
        "x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Denoising strength: 0.5, Hires resize: 1024x0, Hires upscaler: Latent"
    )
    assert (a1111.mode, a1111.hires_width, a1111.hires_height, a1111.hires_denoise) == (
        "txt2img",
        1024,
        0,
        0.5,
    )
    assert not a1111.extra
    assert "Hires resize: 1024x0" in format_infotext(a1111)


def test_every_face_has_the_target_size(sd_engine, tiny_models, tmp_path, capsys):
    from sdkit.bridge import protocol
    from sdkit.bridge.generate import _check_limits
    from sdkit.widgets.controls import RequestControls

    from sdkit.cli import main

    assert {"hires_width", "hires_height"} <= set(modes.get("txt2img").fields)
    argv = ["txt2img", PROMPT, "--model", str(tiny_models["sd"]), "--device", "cpu", "--seed", "7"]
    argv += ["--hires-width", "64", "--hires-height", "40", "--out", str(tmp_path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "1 image(s) 64x40" in err
    saved = Request.from_png(out.split()[0])
    assert (saved.hires_width, saved.hires_height) == (64, 40)

    c = RequestControls(modes=[modes.get("txt2img").describe()])
    assert c.rows["hires_width"].layout.display != "none"
    c.prompt.value = "x"
    c.hires_width.value, c.hires_height.value = 64, 40
    r = c.request()
    assert (r.hires_width, r.hires_height, r.hires_scale) == (64, 40, None)
    c.set_request(Request(prompt="y"))
    assert (c.hires_width.value, c.hires_height.value) == (0, 0)

    req = Request.from_dict({"prompt": "x", "width": 64, "height": 64, "hires_width": 128})
    with pytest.raises(protocol.ProtocolError) as e:  # the bridge's limit counts the target
        _check_limits(req, protocol.Limits(max_pixels=100 * 100), "r", sd_engine)
    assert e.value.field == "request.hires_width" and "128x128" in str(e.value)


# ------------------------------------------------------------------ prompt editing, pass 2


def test_pass_2_schedule_counts_the_first_pass_first():
    # A1111's own doctests (10 base steps, 10 hires steps)
    assert schedule("a [b:.5] c", 10, first_pass=10) == [(10, "a b c")]
    assert schedule("a [b:1.5] c", 10, first_pass=10) == [(5, "a  c"), (10, "a b c")]
    assert schedule("[a:b:0.5]", 10, first_pass=20) == [(10, "b")]  # fractions <= 1: pass 1's
    assert schedule("[a:b:25]", 10, first_pass=20) == [(5, "a"), (10, "b")]
    assert schedule("[a:b:15]", 10, first_pass=20) == [(10, "b")]  # switched in pass 1
    assert schedule("[a:b:40]", 10, first_pass=20) == [(10, "a")]
    assert schedule("[a|b]", 3, first_pass=20) == [(1, "a"), (2, "b"), (3, "a")]  # every step
    assert schedule("[a:b:25]", 10, first_pass=20, old_timelines=True) == [(10, "a")]
    assert schedule("[a:b:25]", 20) == [(20, "a")]  # pass 1 itself is unchanged


def _conditions_per_unet_call(engine, request):
    """The positive text conditioning of every UNet call of one job."""
    seen = []
    unet = engine.pipeline("txt2img").unet
    handle = unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"][-1].clone()),
        with_kwargs=True,
    )
    try:
        engine.generate(request, progress=False)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    ("prompt", "steps", "hires_steps", "pass1", "pass2"),
    [
        # [a:b:0.5] over 4 steps: a at steps 0..2, b at 3; pass 2: b throughout
        ("[a red circle:a blue square:0.5]", 4, 3, "aaab", "bbb"),
        # [a:b:25] after 20 steps, 10 hires steps: a until pass 2's step 5, then b
        ("[a red circle:a blue square:25]", 20, 10, "a" * 20, "aaaaaabbbb"),
    ],
)
def test_pass_2_switches_the_conditioning_on_a1111s_timeline(
    sd_engine, prompt, steps, hires_steps, pass1, pass2
):
    req = Request(
        prompt=prompt,
        seed=1,
        num_inference_steps=steps,
        hires_scale=2,
        hires_steps=hires_steps,
        hires_denoise=0.5,
        scheduler="Euler",  # one UNet call per step
    )
    seen = _conditions_per_unet_call(sd_engine, req)
    assert len(seen) == steps + hires_steps
    pipe = sd_engine.pipeline("txt2img")
    want = {
        k: conditioning.encode_texts(pipe, pipe.text_encoder, pipe.tokenizer, [text], 1, False)[0][
            0
        ]
        for k, text in (("a", "a red circle"), ("b", "a blue square"))
    }
    assert not torch.allclose(want["a"], want["b"], atol=1e-3)
    got = ""
    for cond in seen:
        match = [k for k, v in want.items() if torch.allclose(cond, v, atol=1e-5)]
        assert len(match) == 1
        got += match[0]
    assert got == pass1 + pass2
