"""The VAE encoding cache (`sdkit.encode_cache`): hits skip the encoder, images stay
bit-identical to plain diffusers (pipelines loaded afresh from disk: their own VAE, never
cached), a changed pixel or changed weights miss.

Encoder calls are counted with a forward hook on `vae.encoder`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdkit import encode_cache, fast, masks
from sdkit.schedulers import make_scheduler

PROMPT = "a red circle on a blue background"


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def picture(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


@contextlib.contextmanager
def encoder_calls(engine) -> Iterator[list[int]]:
    """A one-item list counting the engine's VAE encoder forwards during the block."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1

    handle = engine._base.vae.encoder.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


@functools.cache
def fresh_pipeline(folder: str, cls_name: str):
    """What a diffusers user loads: its own components, the engine's speed options."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder)
    fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32)  # as every engine does
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain(folder, cls_name, *, scheduler, seed, n=1, **call):
    pipe = fresh_pipeline(str(folder), cls_name)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    out = pipe(num_images_per_prompt=n, generator=gens, **call).images
    return [arr(i) for i in out]


KW = {"num_inference_steps": 4, "scheduler": "Euler a", "progress": False}


def img2img(engine, image, *, seed=4, strength=0.6, prompt=PROMPT, **fields):
    result = engine.img2img(image, prompt, seed=seed, strength=strength, **{**KW, **fields})
    return [arr(i) for i in result.images]


def plain_img2img(folder, image, *, seed=4, strength=0.6, prompt=PROMPT, n=1, cls=None):
    return plain(
        folder,
        cls or "StableDiffusionImg2ImgPipeline",
        scheduler=KW["scheduler"],
        seed=seed,
        n=n,
        prompt=prompt,
        image=image,
        strength=strength,
        num_inference_steps=KW["num_inference_steps"],
        guidance_scale=7.5,
    )


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------ img2img


def test_the_same_picture_again_skips_the_encoder_and_stays_bit_identical(sd_engine, tiny_models):
    from sdkit.engine import Engine

    cache = encode_cache.of(sd_engine)
    cache.clear()
    image = picture()
    with encoder_calls(sd_engine) as calls:
        first = img2img(sd_engine, image)
        assert calls[0] == 1
        hits = cache.hits
        again = img2img(sd_engine, image)
        assert calls[0] == 1 and cache.hits == hits + 1  # no encoder run: served cached
    assert "encode" not in vars(sd_engine._base.vae)  # the VAE is diffusers' own between jobs
    reference = plain_img2img(tiny_models["sd"], image)
    fresh = Engine(tiny_models["sd"], device="cpu")
    try:
        new_engine = img2img(fresh, image)
    finally:
        fresh.close()
    assert same(first, reference) and same(again, reference) and same(new_engine, reference)


def test_a_changed_pixel_misses(sd_engine, tiny_models):
    cache = encode_cache.of(sd_engine)
    image = picture(seed=1)
    img2img(sd_engine, image)
    changed = image.copy()
    r, g, b = changed.getpixel((5, 7))
    changed.putpixel((5, 7), (r, g, (b + 1) % 256))
    misses = cache.misses
    with encoder_calls(sd_engine) as calls:
        ours = img2img(sd_engine, changed)
    assert calls[0] == 1 and cache.misses == misses + 1
    assert same(ours, plain_img2img(tiny_models["sd"], changed))


def test_new_seeds_strengths_and_prompts_draw_from_the_cached_posterior(sd_engine, tiny_models):
    """One encoding, then every frame of a live stream that changes only these: each
    equals plain diffusers, where the draw from the posterior takes the new generator."""
    image = picture(seed=2)
    img2img(sd_engine, image)
    frames = [
        {"seed": 11},
        {"seed": 12, "strength": 0.9},
        {"seed": 11, "prompt": "a green square"},
        {"seed": 13, "strength": 0.3},
    ]
    outputs = []
    with encoder_calls(sd_engine) as calls:
        for frame in frames:
            ours = img2img(sd_engine, image, **frame)
            assert same(ours, plain_img2img(tiny_models["sd"], image, **frame)), frame
            outputs.append(ours[0])
    assert calls[0] == 0
    assert not np.array_equal(outputs[0], outputs[1])  # the frames really differ


def test_a_batch_encodes_its_picture_once_and_each_image_keeps_its_generator(
    sd_engine, tiny_models
):
    encode_cache.of(sd_engine).clear()
    image = picture(seed=3)
    with encoder_calls(sd_engine) as calls:
        ours = img2img(sd_engine, image, seed=20, num_images=3)
        assert calls[0] == 1  # diffusers encodes per generator: images 2 and 3 hit
        again = img2img(sd_engine, image, seed=30, num_images=3)
        assert calls[0] == 1
    assert same(ours, plain_img2img(tiny_models["sd"], image, seed=20, n=3))
    assert same(again, plain_img2img(tiny_models["sd"], image, seed=30, n=3))
    assert not np.array_equal(ours[0], ours[1])  # per-image draws and noise


def test_weights_changed_in_place_miss(sd_engine):
    image = picture(seed=4)
    first = img2img(sd_engine, image)
    weight = sd_engine._base.vae.encoder.conv_in.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        with encoder_calls(sd_engine) as calls:
            changed = img2img(sd_engine, image)
        assert calls[0] == 1 and not same(first, changed)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    with encoder_calls(sd_engine) as calls:
        assert same(img2img(sd_engine, image), first)  # weights restored: encoded again
    assert calls[0] == 1


def test_the_cache_is_bounded_and_can_be_turned_off(sd_engine):
    cache = encode_cache.of(sd_engine)
    cache.clear()
    for seed in range(cache.size + 3):
        img2img(sd_engine, picture(seed=100 + seed), num_inference_steps=2)
    assert len(cache._items) == cache.size
    cache.enabled = False
    try:
        with encoder_calls(sd_engine) as calls:
            img2img(sd_engine, picture(seed=100 + cache.size + 2), num_inference_steps=2)
        assert calls[0] == 1
    finally:
        cache.enabled = True


# ------------------------------------------------------------------------ inpaint, SDXL


def square_mask(size: int = 32) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((10, 10, 22, 22), fill=255)
    return m


@pytest.mark.parametrize("engine_name", ["sd_engine", "inpaint_engine"])
def test_inpaint_caches_image_and_masked_image(request, tiny_models, engine_name):
    """Both UNets: the pipeline encodes the image (strength < 1) and the masked image;
    a repeat with a new seed encodes neither and equals the plain inpaint pipeline fed the
    same prepared inputs and composited the documented way (as tests/test_modes.py)."""
    engine = request.getfixturevalue(engine_name)
    folder = tiny_models["sd" if engine_name == "sd_engine" else "sd_inpaint"]
    encode_cache.of(engine).clear()
    image, mask = picture(seed=5), square_mask()
    fields = {"grow": 2, "mask_blur": 2, "fill": "original", "strength": 0.8, **KW}
    with encoder_calls(engine) as calls:
        engine.inpaint(image, mask, PROMPT, seed=9, **fields)
        assert calls[0] == 2
        ours = engine.inpaint(image, mask, PROMPT, seed=10, num_images=2, **fields)
        assert calls[0] == 2
    soft = masks.prepare_mask(mask, 2, 2)
    raw = plain(
        folder,
        "StableDiffusionInpaintPipeline",
        scheduler=KW["scheduler"],
        seed=10,
        n=2,
        prompt=PROMPT,
        image=masks.fill_masked(image, soft, "original", seed=10),
        mask_image=soft,
        strength=0.8,
        num_inference_steps=KW["num_inference_steps"],
        guidance_scale=7.5,
        width=32,
        height=32,
    )
    expected = [arr(masks.composite(image, Image.fromarray(r), soft)) for r in raw]
    assert same([arr(i) for i in ours.images], expected)


def test_nine_channel_img2img_and_sdxl_img2img(inpaint_engine, sdxl_engine, tiny_models):
    image = picture(seed=6)
    for engine, folder, cls in (
        (inpaint_engine, tiny_models["sd_inpaint"], None),
        (sdxl_engine, tiny_models["sdxl"], "StableDiffusionXLImg2ImgPipeline"),
    ):
        encode_cache.of(engine).clear()
        with encoder_calls(engine) as calls:
            img2img(engine, image, seed=1)
            ours = img2img(engine, image, seed=2)
        assert calls[0] == (2 if cls is None else 1)  # 9 channels: image and masked image
        if cls is not None:
            assert same(ours, plain_img2img(folder, image, seed=2, cls=cls))
        else:  # the engine's 9-channel img2img: the inpaint pipeline under an all-white mask
            engine_off = encode_cache.of(engine)
            engine_off.enabled = False
            try:
                assert same(ours, img2img(engine, image, seed=2))
            finally:
                engine_off.enabled = True


# ------------------------------------------------------------------------ embedded model


@pytest.fixture(scope="module")
def embedded():
    import sdkit

    engine = sdkit.load()
    yield engine
    engine.close()


def test_a_live_stream_on_the_embedded_model(embedded):
    """The live preset's frames: the second encodes nothing and each equals plain
    diffusers on the shipped model."""
    from sdkit.embedded import shapes
    from sdkit.live import LIVE_DEFAULTS, live_request
    from sdkit.models import EMBEDDED_DIR

    canvas = shapes.render(shapes.Scene("circle", "red", "blue", 32, 32, 14, 0))
    with encoder_calls(embedded) as calls:
        frames = [
            arr(embedded.submit(live_request(canvas, PROMPT, seed=s)).result().images[0])
            for s in (1, 2)
        ]
    assert calls[0] == 1
    for seed, frame in zip((1, 2), frames, strict=True):
        reference = plain(
            EMBEDDED_DIR,
            "StableDiffusionImg2ImgPipeline",
            scheduler=LIVE_DEFAULTS["scheduler"],
            seed=seed,
            prompt=PROMPT,
            image=canvas,
            strength=LIVE_DEFAULTS["strength"],
            num_inference_steps=LIVE_DEFAULTS["num_inference_steps"],
            guidance_scale=LIVE_DEFAULTS["guidance_scale"],
        )
        assert np.array_equal(frame, reference[0]), seed
