"""Engine on real (tiny) diffusers pipelines: identity with plain diffusers, seeds, jobs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from sdkit.engine import JobCancelled, ProgressEvent
from sdkit.request import Request, RequestError
from sdkit.schedulers import make_scheduler

PROMPT = "a red circle on a blue background"


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def plain_txt2img(
    engine, *, prompt=PROMPT, seed=1, steps=3, scheduler="PNDM", n=1, guidance=7.5, negative=None
):
    """What a diffusers user writes, on the engine's own components."""
    pipe = engine.pipeline("txt2img")
    pipe.scheduler = make_scheduler(scheduler, engine.scheduler_config)
    if hasattr(
        pipe.scheduler, "noise_sampler_seed"
    ):  # DPM++ SDE: else seeded from torch's global RNG
        pipe.scheduler.noise_sampler_seed = [seed + i for i in range(n)]
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    return pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=32,
        height=32,
        num_images_per_prompt=n,
        generator=gens,
    ).images


def test_txt2img_equals_plain_diffusers(sd_engine):
    ours = sd_engine.txt2img(
        PROMPT, seed=5, num_inference_steps=3, negative_prompt="green", progress=False
    )
    plain = plain_txt2img(sd_engine, seed=5, negative="green")
    assert ours.seeds == [5]
    assert np.array_equal(arr(ours[0]), arr(plain[0]))


@pytest.mark.parametrize(
    "scheduler",
    [
        "PNDM",
        "DDIM",
        "LMS",
        "LMS Karras",
        "Euler",
        "Euler a",
        "Heun",
        "DPM2",
        "DPM2 a",
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DPM++ 2M SDE (Karras)",
        "DPM++ SDE (Karras)",
        "UniPC",
        "LCM",
        "DEIS",
        "EulerDiscreteScheduler",
        "DPMSolverSinglestepScheduler",
    ],
)
def test_every_scheduler_equals_plain_diffusers(sd_engine, scheduler):
    ours = sd_engine.txt2img(
        PROMPT, seed=2, num_inference_steps=3, scheduler=scheduler, progress=False
    )
    plain = plain_txt2img(sd_engine, seed=2, scheduler=scheduler)
    assert np.array_equal(arr(ours[0]), arr(plain[0])), scheduler
    assert ours.request.scheduler is not None
    again = sd_engine.txt2img(
        PROMPT, seed=2, num_inference_steps=3, scheduler=scheduler, progress=False
    )
    assert np.array_equal(arr(ours[0]), arr(again[0])), f"{scheduler} not reproducible"


def test_same_seed_same_image_and_batch_uses_seed_plus_i(sd_engine):
    a = sd_engine.txt2img(PROMPT, seed=11, num_inference_steps=3, progress=False)
    b = sd_engine.txt2img(PROMPT, seed=11, num_inference_steps=3, progress=False)
    assert np.array_equal(arr(a[0]), arr(b[0]))
    batch = sd_engine.txt2img(PROMPT, seed=11, num_inference_steps=3, num_images=3, progress=False)
    assert batch.seeds == [11, 12, 13]
    assert "Seed: 12" in batch.infotexts[1]
    # image 0 of the batch is seed 11's image; image 1 is seed 12's (batched kernels may
    # round differently from a single run, so allow float noise, nothing more)
    single_12 = sd_engine.txt2img(PROMPT, seed=12, num_inference_steps=3, progress=False)
    assert np.abs(arr(batch[0]).astype(int) - arr(a[0]).astype(int)).max() <= 1
    assert np.abs(arr(batch[1]).astype(int) - arr(single_12[0]).astype(int)).max() <= 1
    assert not np.array_equal(arr(batch[0]), arr(batch[1]))
    assert np.array_equal(arr(batch[1]), arr(plain_txt2img(sd_engine, seed=11, n=3)[1]))


def test_no_seed_draws_one_and_reports_it(sd_engine):
    r = sd_engine.txt2img(PROMPT, num_inference_steps=2, progress=False)
    assert isinstance(r.seeds[0], int) and r.request.seed == r.seeds[0]
    again = sd_engine.txt2img(PROMPT, seed=r.seeds[0], num_inference_steps=2, progress=False)
    assert np.array_equal(arr(r[0]), arr(again[0]))


