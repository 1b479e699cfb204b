"""Model specs: embedded, folders, single-file checkpoints, hub ids; all offline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import sdkit
from sdkit import models
from sdkit.models import ModelNotFoundError, load_model, resolve_device, resolve_dtype


def test_missing_embedded_model_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "EMBEDDED_DIR", tmp_path / "model")
    with pytest.raises(ModelNotFoundError, match=r"python -m sdkit\.embedded\.train"):
        load_model(None)
    with pytest.raises(ModelNotFoundError, match="embedded"):
        load_model("default")


def test_hub_id_offline_fails_at_once_saying_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        load_model("someone/not-downloaded-model")
    text = str(err.value)
    assert "huggingface-cli download someone/not-downloaded-model" in text
    assert "HF_HOME" in text and "local folder" in text


def test_nonexistent_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a checkpoint"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_model(tmp_path / "empty")


def test_families_and_defaults(tiny_models, tmp_path):
    sd = load_model(tiny_models["sd"], device="cpu")
    assert sd.family == "sd1" and sd.dtype == torch.float32
    assert sd.defaults["num_inference_steps"] == 4  # from sdkit.json
    xl = load_model(tiny_models["sdxl"], device="cpu")
    assert xl.family == "sdxl"
    ddpm = load_model(tiny_models["ddpm"], device="cpu")
    assert ddpm.family == "unconditional" and ddpm.defaults["width"] == 16
    # without sdkit.json: the family's defaults (SD 1.x: 512, 50 steps, 7.5, PNDM)
    plain = tmp_path / "plain"
    shutil.copytree(tiny_models["sd"], plain)
    (plain / "sdkit.json").unlink()
    d = load_model(plain, device="cpu").defaults
    assert (d["width"], d["height"], d["num_inference_steps"], d["guidance_scale"]) == (
        512,
        512,
        50,
        7.5,
    )
    assert d["scheduler"] == "PNDMScheduler"


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device(None).type in ("cpu", "mps")


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        # `b` is as loaded; `a` may carry extra fused-QKV weights (sdkit.fast) beside them
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(sb) <= set(sa), name
        for k in sb:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


def test_single_file_checkpoint_in_original_layout_loads_offline(tiny_models, tmp_path):
    import tiny

    ref = load_model(tiny_models["sd"], device="cpu")
    ckpt = tiny.write_original_checkpoint(ref.pipe, tmp_path / "tiny-sd.safetensors")
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)

    # config given explicitly
    m = load_model(ckpt, device="cpu", config=tiny_models["sd"])
    _same_weights(m.pipe, ref.pipe)
    assert m.family == "sd1" and m.name == "tiny-sd"
    # config found next to the file (<stem>/ folder)
    shutil.copytree(tiny_models["sd"], tmp_path / "tiny-sd")
    engine = sdkit.load(ckpt, device="cpu")
    _same_weights(engine.model.pipe, ref.pipe)
    a = engine.txt2img("a red circle", seed=1, num_inference_steps=2, progress=False)
    b = sdkit.load(tiny_models["sd"], device="cpu").txt2img(
        "a red circle", seed=1, num_inference_steps=2, progress=False
    )
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_single_file_without_config_fails_with_the_way_out(tiny_models, tmp_path):
    import tiny

    ref = load_model(tiny_models["sd"], device="cpu")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    ckpt = tiny.write_original_checkpoint(ref.pipe, lonely / "model.safetensors")
    with pytest.raises(ModelNotFoundError) as err:
        load_model(ckpt, device="cpu")
    assert "config=" in str(err.value)


def test_load_is_cached_per_spec_device_dtype(tiny_models):
    a = sdkit.load(tiny_models["sd"], device="cpu")
    assert sdkit.load(str(tiny_models["sd"]), device="cpu", dtype="fp32") is a
    assert sdkit.load(tiny_models["sd"], device="cpu", dtype=torch.bfloat16) is not a


@pytest.mark.skipif(
    not (models.EMBEDDED_DIR / "model_index.json").is_file(),
    reason="embedded model not trained yet",
)
def test_embedded_model_is_the_default_and_brings_its_preview_fit():
    engine = sdkit.load(device="cpu")
    assert engine is sdkit.load("embedded", device="cpu") is sdkit.load("default", device="cpu")
    assert engine.family == "sd1" and engine.vae_factor == 4 and engine.defaults["width"] == 64
    assert engine.model.latent_rgb_factors is not None and len(engine.model.latent_rgb_factors) == 4
    events = []
    job = engine.submit(
        sdkit.Request(prompt="a red circle on a blue background", num_inference_steps=3, seed=1),
        callback=lambda kind, job, ev: events.append(ev) if kind == "progress" else None,
    )
    assert job.result(timeout=600)[0].size == (64, 64)
    assert job.wait_delivered(30)
    assert events[-1].preview.size == (64, 64)
