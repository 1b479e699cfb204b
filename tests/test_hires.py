"""Hires fix (issue 14.5) on tiny real pipelines: two passes equal to the same two diffusers
calls, target size, A1111's step rule, progress over both passes, cancel in pass 2, seeds,
limits, and no change at all when it is off."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdkit import hires
from sdkit.engine import JobCancelled
from sdkit.request import MAX_PIXELS, Request, RequestError
from sdkit.schedulers import make_scheduler

PROMPT = "a red circle on a blue background"


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def run(engine, **fields):
    return engine.generate(Request(prompt=PROMPT, seed=7, **fields), progress=False)


def plain_two_passes(engine, *, scale, upscaler, denoise, hires_steps=0, seed=7, n=1, steps=4):
    """The two passes written out with diffusers calls, as a diffusers user would."""
    w = h = 32
    tw, th = hires.target_size(w, h, scale, engine.size_multiple)
    pipe = engine.pipeline("txt2img")
    pipe.scheduler = make_scheduler("PNDM", engine.scheduler_config)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    latent = upscaler == "Latent"
    low = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=w,
        height=h,
        num_images_per_prompt=n,
        generator=gens,
        output_type="latent" if latent else "pil",
    ).images
    if latent:
        f = engine.vae_factor
        init = F.interpolate(low, size=(th // f, tw // f), mode="bilinear", antialias=False)
    else:
        init = [im.resize((tw, th), Image.LANCZOS) for im in low]
    k = hires_steps or steps
    schedule = max(k, int(k / min(denoise, 0.999)))
    pipe2 = engine.pipeline("img2img")
    pipe2.scheduler = make_scheduler("PNDM", engine.scheduler_config)
    out = pipe2(
        PROMPT,
        image=init,
        strength=(k + 0.5) / schedule if schedule > k else 1.0,
        num_inference_steps=schedule,
        guidance_scale=7.5,
        num_images_per_prompt=n,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
    ).images
    return out, k


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_two_passes_equal_the_diffusers_calls_at_the_target_size(sd_engine, upscaler):
    ours = run(sd_engine, hires_scale=2, hires_upscaler=upscaler, hires_denoise=0.6)
    plain, _ = plain_two_passes(sd_engine, scale=2, upscaler=upscaler, denoise=0.6)
    assert ours[0].size == (64, 64)
    assert np.array_equal(arr(ours[0]), arr(plain[0]))


def test_latent_and_lanczos_differ(sd_engine):
    a = run(sd_engine, hires_scale=2, hires_upscaler="Latent")
    b = run(sd_engine, hires_scale=2, hires_upscaler="Lanczos")
    assert a[0].size == b[0].size == (64, 64)
    assert np.abs(arr(a[0]).astype(int) - arr(b[0]).astype(int)).mean() > 1


def test_target_size_rounds_down_to_the_size_multiple(sd_engine):
    assert hires.target_size(512, 768, 1.5, 8) == (768, 1152)
    assert hires.target_size(512, 512, 1.3, 8) == (664, 664)  # int(665.6) = 665 -> 664
    assert hires.target_size(1024, 1024, 1.25, 64) == (1280, 1280)
    checked = sd_engine.check(Request(prompt=PROMPT, hires_scale=1.3))
    assert hires.output_size(checked, sd_engine.size_multiple) == (40, 40)
    assert hires.output_size(sd_engine.check(Request(prompt=PROMPT)), 8) == (32, 32)
    result = run(sd_engine, hires_scale=1.3)  # 32 * 1.3 = 41.6 -> 41 -> 40
    assert result[0].size == (40, 40)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 15, 20, 28, 37, 150])
@pytest.mark.parametrize("denoise", [0.001, 0.05, 0.3, 0.45, 0.5, 0.7, 0.75, 0.999, 1.0])
def test_second_pass_runs_hires_steps_of_a1111s_stretched_schedule(steps, denoise):
    p2 = hires.second_pass(
        Request(prompt="x", num_inference_steps=4, hires_steps=steps, hires_denoise=denoise)
    )
    assert p2.schedule == max(steps, int(steps / min(denoise, 0.999)))  # setup_img2img_steps
    assert p2.steps == steps
    assert min(int(p2.schedule * p2.strength), p2.schedule) == steps  # what diffusers runs
    assert 0 < p2.strength <= 1


def test_hires_steps_zero_means_num_inference_steps():
    p2 = hires.second_pass(Request(prompt="x", num_inference_steps=20, hires_denoise=0.7))
    assert (p2.steps, p2.schedule) == (20, 28)


def test_progress_counts_both_passes_with_one_total_and_target_size_previews(sd_engine):
    events = []
    job = sd_engine.submit(
        Request(prompt=PROMPT, seed=1, hires_scale=2, hires_steps=3, hires_denoise=0.6),
        callback=lambda kind, job, ev: events.append(ev) if kind == "progress" else None,
    )
    job.result(timeout=120)
    assert job.wait_delivered(30)
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6, 7]  # 4 first-pass + 3 hires steps
    assert {e.total for e in events} == {7}
    assert [e.preview.size for e in events] == [(32, 32)] * 4 + [(64, 64)] * 3


def test_cancel_during_the_second_pass(sd_engine):
    kinds, steps, at_cancel = [], [], []

    def on_event(kind, job, ev):
        kinds.append(kind)
        if kind == "progress":
            steps.append(ev.step)
            if ev.step == 5:  # the first step of pass 2 (pass 1 has 4)
                at_cancel.append(job.progress.step)
                job.cancel()

    job = sd_engine.submit(
        Request(
            prompt=PROMPT,
            seed=1,
            hires_scale=2,
            hires_steps=200,
            hires_denoise=1.0,
            scheduler="Euler",
        ),
        callback=on_event,
    )
    with pytest.raises(JobCancelled):
        job.result(timeout=120)
    assert job.wait_delivered(30)
    assert job.state == "cancelled" and job._result is None
    assert steps[:5] == [1, 2, 3, 4, 5] and max(steps) <= at_cancel[0] + 1 < 204
    assert kinds[-1] == "cancelled" and "done" not in kinds


def test_cancel_during_the_second_pass_stops_inside_a_unet_step(sd_engine):
    """Cancelled from inside pass 2's first UNet call: no later UNet block completes."""
    unet = sd_engine.pipeline("txt2img").unet
    block, watched = unet.up_blocks[0].resnets[0], unet.up_blocks[0].attentions[0]
    calls, after, box = [0], [], []
    pass2 = threading.Event()

    def cancel(mod, args):
        calls[0] += 1
        if args[0].shape[-1] == 8 and not pass2.is_set():  # 64 px: 8x8 here (32 px: 4x4)
            pass2.set()
            box[0].cancel()

    def completed(mod, args, out):
        if box[0].cancel_requested:
            after.append(1)

    hooks = [block.register_forward_pre_hook(cancel), watched.register_forward_hook(completed)]
    try:
        job = sd_engine.submit(Request(prompt=PROMPT, seed=1, hires_scale=2), preview_every=0)
        box.append(job)
        with pytest.raises(JobCancelled):
            job.result(timeout=120)
    finally:
        for h in hooks:
            h.remove()
    assert pass2.is_set() and job.state == "cancelled" and after == []


