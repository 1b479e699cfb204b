"""sdkit.fast on real (tiny, random-weight) diffusers pipelines on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from sdkit import fast

diffusers = pytest.importorskip("diffusers")


def tiny_parts(seed: int = 0):
    """Tiny random-weight UNet, VAE and CLIP text encoder with the real diffusers classes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1200,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    )
    return unet.eval(), vae.eval(), text.eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from sdkit.embedded.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer("a red blue green circle square on background".split(), out)
    return out


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def make_pipe(parts, tokenizer_dir):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, text = (copy.deepcopy(p) for p in parts)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1, beta_schedule="scaled_linear"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, size=32, steps=3, output_type="np"):
    g = torch.Generator().manual_seed(3)
    return pipe(
        "a red circle",
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=g,
        output_type=output_type,
    ).images


def unet_out(unet, seed=1, batch=2, side=8):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, side, side, generator=g)
    cond = torch.randn(batch, 5, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor(500), encoder_hidden_states=cond).sample


def test_default_attention_is_sdpa(parts):
    # diffusers installs SDPA by default; the fast path relies on it and reports it.
    assert fast.attention_kind(parts[0]) == "sdpa"
    assert fast.ensure_sdpa(copy.deepcopy(parts[0])) == 0


def test_ensure_sdpa_replaces_classic_processor(parts):
    from diffusers.models.attention_processor import AttnProcessor

    unet = copy.deepcopy(parts[0])
    unet.set_attn_processor(AttnProcessor())
    assert fast.attention_kind(unet) == "AttnProcessor"
    n = fast.ensure_sdpa(unet)
    assert n == len(unet.attn_processors) > 0
    assert fast.attention_kind(unet) == "sdpa"


def test_channels_last_and_fused_qkv_within_tolerance(parts):
    plain = unet_out(parts[0])
    unet = copy.deepcopy(parts[0])
    extra = fast.fuse_qkv(unet)
    assert extra > 0 and fast.attention_kind(unet) == "sdpa-fused"
    unet.to(memory_format=torch.channels_last)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = unet_out(unet)
    assert out.abs().max() > 0.1  # a real, non-trivial output
    assert (out - plain).abs().max().item() < fast.TOLERANCE


def test_apply_speed_options_pipeline_matches_plain(parts, tokenizer_dir):
    plain = run(make_pipe(parts, tokenizer_dir))
    pipe = make_pipe(parts, tokenizer_dir)
    info = fast.apply_speed_options(
        pipe, device="cpu", dtype=torch.float32, channels_last=True, fused_qkv=True
    )
    assert info["fused_qkv"] and info["channels_last"] and info["sync_free"]
    assert info["attention"] == "sdpa-fused" and info["compile"] is None
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    out = run(pipe)
    assert abs(out - plain).max() < fast.TOLERANCE
    # sync-free: the scheduler keeps its timesteps on the host, for every job.
    assert pipe.scheduler.timesteps.device.type == "cpu"
    # A `from_pipe` pipeline shares the UNet: applying again changes nothing and says so.
    from diffusers import StableDiffusionImg2ImgPipeline

    again = fast.apply_speed_options(
        StableDiffusionImg2ImgPipeline.from_pipe(pipe), device="cpu", dtype=torch.float32
    )
    assert again == {**info, "already_applied": True}


def test_sync_free_survives_a_scheduler_swap(parts, tokenizer_dir):
    from diffusers import EulerDiscreteScheduler

    plain = make_pipe(parts, tokenizer_dir)
    plain.scheduler = EulerDiscreteScheduler.from_config(plain.scheduler.config)
    expected = run(plain)
    pipe = make_pipe(parts, tokenizer_dir)
    fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert fast.prepare_job(pipe, 32, 32, 1)["sync_free"] is True
    assert abs(run(pipe) - expected).max() < fast.TOLERANCE
    assert pipe.scheduler.timesteps.device.type == "cpu"