def test_model_defaults_fill_the_request(sd_engine):
    job = sd_engine.submit(Request(prompt=PROMPT))
    job.result(timeout=120)
    req = job.request
    assert (req.width, req.height, req.num_inference_steps, req.scheduler) == (32, 32, 4, "PNDM")
    assert req.guidance_scale == 7.5 and req.model == sd_engine.model.name


@pytest.mark.parametrize("scheduler,steps", [("PNDM", 5), ("Euler", 4), ("Heun", 3), ("DPM2 a", 3)])
def test_progress_event_count_equals_steps(sd_engine, scheduler, steps):
    events: list[ProgressEvent] = []
    job = sd_engine.submit(
        Request(prompt=PROMPT, num_inference_steps=steps, scheduler=scheduler),
        callback=lambda kind, job, ev: events.append(ev) if kind == "progress" else None,
    )
    job.result(timeout=120)
    assert job.wait_delivered(30)  # listeners run on the dispatcher thread
    assert [e.step for e in events] == list(range(1, steps + 1))
    assert all(e.total == steps for e in events)
    assert all(e.elapsed >= 0 for e in events)
    assert events[-1].preview is not None and events[-1].preview.size == (32, 32)


def test_img2img_progress_counts_strength_steps(sd_engine):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    events = []
    job = sd_engine.submit(
        Request(mode="img2img", image=image, prompt=PROMPT, num_inference_steps=10, strength=0.5),
        callback=lambda kind, job, ev: events.append(ev) if kind == "progress" else None,
    )
    job.result(timeout=120)
    assert job.wait_delivered(30)  # listeners run on the dispatcher thread
    assert [e.step for e in events] == [1, 2, 3, 4, 5] and events[0].total == 5


def test_cancel_mid_run_stops_and_leaves_no_images(sd_engine):
    kinds, steps, at_cancel = [], [], []

    def on_event(kind, job, ev):
        kinds.append(kind)
        if kind == "progress":
            steps.append(ev.step)
            if ev.step == 2:
                at_cancel.append(job.progress.step)  # where the worker is now
                job.cancel()

    job = sd_engine.submit(
        Request(prompt=PROMPT, num_inference_steps=200, scheduler="Euler"), callback=on_event
    )
    with pytest.raises(JobCancelled):
        job.result(timeout=120)
    assert job.wait_delivered(30)
    assert job.state == "cancelled" and job.done()
    # listeners run off the worker, so the worker may be ahead of the listener; it stops
    # within one step of where it was when cancel() was called
    assert steps[:2] == [1, 2] and max(steps) <= at_cancel[0] + 1 < 200
    assert kinds[-1] == "cancelled" and "done" not in kinds
    assert job._result is None


def test_cancel_queued_job_never_runs_and_fifo_order(sd_engine):
    gate, running = threading.Event(), threading.Event()
    order = []

    def hold(module, args):  # on the worker thread: keeps the first job running
        running.set()
        assert gate.wait(60)

    handle = sd_engine.pipeline("txt2img").unet.register_forward_pre_hook(hold)
    try:
        first = sd_engine.submit(Request(prompt=PROMPT, num_inference_steps=2))
        second = sd_engine.submit(Request(prompt=PROMPT, num_inference_steps=2))
        third = sd_engine.submit(Request(prompt=PROMPT, num_inference_steps=2))
        for j in (first, second, third):
            j.add_callback(
                lambda kind, job, ev: order.append(job.id) if kind == "started" else None
            )
        assert running.wait(60)
        assert sd_engine.queue_length() == 2
        second.cancel()
        assert second.state == "cancelled"
    finally:
        gate.set()
        handle.remove()
    first.result(timeout=120)
    third.result(timeout=120)
    assert third.wait_delivered(30)
    with pytest.raises(JobCancelled):
        second.result(timeout=1)
    assert second.id not in order
    assert order[-1] == third.id


def test_subscribe_sees_every_job_and_listener_errors_do_not_break_jobs(sd_engine):
    seen = []

    def broken(kind, job, ev):
        raise RuntimeError("listener bug")

    unsubscribe = sd_engine.subscribe(lambda kind, job, ev: seen.append((kind, job.id)))
    unsubscribe_broken = sd_engine.subscribe(broken)
    try:
        a = sd_engine.submit(Request(prompt=PROMPT, num_inference_steps=2))
        b = sd_engine.submit(Request(prompt=PROMPT, num_inference_steps=2))
        a.result(timeout=120)
        b.result(timeout=120)
        assert a.wait_delivered(30) and b.wait_delivered(30)
    finally:
        unsubscribe()
        unsubscribe_broken()
    for job in (a, b):
        kinds = [k for k, jid in seen if jid == job.id]
        assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
        assert kinds.count("progress") == 2
    n = len(seen)
    sd_engine.txt2img(PROMPT, num_inference_steps=2, progress=False)
    assert len(seen) == n  # unsubscribed