def test_seed_rule_image_i_equals_a_run_at_seed_plus_i(sd_engine):
    for upscaler in ("Latent", "Lanczos"):
        batch = sd_engine.generate(
            Request(prompt=PROMPT, seed=11, num_images=2, hires_scale=1.5, hires_upscaler=upscaler),
            progress=False,
        )
        single = sd_engine.generate(
            Request(prompt=PROMPT, seed=12, hires_scale=1.5, hires_upscaler=upscaler),
            progress=False,
        )
        assert batch.seeds == [11, 12]
        assert np.array_equal(arr(batch[1]), arr(single[0])), upscaler
        plain, _ = plain_two_passes(
            sd_engine, scale=1.5, upscaler=upscaler, denoise=0.7, seed=11, n=2
        )
        assert all(np.array_equal(arr(a), arr(b)) for a, b in zip(batch, plain, strict=True))


def test_hires_off_is_todays_output(sd_engine):
    base = run(sd_engine)
    pipe = sd_engine.pipeline("txt2img")
    pipe.scheduler = make_scheduler("PNDM", sd_engine.scheduler_config)
    plain = pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=7.5,
        width=32,
        height=32,
        generator=[torch.Generator("cpu").manual_seed(7)],
    ).images
    assert np.array_equal(arr(base[0]), arr(plain[0]))
    for off in (None, 1, 1.0):
        other = run(sd_engine, hires_scale=off, hires_steps=9, hires_upscaler="Lanczos")
        assert other[0].size == (32, 32)
        assert np.array_equal(arr(other[0]), arr(base[0])), off


