"""img2img, inpaint (4- and 9-channel), SDXL, unconditional models, and Result round trips.

"Plain diffusers" below is the call a diffusers user writes on the engine's own
components. For inpainting we compare the same thing twice: the plain inpaint pipeline
fed the same prepared inputs (grown + feathered mask, fill) and composited over the
original the same documented way, against what sdkit returns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdkit import masks
from sdkit.fitting import fit_image
from sdkit.request import Request
from sdkit.schedulers import make_scheduler

PROMPT = "a green triangle on a white background"


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def gens(seed: int, n: int = 1) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def picture(size=(32, 32)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def square_mask(size=(32, 32), box=(10, 10, 22, 22)) -> Image.Image:
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    return m


def plain(engine, mode, scheduler="PNDM"):
    pipe = engine.pipeline(mode)
    pipe.scheduler = make_scheduler(scheduler, engine.scheduler_config)
    return pipe


# ------------------------------------------------------------------------ img2img


def test_img2img_equals_plain_diffusers(sd_engine):
    init = picture()
    ours = sd_engine.img2img(
        init,
        PROMPT,
        seed=4,
        num_inference_steps=4,
        strength=0.6,
        scheduler="Euler a",
        progress=False,
    )
    ref = plain(sd_engine, "img2img", "Euler a")(
        PROMPT,
        image=init,
        strength=0.6,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=gens(4),
    ).images
    assert np.array_equal(arr(ours[0]), arr(ref[0]))
    assert "Denoising strength: 0.6" in ours.infotexts[0]


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_img2img_other_size_is_fit_by_resize_mode(sd_engine, mode):
    init = picture((48, 24))
    ours = sd_engine.img2img(
        init,
        PROMPT,
        seed=1,
        num_inference_steps=2,
        strength=1.0,
        width=32,
        height=32,
        resize_mode=mode,
        progress=False,
    )
    assert ours[0].size == (32, 32)
    fitted = fit_image(init, 32, 32, mode)
    ref = plain(sd_engine, "img2img")(
        PROMPT,
        image=fitted,
        strength=1.0,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=gens(1),
    ).images
    assert np.array_equal(arr(ours[0]), arr(ref[0]))


def test_fit_image_modes():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # blue left quarter
    assert fit_image(wide, 20, 20, "resize").getpixel((1, 10))[2] > 200  # squeezed, blue kept
    assert fit_image(wide, 20, 20, "crop").getpixel((1, 10))[0] > 200  # centre crop: blue cut off
    filled = fit_image(wide, 20, 20, "fill")
    assert filled.size == (20, 20) and filled.getpixel((10, 10))[0] > 200


def test_img2img_uses_input_size_rounded_to_vae_factor(sd_engine):
    r = sd_engine.img2img(
        picture((34, 30)), PROMPT, seed=1, num_inference_steps=2, strength=0.5, progress=False
    )
    assert r[0].size == (
        32,
        24,
    )  # rounded down to a multiple of 8, diffusers' txt2img rule, for every mode


# ------------------------------------------------------------------------ inpaint


def _plain_inpaint(
    engine, image, mask, *, grow, blur, fill, seed, steps, strength, scheduler="PNDM"
):
    soft = masks.prepare_mask(mask, grow, blur)
    filled = masks.fill_masked(image, soft, fill, seed=seed)
    out = plain(engine, "inpaint", scheduler)(
        PROMPT,
        image=filled,
        mask_image=soft,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=image.width,
        height=image.height,
        generator=gens(seed),
    ).images[0]
    return out, masks.composite(image, out, soft), soft


@pytest.mark.parametrize("engine_name", ["sd_engine", "inpaint_engine"])
@pytest.mark.parametrize("fill", ["original", "fill", "noise"])
def test_inpaint_equals_plain_diffusers_and_keeps_outside_pixels(request, engine_name, fill):
    engine = request.getfixturevalue(engine_name)
    image, mask = picture(), square_mask()
    ours = engine.inpaint(
        image,
        mask,
        PROMPT,
        seed=9,
        num_inference_steps=4,
        strength=0.8,
        grow=2,
        mask_blur=2,
        fill=fill,
        progress=False,
    )
    raw, composited, soft = _plain_inpaint(
        engine, image, mask, grow=2, blur=2, fill=fill, seed=9, steps=4, strength=0.8
    )
    assert np.array_equal(arr(ours[0]), arr(composited))
    outside = arr(soft) == 0
    assert outside.sum() > 0.3 * outside.size
    assert np.array_equal(arr(ours[0])[outside], arr(image)[outside])  # zero pixels changed
    inside = arr(soft) == 255
    assert np.array_equal(arr(ours[0])[inside], arr(raw)[inside])  # the model's pixels inside
    assert not np.array_equal(arr(ours[0])[inside], arr(image)[inside])


def test_inpaint_uses_nine_channel_unet_as_such(inpaint_engine):
    assert (
        inpaint_engine.inpainting_unet
        and inpaint_engine.pipeline("inpaint").unet.config.in_channels == 9
    )
    # txt2img and img2img on an inpainting model run through its own pipeline, whole-image mask
    r = inpaint_engine.txt2img(PROMPT, seed=1, num_inference_steps=2, progress=False)
    assert r[0].size == (32, 32)
    r2 = inpaint_engine.img2img(
        picture(), PROMPT, seed=1, num_inference_steps=2, strength=0.5, progress=False
    )
    assert r2[0].size == (32, 32)


@pytest.mark.parametrize("grow,blur", [(0, 0), (3, 4)])
def test_only_masked_crops_pastes_back_and_keeps_outside_pixels(sd_engine, grow, blur):
    image = picture((64, 48))
    mask = square_mask((64, 48), (40, 8, 50, 18))
    ours = sd_engine.inpaint(
        image,
        mask,
        PROMPT,
        seed=3,
        num_inference_steps=3,
        only_masked=True,
        padding=4,
        grow=grow,
        mask_blur=blur,
        width=32,
        height=32,
        progress=False,
    )
    assert ours[0].size == image.size
    soft = masks.prepare_mask(mask, grow, blur)
    outside = arr(soft) == 0
    assert np.array_equal(arr(ours[0])[outside], arr(image)[outside])
    changed = (arr(ours[0]) != arr(image)).any(axis=-1)
    assert changed[arr(soft) > 128].mean() > 0.5  # the masked area was repainted
    assert ours.request.only_masked


def test_inpaint_image_of_odd_size_still_keeps_every_outside_pixel(sd_engine):
    image, mask = picture((35, 33)), square_mask((35, 33), (5, 5, 15, 15))
    r = sd_engine.inpaint(
        image, mask, PROMPT, seed=2, num_inference_steps=2, mask_blur=1, progress=False
    )
    assert r[0].size == (35, 33)
    outside = arr(masks.prepare_mask(mask, 0, 1)) == 0
    assert np.array_equal(arr(r[0])[outside], arr(image)[outside])


# ------------------------------------------------------------------------ SDXL


def test_sdxl_modes_equal_plain_diffusers(sdxl_engine):
    assert sdxl_engine.family == "sdxl"
    ours = sdxl_engine.txt2img(PROMPT, seed=6, num_inference_steps=3, progress=False)
    ref = plain(sdxl_engine, "txt2img")(
        PROMPT, num_inference_steps=3, guidance_scale=7.5, width=32, height=32, generator=gens(6)
    ).images
    assert np.array_equal(arr(ours[0]), arr(ref[0]))
    init = picture()
    ours = sdxl_engine.img2img(
        init, PROMPT, seed=6, num_inference_steps=4, strength=0.5, progress=False
    )
    ref = plain(sdxl_engine, "img2img")(
        PROMPT,
        image=init,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=gens(6),
    ).images
    assert np.array_equal(arr(ours[0]), arr(ref[0]))
    mask = square_mask()
    ours = sdxl_engine.inpaint(
        init, mask, PROMPT, seed=6, num_inference_steps=4, strength=0.9, progress=False
    )
    soft = masks.prepare_mask(mask, 0, 4)
    raw = plain(sdxl_engine, "inpaint")(
        PROMPT,
        image=init,
        mask_image=soft,
        strength=0.9,
        num_inference_steps=4,
        guidance_scale=7.5,
        width=32,
        height=32,
        generator=gens(6),
    ).images[0]
    assert np.array_equal(arr(ours[0]), arr(masks.composite(init, raw, soft)))
    assert sdxl_engine.pipeline("inpaint").unet is sdxl_engine.pipeline("txt2img").unet


# ------------------------------------------------------------------ unconditional-only


@pytest.mark.parametrize("scheduler", ["DDPM", "DDIM"])
def test_unconditional_only_model_uses_its_own_pipeline(ddpm_engine, scheduler):
    from diffusers import DDIMPipeline, DDPMPipeline

    assert ddpm_engine.family == "unconditional"
    events = []
    job = ddpm_engine.submit(
        Request(
            mode="unconditional", seed=8, num_images=2, num_inference_steps=4, scheduler=scheduler
        ),
        callback=lambda kind, job, ev: events.append(ev) if kind == "progress" else None,
    )
    ours = job.result(timeout=120)
    assert job.wait_delivered(30)
    cls = DDPMPipeline if scheduler == "DDPM" else DDIMPipeline
    pipe = ddpm_engine.pipeline(cls.__name__)
    assert isinstance(pipe, cls) and pipe.unet is ddpm_engine.model.pipe.unet
    pipe.scheduler = make_scheduler(scheduler, ddpm_engine.scheduler_config)
    ref = pipe(batch_size=2, generator=gens(8, 2), num_inference_steps=4).images
    assert [e.step for e in events] == [1, 2, 3, 4] and events[-1].preview is not None
    assert ours.seeds == [8, 9] and ours[0].size == (16, 16)
    assert np.array_equal(arr(ours[0]), arr(ref[0])) and np.array_equal(arr(ours[1]), arr(ref[1]))


def test_unconditional_only_model_refuses_text_modes(ddpm_engine):
    from sdkit.request import RequestError

    with pytest.raises(RequestError) as err:
        ddpm_engine.txt2img("a red circle", progress=False)
    assert err.value.field == "mode" and "unconditional" in str(err.value)
    with pytest.raises(RequestError) as err:
        ddpm_engine.unconditional(width=32, height=32, progress=False)
    assert err.value.field == "width"
    with pytest.raises(RequestError) as err:
        ddpm_engine.unconditional(scheduler="Euler a", progress=False)
    assert err.value.field == "scheduler"


# ------------------------------------------------------------------------ Result


def test_saved_png_recreates_the_request_and_reruns_identically(sd_engine, tmp_path):
    r = sd_engine.txt2img(
        PROMPT,
        seed=21,
        num_inference_steps=3,
        scheduler="DPM++ 2M Karras",
        negative_prompt="blurry, dark",
        num_images=2,
        progress=False,
    )
    paths = r.save(tmp_path)
    assert [p.name for p in paths] == ["sdkit-21-0.png", "sdkit-22-0.png"]
    req = Request.from_png(paths[1])
    assert (req.seed, req.scheduler, req.negative_prompt) == (22, "DPM++ 2M Karras", "blurry, dark")
    rerun = sd_engine.generate(req, progress=False)
    assert np.array_equal(arr(rerun[0]), arr(Image.open(paths[1]).convert("RGB")))


def test_result_displays_in_notebooks(sd_engine, tmp_path):
    r = sd_engine.txt2img(PROMPT, seed=1, num_inference_steps=2, num_images=2, progress=False)
    html = r._repr_html_()
    assert html.count("<img") == 2 and "seed 2" in html
    assert r._repr_png_().startswith(b"\x89PNG")
    assert r.grid().size == (64, 32)
    assert set(r.timings) >= {"total", "per_step", "queued"}
    one = r.save(tmp_path / "one.png")
    assert [p.name for p in one] == ["one-0.png", "one-1.png"]