def test_failed_job_reports_its_error_and_the_engine_goes_on(sd_engine):
    # A real error from inside the denoising loop (as a device fault would raise).
    def fault(module, args):
        raise RuntimeError("simulated device fault")

    unet = sd_engine.pipeline("txt2img").unet
    handle = unet.register_forward_pre_hook(fault)
    kinds = []
    try:
        job = sd_engine.submit(
            Request(prompt=PROMPT, num_inference_steps=2),
            callback=lambda kind, job, ev: kinds.append(kind),
        )
        with pytest.raises(RuntimeError, match="simulated device fault"):
            job.result(timeout=120)
        assert job.wait_delivered(30)
    finally:
        handle.remove()
    assert job.state == "failed" and isinstance(job.error, RuntimeError) and kinds[-1] == "failed"
    assert len(sd_engine.txt2img(PROMPT, num_inference_steps=2, progress=False)) == 1


def test_submit_validates_first(sd_engine):
    with pytest.raises(RequestError) as err:
        sd_engine.submit(Request(prompt=PROMPT, width=30))
    assert err.value.field == "width" and "multiple of 8" in str(err.value)
    with pytest.raises(RequestError) as err:
        sd_engine.submit(Request(prompt=PROMPT, scheduler="Nope"))
    assert err.value.field == "scheduler" and "Euler a" in str(err.value)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(RequestError) as err:  # 3 steps x 0.2 = no step at all
        sd_engine.submit(
            Request(mode="img2img", image=image, prompt="x", num_inference_steps=3, strength=0.2)
        )
    assert err.value.field == "strength"


def test_modes_share_components_and_switching_does_not_reload(sd_engine):
    t2i = sd_engine.pipeline("txt2img")
    params_before = {n: p.data_ptr() for n, p in t2i.unet.named_parameters()}
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    sd_engine.txt2img(PROMPT, num_inference_steps=2, progress=False)
    sd_engine.img2img(image, PROMPT, num_inference_steps=2, progress=False)
    sd_engine.inpaint(image, mask, PROMPT, num_inference_steps=2, progress=False)
    i2i, inp = sd_engine.pipeline("img2img"), sd_engine.pipeline("inpaint")
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(i2i, name) is getattr(t2i, name) is getattr(inp, name), name
    assert sd_engine.pipeline("img2img") is i2i  # built once
    assert {n: p.data_ptr() for n, p in t2i.unet.named_parameters()} == params_before
    assert type(i2i).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(inp).__name__ == "StableDiffusionInpaintPipeline"


def test_unconditional_text_model_runs_one_unet_pass_per_step(sd_engine):
    batches = []
    handle = sd_engine.pipeline("txt2img").unet.register_forward_hook(
        lambda module, args, out: batches.append(args[0].shape[0])
    )
    try:
        r = sd_engine.unconditional(
            seed=3, num_inference_steps=4, scheduler="Euler", progress=False
        )
    finally:
        handle.remove()
    assert batches == [1, 1, 1, 1]  # no classifier-free guidance batch of 2
    assert r.request.guidance_scale == 1.0 and r.request.prompt == ""
    plain = plain_txt2img(sd_engine, prompt="", seed=3, steps=4, scheduler="Euler", guidance=1.0)
    assert np.array_equal(arr(r[0]), arr(plain[0]))


def test_unconditional_rejects_guidance(sd_engine):
    with pytest.raises(RequestError) as err:
        sd_engine.unconditional(guidance_scale=7.0, progress=False)
    assert err.value.field == "guidance_scale"


def test_info_is_json_safe(sd_engine):
    import json

    info = json.loads(json.dumps(sd_engine.info()))
    assert info["family"] == "sd1" and info["vae_factor"] == 4
    assert "Euler a" in info["scheduler_names"] and info["defaults"]["width"] == 32