def test_too_large_target_is_a_request_error_naming_hires_scale(sd_engine):
    with pytest.raises(RequestError) as err:
        sd_engine.check(Request(prompt=PROMPT, width=2048, height=1024, hires_scale=2.5))
    assert err.value.field == "hires_scale" and "5120x2560" in str(err.value)
    # per side fine, but the job's pixels (num_images included) over MAX_PIXELS
    with pytest.raises(RequestError) as err:
        sd_engine.check(
            Request(prompt=PROMPT, width=2048, height=1024, hires_scale=2, num_images=3)
        )
    assert err.value.field == "hires_scale" and str(MAX_PIXELS) in str(err.value)
    ok = sd_engine.check(
        Request(prompt=PROMPT, width=2048, height=1024, hires_scale=2, num_images=2)
    )
    assert ok.hires_scale == 2 and (ok.width, ok.height) == (2048, 1024)  # first-pass size


def test_schedule_longer_than_the_training_timesteps_is_refused(sd_engine):
    with pytest.raises(RequestError) as err:
        sd_engine.check(Request(prompt=PROMPT, hires_scale=2, hires_steps=100, hires_denoise=0.05))
    assert err.value.field == "hires_denoise" and "2000" in str(err.value)


def test_bad_hires_fields_name_themselves(sd_engine):
    for field, value in (
        ("hires_scale", 5),
        ("hires_scale", 0.5),
        ("hires_steps", -1),
        ("hires_denoise", 0),
        ("hires_upscaler", "ESRGAN"),
    ):
        with pytest.raises(RequestError) as err:
            sd_engine.check(Request(prompt=PROMPT, **{field: value}))
        assert err.value.field == field


def test_an_inpainting_unet_refuses_hires_naming_the_field_asked(inpaint_engine):
    for asked, value in (("hires_scale", 2), ("hires_width", 128), ("hires_height", 128)):
        with pytest.raises(RequestError) as err:
            inpaint_engine.check(Request(prompt=PROMPT, **{asked: value}))
        assert err.value.field == asked


def test_sdxl_hires_both_upscalers(sdxl_engine):
    for upscaler in ("Latent", "Lanczos"):
        result = sdxl_engine.generate(
            Request(prompt=PROMPT, seed=3, hires_scale=2, hires_upscaler=upscaler),
            progress=False,
        )
        assert result[0].size == (64, 64)
        assert arr(result[0]).std() > 0


def test_result_infotext_records_hires_and_reruns(sd_engine):
    result = run(
        sd_engine, hires_scale=2, hires_steps=3, hires_denoise=0.6, hires_upscaler="Lanczos"
    )
    text = result.infotexts[0]
    assert "Size: 32x32" in text  # A1111 records the first-pass size
    assert "Denoising strength: 0.6, " in text and "Hires upscale: 2, Hires steps: 3, " in text
    assert "Hires upscaler: Lanczos" in text
    again = sd_engine.generate(Request.from_infotext(text), progress=False)
    assert np.array_equal(arr(again[0]), arr(result[0]))