def test_bad_options_are_named(parts, tokenizer_dir):
    pipe = make_pipe(parts, tokenizer_dir)
    with pytest.raises(ValueError, match="^compile: .*'regional'"):
        fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32, compile="turbo")
    with pytest.raises(ValueError, match="^compile: 'cudagraphs' needs a CUDA device"):
        fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32, compile="cudagraphs")
    with pytest.raises(ValueError, match="^dtype: "):
        fast.apply_speed_options(pipe, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="^batch: "):
        fast.configure_vae_for(pipe, 64, 64, 0)


def test_vae_slicing_and_tiling_by_size_and_batch(parts, tokenizer_dir):
    pipe = make_pipe(parts, tokenizer_dir)
    one = fast.vae_decode_bytes(pipe, 512, 512, 1)
    assert fast.vae_decode_bytes(pipe, 512, 512, 4) == 4 * one
    assert fast.vae_decode_bytes(pipe, 1024, 1024, 1) == 4 * one
    budget = 2 * one
    small = fast.configure_vae_for(pipe, 512, 512, 1, budget_bytes=budget)
    assert small["slicing"] is False and small["tiling"] is False
    batch = fast.configure_vae_for(pipe, 512, 512, 4, budget_bytes=budget)
    assert batch["slicing"] is True and batch["tiling"] is False
    assert pipe.vae.use_slicing and not pipe.vae.use_tiling
    big = fast.configure_vae_for(pipe, 1024, 1024, 1, budget_bytes=budget)
    assert big["tiling"] is True and big["slicing"] is False
    assert pipe.vae.use_tiling and not pipe.vae.use_slicing
    assert fast.configure_vae_for(pipe, 64, 64, 2)["tiling"] is False  # real budget: tiny fits


def test_vae_slicing_keeps_pixels(parts, tokenizer_dir):
    pipe = make_pipe(parts, tokenizer_dir)
    g = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=2, height=32, width=32, num_images_per_prompt=3, output_type="np")
    plain = pipe("a red circle", generator=g, **kw).images
    fast.configure_vae_for(pipe, 32, 32, 3, budget_bytes=fast.vae_decode_bytes(pipe, 32, 32, 2))
    assert pipe.vae.use_slicing
    sliced = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(sliced - plain).max() < fast.TOLERANCE


def test_cpu_defaults(parts, tokenizer_dir):
    pipe = make_pipe(parts, tokenizer_dir)
    info = fast.apply_speed_options(pipe, device="cpu", dtype=torch.float32)
    assert info["fused_qkv"] is False and info["channels_last"] is True
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert info["attention"] == "sdpa" and info["sync_free"] is True


def test_compiled_forwards_run_in_a_compile_scope_only_when_chosen():
    cfg = torch._dynamo.config
    default = cfg.recompile_limit
    calls = []
    forward = fast._either(
        lambda: calls.append(("eager", cfg.recompile_limit)),
        lambda: calls.append(("compiled", cfg.recompile_limit)),
        100,
    )
    forward()
    token = fast._USE_COMPILED.set(True)  # what the UNet's pre-hook does for a shape in the set
    try:
        forward()
    finally:
        fast._USE_COMPILED.reset(token)
    forward()
    assert calls == [("eager", default), ("compiled", max(default, 800)), ("eager", default)]


# ------------------------------------------------- what sdkit.fast relies on, pinned


def test_pipeline_calls_the_unet_with_sample_and_timestep_first(parts, tokenizer_dir):
    # sync-free moves args[1] (the timestep); compile picks the graph from args[0]'s shape
    pipe = make_pipe(parts, tokenizer_dir)
    seen = []

    def spy(module, args, kwargs):
        seen.append((len(args), tuple(args[0].shape), torch.is_tensor(args[1])))

    handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        run(pipe, size=32, steps=2)
    finally:
        handle.remove()
    assert seen and set(seen) == {(2, (2, 4, 16, 16), True)}  # CFG doubles the batch; 2 px/cell


def test_every_scheduler_takes_device_second_in_set_timesteps():
    # make_scheduler_sync_free rewrites `device` by keyword or as the second positional argument
    import inspect

    import diffusers

    from sdkit import schedulers

    for name in schedulers._CLASSES:
        params = list(inspect.signature(getattr(diffusers, name).set_timesteps).parameters)
        assert params[1:3] == ["num_inference_steps", "device"], name