def test_progress_bar_shows_steps_and_can_be_turned_off(sd_engine, capsys):
    sd_engine.txt2img(PROMPT, seed=1, num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err
    sd_engine.txt2img(PROMPT, seed=1, num_inference_steps=3, progress=False)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------- threads and cancel bounds


def test_listeners_never_run_on_the_worker_thread(sd_engine):
    threads = set()
    unsubscribe = sd_engine.subscribe(lambda k, j, e: threads.add(threading.current_thread()))
    try:
        job = sd_engine.submit(
            Request(prompt=PROMPT, num_inference_steps=2),
            callback=lambda k, j, e: threads.add(threading.current_thread()),
        )
        job.result(timeout=120)
        assert job.wait_delivered(30)
    finally:
        unsubscribe()
    assert threads and sd_engine._worker not in threads
    assert threading.current_thread() not in threads


def test_a_stuck_listener_does_not_stall_generation(sd_engine):
    gate, stuck = threading.Event(), threading.Event()

    def slow(kind, job, ev):
        stuck.set()
        gate.wait(120)

    unsubscribe = sd_engine.subscribe(slow)
    try:
        job = sd_engine.submit(Request(prompt=PROMPT, num_inference_steps=3))
        assert stuck.wait(60)
        result = job.result(timeout=120)  # finishes while the listener is still stuck
        assert len(result) == 1 and not job.wait_delivered(0)
    finally:
        gate.set()
        unsubscribe()
    assert job.wait_delivered(30)


def test_events_reach_listeners_only_after_submit_returned(sd_engine):
    """A listener that needs the caller's bookkeeping of the job (done under the caller's
    lock right after submit) always finds it: events never arrive inside submit."""
    lock, known, seen = threading.Lock(), set(), []

    def listener(kind, job, ev):
        if lock.acquire(timeout=10):  # inside submit on the caller's thread this times out
            seen.append((kind, job.id in known))
            lock.release()
        else:
            seen.append((kind, False))

    unsubscribe = sd_engine.subscribe(listener)
    try:
        with lock:
            job = sd_engine.submit(Request(prompt=PROMPT, num_inference_steps=2))
            known.add(job.id)
        job.result(timeout=120)
        assert job.wait_delivered(30)
    finally:
        unsubscribe()
    assert seen[0] == ("queued", True) and all(ok for _, ok in seen)
    assert [k for k, _ in seen] == ["queued", "started", "progress", "progress", "done"]


def _cancel_inside(engine, module, size: int, watched) -> tuple[list, object]:
    """Cancel the job from a hook when `module` starts; list `watched`'s calls that still
    completed after the cancel (a forward hook runs only when the module finished)."""
    after, job_box = [], []

    def cancel(mod, args):
        job_box[0].cancel()

    def completed(mod, args, output):
        if job_box[0].cancel_requested:
            after.append(mod)

    hooks = [module.register_forward_pre_hook(cancel), watched.register_forward_hook(completed)]
    gate = threading.Event()
    try:
        # the job must exist before the hook can fire: hold the worker until it does
        holder = engine.pipeline("txt2img").unet.register_forward_pre_hook(
            lambda m, a: gate.wait(60) and None
        )
        job_box.append(
            engine.submit(
                Request(prompt=PROMPT, num_inference_steps=2, width=size, height=size),
                preview_every=0,
            )
        )
        gate.set()
        holder.remove()
        with pytest.raises(JobCancelled):
            job_box[0].result(timeout=300)
    finally:
        gate.set()
        for h in hooks:
            h.remove()
    return after, job_box[0]


def test_cancel_inside_a_unet_step_stops_within_one_unit(sd_engine):
    """Issue 13.11: not even the block in progress finishes (cancel waits for one resnet or
    attention call at most, not a step or a block)."""
    block = sd_engine.pipeline("txt2img").unet.down_blocks[1]  # CrossAttnDownBlock2D
    after, job = _cancel_inside(sd_engine, block.resnets[0], 256, block.attentions[0])
    assert job.state == "cancelled" and after == []
    assert job.progress is None  # not even one step finished


def test_cancel_inside_the_vae_decode_stops_within_one_unit(sd_engine):
    mid = sd_engine.pipeline("txt2img").vae.decoder.mid_block
    after, job = _cancel_inside(sd_engine, mid.resnets[0], 256, mid.attentions[0])
    assert job.state == "cancelled" and after == []
    assert job.progress is not None and job.progress.step == 2  # denoising had finished