def test_an_a1111_text_runs_its_hires_fix_and_clip_skip(sd_engine):
    text = (
        f"{PROMPT}\n"
        "Steps: 4, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 32x32, Model hash: 0123abcd, "
        "Denoising strength: 0.6, Clip skip: 2, Hires upscale: 2, Hires steps: 3, "
        "Hires upscaler: R-ESRGAN 4x+, Version: v1.10.1"
    )
    parsed = Request.from_infotext(text)
    got = sd_engine.generate(parsed, progress=False)
    fields = dict(num_inference_steps=4, scheduler="Euler", guidance_scale=7, seed=9)
    want = sd_engine.generate(
        Request(
            prompt=PROMPT,
            width=32,
            height=32,
            clip_skip=2,
            hires_scale=2,
            hires_steps=3,
            hires_denoise=0.6,
            hires_upscaler="Lanczos",  # the nearest upscaler sdkit has
            **fields,
        ),
        progress=False,
    )
    assert got[0].size == (64, 64)
    assert np.array_equal(arr(got[0]), arr(want[0]))
    without = sd_engine.generate(Request(prompt=PROMPT, clip_skip=2, **fields), progress=False)
    assert without[0].size == (32, 32)
    assert "Hires upscaler: R-ESRGAN 4x+" in got.infotexts[0]  # written back as it came


def test_txt2img_spec_lists_the_hires_fields(sd_engine):
    spec = next(m for m in sd_engine.info()["modes"] if m["name"] == "txt2img")
    for name in ("hires_scale", "hires_steps", "hires_denoise", "hires_upscaler"):
        assert name in spec["fields"]


# ------------------------------------------------------------------ the embedded model


def _edge_energy(image: Image.Image) -> float:
    """Mean gradient magnitude of the grey image: how sharp the edges are."""
    a = np.asarray(image.convert("L"), dtype=float)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


@pytest.mark.slow
def test_embedded_model_2x_keeps_the_picture_and_draws_sharper_than_resizing():
    """What hires fix is for: at 2x the second pass keeps the first pass's picture (colours
    by the project's classifier) and, from a Lanczos-upscaled first pass at low denoise,
    redraws its edges sharper than the resize alone."""
    import sdkit
    from sdkit.embedded import shapes

    engine = sdkit.load()
    try:
        for seed in range(4):
            req = Request(prompt=PROMPT, seed=seed)
            plain = engine.generate(req, progress=False)[0]
            for upscaler, denoise in (("Lanczos", 0.3), ("Latent", 0.5)):
                hi = engine.generate(
                    Request(
                        prompt=PROMPT,
                        seed=seed,
                        hires_scale=2,
                        hires_upscaler=upscaler,
                        hires_denoise=denoise,
                    ),
                    progress=False,
                )[0]
                assert hi.size == (128, 128)
                j = shapes.classify(hi)
                assert (j.colour, j.background) == ("red", "blue"), (seed, upscaler)
                if upscaler == "Lanczos":  # measured 1.17..1.26x; a no-op pass 2 gives ~1x
                    resized = plain.resize((128, 128), Image.LANCZOS)
                    assert _edge_energy(hi) > 1.1 * _edge_energy(resized), seed
    finally:
        engine.close()


def test_cli_hires_flags_make_the_api_picture_and_say_its_size(
    sd_engine, tiny_models, tmp_path, capsys
):
    from sdkit.cli import main

    argv = ["txt2img", PROMPT, "--model", str(tiny_models["sd"]), "--device", "cpu"]
    argv += ["--seed", "7", "--hires-scale", "2", "--hires-steps", "3", "--hires-denoise", "0.6"]
    argv += ["--hires-upscaler", "Lanczos", "--out", str(tmp_path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    path = out.split()[0]
    assert "1 image(s) 64x64" in err  # the output's size, not the first pass's
    saved = Image.open(path)
    req = Request.from_png(path)
    assert (req.hires_scale, req.hires_steps, req.hires_denoise) == (2, 3, 0.6)
    assert req.hires_upscaler == "Lanczos" and (req.width, req.height) == (32, 32)
    api = run(sd_engine, hires_scale=2, hires_steps=3, hires_denoise=0.6, hires_upscaler="Lanczos")
    assert saved.size == (64, 64)
    assert np.array_equal(arr(saved.convert("RGB")), arr(api[0]))