def test_vae_scale_factor_is_pixels_per_latent_cell(parts, tokenizer_dir):
    pipe = make_pipe(parts, tokenizer_dir)
    assert pipe.vae_scale_factor == 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 2


def test_regional_compile_finds_diffusers_repeated_blocks(parts):
    names = parts[0]._repeated_blocks
    assert names and any(type(m).__name__ in names for m in parts[0].modules())


def test_dynamo_config_patches_are_thread_local():
    # compile_scope raises recompile limits with config.patch; other threads must not see it
    import threading

    cfg = torch._dynamo.config
    before = cfg.recompile_limit
    inside, other = threading.Event(), []

    def look():
        inside.wait(10)
        other.append(cfg.recompile_limit)

    t = threading.Thread(target=look)
    t.start()
    with fast.compile_scope(1000):
        assert cfg.recompile_limit == 8000
        inside.set()
        t.join(10)
    assert other == [before] and cfg.recompile_limit == before


@pytest.mark.slow
def test_regional_compile_fixed_sizes_do_not_recompile(parts, tokenizer_dir):
    """Sizes of the set compile once; switching among them, or running another size, never recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    plain = make_pipe(parts, tokenizer_dir)
    expected = {s: run(plain, size=s, steps=2, output_type="latent") for s in (32, 48)}
    pipe = make_pipe(parts, tokenizer_dir)
    info = fast.apply_speed_options(
        pipe,
        device="cpu",
        dtype=torch.float32,
        compile="regional",
        compile_sizes=[(32, 32), (48, 48)],
    )
    assert info["compile"]["mode"] == "regional" and info["compile"]["dynamic"] is False
    # the tiny VAE has two blocks: 2 pixels per latent cell
    shapes = [[1, 16, 16], [1, 24, 24], [2, 16, 16], [2, 24, 24]]
    assert info["compile"]["shapes"] == shapes
    for s in (32, 48):
        out = run(pipe, size=s, steps=2, output_type="latent")
        assert (out - expected[s]).abs().max().item() < 1e-3
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    for s in (48, 32, 40):  # 40: outside the set, runs eagerly
        run(pipe, size=s, steps=2, output_type="latent")
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.slow
def test_compiled_engine_leaves_torch_settings_alone():
    """Issue 12.6: compile settings live inside sdkit's UNet calls, not in the process."""
    import threading

    from torch._dynamo import eval_frame

    from sdkit.engine import Engine

    cfg = torch._dynamo.config
    limits = ("recompile_limit", "accumulated_recompile_limit")
    before = {k: getattr(cfg, k) for k in limits}
    inside: list[tuple] = []
    engine = Engine(None, "cpu", torch.float32, compile="regional")
    try:
        assert {k: getattr(cfg, k) for k in limits} == before  # loading changed nothing
        unet = engine.model.pipe.unet

        def probe(module, args, output):  # runs inside sdkit's UNet call, on the worker thread
            seen = (eval_frame._stance.stance, *(getattr(cfg, k) for k in limits))
            main = threading.current_thread() is threading.main_thread()
            inside.append((size, main, fast._USE_COMPILED.get(), *seen))

        handle = unet.conv_in.register_forward_hook(probe)
        try:
            native = engine.defaults["width"]
            for size in (native, native - 16):  # in the compiled set, then outside it (eager)
                engine.txt2img(
                    "a red circle",
                    width=size,
                    height=size,
                    num_inference_steps=2,
                    seed=1,
                    progress=False,
                )
        finally:
            handle.remove()
    finally:
        engine.close()
    # compiled code for the set only; never on the caller's thread, never a global stance,
    # dynamo's limits untouched outside the compiled blocks
    assert set(inside) == {
        (native, False, True, "default", *before.values()),
        (native - 16, False, False, "default", *before.values()),
    }
    assert fast._USE_COMPILED.get() is False
    assert {k: getattr(cfg, k) for k in limits} == before
    assert eval_frame._stance.stance == "default"
