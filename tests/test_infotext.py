"""A1111 infotext: sdkit's own round trip, and parameters text as A1111 writes it.

Longer than our ~400-line rule because it holds real A1111 infotexts verbatim (one line
each can run to a thousand characters) next to the tests that read them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdkit.infotext import KNOWN_KEYS, parse_params, quote, split_infotext, with_lora_tags
from sdkit.request import FILLS, HIRES_UPSCALERS, MODES, RESIZE_MODES, Request, RequestError
from sdkit.schedulers import scheduler_names

# ---------------------------------------------------------------------------- A1111's own text

A1111_BASIC = """a photo of an astronaut riding a horse on mars
Negative prompt: cartoon, blurry
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.6.0"""

A1111_NO_NEGATIVE = """a cozy cabin in the woods, snow, warm light
Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3141592653, Size: 768x512, Model hash: 15012c538f, Model: realisticVisionV51_v51VAE"""

# A1111 1.10: sampler and schedule type apart, hires fix, LoRA hashes quoted, multi-line prompts.
A1111_HIRES = """masterpiece, best quality, 1girl, (red hair:1.2),
standing in a field of flowers, <lora:add_detail:0.6>
BREAK sunset, detailed sky
Negative prompt: (worst quality, low quality:1.4), bad anatomy,
extra fingers
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 2771394851, Size: 512x768, Model hash: 7f96a1a9ca, Model: anythingV5_PrtRE, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", TI hashes: "easynegative: c74b4e810b03", Emphasis: Original, Version: v1.10.1"""

A1111_IMG2IMG = """portrait of a knight, oil painting
Negative prompt: photo
Steps: 25, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.6, Mask blur: 4, Version: v1.9.4"""

A1111_ADETAILER = """a woman smiling, city street
Negative prompt: lowres
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 99, Size: 512x512, Model: dreamshaper_8, ADetailer model: face_yolov8n.pt, ADetailer prompt: "a \\"happy\\" face, smile", ADetailer confidence: 0.3, ADetailer version: 24.9.0, Version: f2.0.1v1.10.1-previous-313-g8a042934"""

A1111_OLD_BATCH = """a red apple on a wooden table
Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 3000000005, Size: 512x512, Batch size: 4, Batch pos: 2, Model hash: 7460a6fa, ENSD: 31337"""

# Real infotexts, verbatim as published (found with the `search` tool; sources named).
# A1111 v1.6.0 txt2img, hires fix (Latent) + LoRA tag + Lora/TI hashes + extensions' keys
# (a public README's "使用的Prompt" block, Chinese SD tutorial).
REAL_HIRES_LORA_TI = """8k, masterpiece,a woman in a black outfit with a hood, looking at viewer, standing in a hallway, Constance Copeman, darkness, a character portrait, rococo <lora:neg4all_bdsqlsz_V3.5:1>
Negative prompt: easynegative
Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 11, Seed: 3773110473, Size: 512x768, Model hash: a1535d0a42, Model: AnythingV5Ink_ink, Denoising strength: 0.7, ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, ADetailer dilate/erode: 4, ADetailer mask blur: 4, ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, ADetailer inpaint padding: 32, ADetailer version: 23.9.3, ControlNet 0: "Module: none, Model: None, Weight: 1, Resize Mode: Crop and Resize, Low Vram: False, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced", LLuL Enabled: True, LLuL Multiply: 2, LLuL Weight: 0.15, LLuL Layers: ['OUT'], LLuL Apply to: ['out'], LLuL Start steps: 5, LLuL Max steps: 30, LLuL Upscaler: bilinear, LLuL Downscaler: bilinear, LLuL Interpolation: lerp, LLuL x: 128, LLuL y: 192, Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "neg4all_bdsqlsz_V3.5: b1b5db66e2f6", TI hashes: "easynegative: c74b4e810b03", Version: v1.6.0"""

# A1111 v1.3.1 txt2img: clip skip, hires steps, an ESRGAN upscaler, LoRA (a civitai
# model-finder skill's PNG metadata test fixture).
REAL_CLIP_SKIP_HIRES = """masterpiece,gufeng boy,<lora:gufeng boy_20230805210621:0.8>,armor
Negative prompt: (worst quality:2),lowres
Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1008176401, Size: 512x768, Model hash: 87ce93011a, Model: majicMIX alpha 麦橘男团, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+, Lora hashes: "gufeng boy_20230805210621: 60129e9d06ab", Version: v1.3.1"""

# A1111 v1.6.0 img2img (no mask), CRLF line ends (a Telegram bot's unit test input).
REAL_IMG2IMG = "cat, dog, cute beavers\r\nNegative prompt: horse\r\nSteps: 5, Sampler: DPM++ SDE Karras, CFG scale: 2.0, Seed: 3342802166, Size: 1024x768, Model: dreamshaperXL_turboDpmppSDE, Denoising strength: 0.35, Version: v1.6.0-2-g4afaaf8a"

# A1111 v1.9.4 inpaint, no Mode key (a product-photo inpainting README's parameters table).
REAL_INPAINT = """professional product photo of perfume bottle in snow, gifting box, studio lighting
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1122959677, Size: 985x1266, Model hash: b513c6287d, Model: realism_engine, Denoising strength: 0.75, Mask blur: 4, Masked content: fill, Version: v1.9.4"""


def test_basic_a1111_text():
    r = Request.from_infotext(A1111_BASIC)
    assert r.mode == "txt2img"
    assert r.prompt == "a photo of an astronaut riding a horse on mars"
    assert r.negative_prompt == "cartoon, blurry"
    assert (r.num_inference_steps, r.scheduler, r.guidance_scale, r.seed) == (20, "Euler a", 7.0, 1)
    assert (r.width, r.height, r.model) == (512, 512, "v1-5-pruned-emaonly")
    assert r.extra == {"Model hash": "6ce0161689", "Version": "v1.6.0"}
    r.validate()


def test_no_negative_prompt_line():
    r = Request.from_infotext(A1111_NO_NEGATIVE)
    assert r.prompt == "a cozy cabin in the woods, snow, warm light"
    assert r.negative_prompt == ""
    assert r.scheduler == "DPM++ 2M Karras"
    assert r.guidance_scale == 7.5 and r.seed == 3141592653
    assert (r.width, r.height) == (768, 512)


def test_multi_line_prompts_hires_keys_and_quoted_values():
    r = Request.from_infotext(A1111_HIRES)
    assert r.prompt.split("\n") == [
        "masterpiece, best quality, 1girl, (red hair:1.2),",
        "standing in a field of flowers, <lora:add_detail:0.6>",
        "BREAK sunset, detailed sky",
    ]
    assert r.negative_prompt == "(worst quality, low quality:1.4), bad anatomy,\nextra fingers"
    # "Sampler: DPM++ 2M" with "Schedule type: Karras" is the DPM++ 2M Karras scheduler
    assert r.scheduler == "DPM++ 2M Karras"
    assert "Schedule type" not in r.extra
    assert r.extra["Lora hashes"] == "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"
    assert r.extra["TI hashes"] == "easynegative: c74b4e810b03"
    # an upscaler sdkit lacks runs as the nearest it has; A1111's name is kept and written
    assert r.extra["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B" and r.hires_upscaler == "Lanczos"
    assert (r.mode, r.hires_scale, r.hires_steps, r.clip_skip) == ("txt2img", 2.0, 15, 2)
    assert r.extra["Version"] == "v1.10.1"
    # on txt2img, A1111's `Denoising strength` is the hires pass's
    assert r.hires_denoise == 0.45 and r.strength == 0.75
    assert "Denoising strength" not in r.extra and "Hires upscale" not in r.extra
    assert list(r.extra)[:3] == ["Model hash", "Hires upscaler", "Lora hashes"]


@pytest.mark.parametrize(
    "text",
    [
        A1111_BASIC,
        A1111_NO_NEGATIVE,
        A1111_HIRES,
        A1111_IMG2IMG,
        A1111_ADETAILER,
        A1111_OLD_BATCH,
        REAL_HIRES_LORA_TI,
        REAL_CLIP_SKIP_HIRES,
        REAL_IMG2IMG,
        REAL_INPAINT,
    ],
)
def test_a1111_text_written_back_keeps_every_key(text):
    r = Request.from_infotext(text)
    written = r.to_infotext()
    again = Request.from_infotext(written)
    assert again == r
    _, _, original_pairs = split_infotext(text)
    _, _, written_pairs = split_infotext(written)
    before, after = dict(original_pairs), dict(written_pairs)
    if "Schedule type" in before and "Schedule type" not in after:  # folded into the sampler
        assert before.pop("Schedule type") == "Karras"
        assert after["Sampler"] == before.pop("Sampler") + " Karras"
        after.pop("Sampler")
    if before.get("Sampler") == "PLMS":
        assert after["Sampler"] == "PLMS"
    for key, value in before.items():
        if key == "CFG scale":
            assert float(after[key]) == float(value)
        else:
            assert after[key] == value, key


def test_a1111_text_with_a_mask_key_is_inpaint():
    r = Request.from_infotext(A1111_IMG2IMG)  # A1111 writes `Mask blur` only with a mask
    assert r.mode == "inpaint" and r.scheduler == "DPM++ SDE Karras"
    assert (r.strength, r.mask_blur) == (0.6, 4)
    assert r.extra == {"Model hash": "6ce0161689", "Version": "v1.9.4"}


def test_real_txt2img_hires_lora_ti_hashes():
    r = Request.from_infotext(REAL_HIRES_LORA_TI)
    assert r.mode == "txt2img"
    assert (r.hires_scale, r.hires_steps, r.hires_upscaler, r.hires_denoise) == (
        2,
        0,
        "Latent",
        0.7,
    )
    assert r.prompt.endswith(", rococo <lora:neg4all_bdsqlsz_V3.5:1>") and r.loras == []
    assert r.negative_prompt == "easynegative"
    assert r.extra["Lora hashes"] == "neg4all_bdsqlsz_V3.5: b1b5db66e2f6"
    assert r.extra["TI hashes"] == "easynegative: c74b4e810b03"
    assert r.extra["LLuL Layers"] == "['OUT']"
    for key in ("Hires upscale", "Hires upscaler", "Denoising strength"):
        assert key not in r.extra
    written = r.to_infotext()
    assert written.split("\n")[0] == REAL_HIRES_LORA_TI.split("\n")[0]  # the tag once
    assert "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent, " in written
    assert "Hires steps" not in written  # A1111 omits 0
    assert (
        'Lora hashes: "neg4all_bdsqlsz_V3.5: b1b5db66e2f6", TI hashes: "easynegative: c74b4e810b03"'
    ) in written
    r.validate()


def test_real_txt2img_clip_skip_hires_steps_and_an_esrgan_upscaler():
    r = Request.from_infotext(REAL_CLIP_SKIP_HIRES)
    assert (r.mode, r.clip_skip, r.hires_scale, r.hires_steps) == ("txt2img", 2, 2, 10)
    assert r.hires_denoise == 0.45 and r.strength == 0.75
    assert r.hires_upscaler == "Lanczos" and r.extra["Hires upscaler"] == "R-ESRGAN 4x+"
    assert r.extra["Lora hashes"] == "gufeng boy_20230805210621: 60129e9d06ab"
    assert r.prompt == "masterpiece,gufeng boy,<lora:gufeng boy_20230805210621:0.8>,armor"
    written = r.to_infotext()
    assert (
        "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 10, "
        "Hires upscaler: R-ESRGAN 4x+, "
    ) in written
    # changed to an upscaler of ours: that name is written, A1111's is not repeated
    r.hires_upscaler = "Latent"
    _, _, pairs = split_infotext(r.to_infotext())
    assert [v for k, v in pairs if k == "Hires upscaler"] == ["Latent"]


def test_real_img2img_without_mode_key():
    r = Request.from_infotext(REAL_IMG2IMG)
    assert (r.mode, r.strength, r.prompt, r.negative_prompt) == (
        "img2img",
        0.35,
        "cat, dog, cute beavers",
        "horse",
    )
    assert (r.num_inference_steps, r.scheduler, r.guidance_scale, r.seed) == (
        5,
        "DPM++ SDE Karras",
        2.0,
        3342802166,
    )
    assert r.extra == {"Version": "v1.6.0-2-g4afaaf8a"}
    assert "Mode: img2img" in r.to_infotext()


def test_real_inpaint_without_mode_key():
    r = Request.from_infotext(REAL_INPAINT)
    assert (r.mode, r.strength, r.mask_blur, r.fill) == ("inpaint", 0.75, 4, "fill")
    assert (r.width, r.height) == (985, 1266)
    assert r.extra == {
        "Model hash": "b513c6287d",
        "Schedule type": "Automatic",
        "Version": "v1.9.4",
    }


@pytest.mark.parametrize(
    ("keys", "mode"),
    [
        ("Mask blur: 4", "inpaint"),
        ("Masked content: original", "inpaint"),
        ("Inpaint area: Only masked", "inpaint"),
        ("Masked area padding: 32", "inpaint"),
        ("Mask mode: Inpaint masked", "inpaint"),
        ("Denoising strength: 0.5, Mask blur: 4", "inpaint"),
        ("Denoising strength: 0.5", "img2img"),
        ("Denoising strength: 0.5, Hires upscale: 2", "txt2img"),
        ("Denoising strength: 0.5, Hires resize: 1024x1024", "txt2img"),
        ("Denoising strength: 0.5, First pass size: 0x0", "txt2img"),  # A1111 before 1.0
        ("Hires upscale: 1.5", "txt2img"),
        ("Version: v1.10.1", "txt2img"),
        ("Mode: img2img, Mask blur: 4", "img2img"),  # an explicit Mode wins
        ("Mode: txt2img, Denoising strength: 0.5", "txt2img"),
    ],
)
def test_mode_inferred_as_a1111s_tabs_imply(keys, mode):
    r = Request.from_infotext(f"a cat\nSteps: 20, Seed: 1, Size: 512x512, {keys}")
    assert r.mode == mode
    assert Request.from_infotext(r.to_infotext()) == r


def test_loras_field_written_as_prompt_tags_and_never_duplicated():
    loras = [{"name": "sdkcross", "weight": 0.8}, {"name": "b", "weight": 1}]
    r = Request(prompt="a <lora:x:1> cat", loras=loras, seed=1, num_inference_steps=20)
    text = r.to_infotext()
    assert text.split("\n")[0] == "a <lora:x:1> cat <lora:sdkcross:0.8> <lora:b:1>"
    parsed = Request.from_infotext(text)
    assert parsed.loras == [] and parsed.prompt == "a <lora:x:1> cat <lora:sdkcross:0.8> <lora:b:1>"
    assert parsed.to_infotext() == text  # stable: reading and writing again adds nothing
    assert Request(prompt="", loras=loras[:1]).to_infotext().startswith("<lora:sdkcross:0.8>")


def test_lora_and_ti_hashes_from_extra_written_back_exactly():
    extra = {
        "Lora hashes": "sdkcross: 0123456789ab, more_details: 3b8aa1d351ef",
        "TI hashes": "sdkdarkgreen: a1b2c3d4e5f6",
    }
    text = Request(prompt="x", seed=1, extra=dict(extra)).to_infotext()
    assert (
        'Lora hashes: "sdkcross: 0123456789ab, more_details: 3b8aa1d351ef", '
        'TI hashes: "sdkdarkgreen: a1b2c3d4e5f6"'
    ) in text
    assert Request.from_infotext(text).extra == extra


def test_hires_keys_in_a1111_order_and_read_back():
    r = Request(
        prompt="a cat",
        num_inference_steps=28,
        scheduler="DPM++ 2M Karras",
        guidance_scale=6.5,
        seed=5,
        width=512,
        height=768,
        clip_skip=2,
        hires_scale=1.5,
        hires_steps=15,
        hires_denoise=0.45,
        hires_upscaler="Lanczos",
    )
    line = r.to_infotext().split("\n")[-1]
    assert line.endswith(
        "Size: 512x768, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 1.5, "
        "Hires steps: 15, Hires upscaler: Lanczos"
    )
    assert Request.from_infotext(r.to_infotext()) == r
    plain = Request(prompt="a cat", hires_steps=9, hires_denoise=0.3)  # hires off
    assert "Hires" not in plain.to_infotext() and "Denoising" not in plain.to_infotext()
    on_img2img = Request(mode="img2img", prompt="a", hires_scale=2).to_infotext()
    assert "Hires" not in on_img2img  # img2img has no hires fix


def test_escaped_quotes_and_automatic_schedule():
    r = Request.from_infotext(A1111_ADETAILER)
    assert r.extra["ADetailer prompt"] == 'a "happy" face, smile'
    assert r.extra["ADetailer confidence"] == "0.3"
    assert r.scheduler == "Euler a"
    assert r.extra["Schedule type"] == "Automatic"
    assert r.extra["Version"] == "f2.0.1v1.10.1-previous-313-g8a042934"


def test_old_batch_text():
    r = Request.from_infotext(A1111_OLD_BATCH)
    assert r.scheduler == "PNDM"  # A1111's PLMS is diffusers' PNDM with PRK steps skipped
    assert r.num_images == 4 and r.seed == 3000000005
    assert r.extra == {"Batch pos": "2", "Model hash": "7460a6fa", "ENSD": "31337"}


def test_prompt_only_text_and_crlf():
    r = Request.from_infotext("just a prompt, nothing else\n")
    assert r.prompt == "just a prompt, nothing else" and r.num_inference_steps is None
    r = Request.from_infotext("a\r\nNegative prompt: b\r\nSteps: 5, Seed: 2, Size: 64x64\r\n")
    assert (r.prompt, r.negative_prompt, r.num_inference_steps, r.seed) == ("a", "b", 5, 2)


def test_a_prompt_with_colons_is_not_taken_for_parameters():
    r = Request.from_infotext("style: anime, mood: calm\nSteps: 5, Seed: 1, CFG scale: 2")
    assert r.prompt == "style: anime, mood: calm"
    # a last line with fewer than three pairs is the prompt, unless all its keys are ours
    assert Request.from_infotext("a: 1, b: 2").prompt == "a: 1, b: 2"
    assert Request.from_infotext("cat\nSteps: 4").num_inference_steps == 4


def test_unparseable_known_values_are_kept_in_extra():
    r = Request.from_infotext("x\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: -, Size: big")
    assert r.num_inference_steps is None and r.seed is None and r.width is None
    assert r.extra == {"Steps": "many", "Seed": "-", "Size": "big"}
    assert Request.from_infotext(r.to_infotext()) == r


def test_unknown_sampler_is_kept_and_flagged_by_validate():
    r = Request.from_infotext(
        "x\nSteps: 20, Sampler: DPM++ 3M SDE, Schedule type: Exponential, Seed: 1"
    )
    assert r.scheduler == "DPM++ 3M SDE"
    assert r.extra == {"Schedule type": "Exponential"}
    with pytest.raises(RequestError) as err:
        r.validate()
    assert err.value.field == "scheduler"


# ---------------------------------------------------------------------------- sdkit's own text


def test_sdkit_inpaint_text_has_its_keys():
    r = Request(
        mode="inpaint",
        prompt="a green triangle",
        negative_prompt="blurry",
        num_inference_steps=20,
        guidance_scale=7.5,
        width=64,
        height=64,
        seed=5,
        scheduler="PNDM",
        strength=0.8,
        mask_blur=4,
        grow=6,
        only_masked=True,
        padding=16,
        fill="noise",
        resize_mode="fill",
        num_images=2,
        model="embedded",
    )
    text = r.to_infotext(seed=6)
    assert text.split("\n") == [
        "a green triangle",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: PLMS, CFG scale: 7.5, Seed: 6, Size: 64x64, Model: embedded, "
        "Mode: inpaint, Denoising strength: 0.8, Resize mode: fill, Mask blur: 4, Mask grow: 6, "
        "Inpaint area: Only masked, Masked area padding: 16, Masked content: latent noise, "
        "Batch size: 2",
    ]
    back = Request.from_infotext(text)
    assert back.seed == 6
    assert back == Request(**{**r.__dict__, "seed": 6})


def test_txt2img_text_is_plain_a1111():
    r = Request(
        prompt="a",
        num_inference_steps=20,
        scheduler="Euler a",
        guidance_scale=7,
        seed=1,
        width=512,
        height=512,
    )
    assert r.to_infotext() == "a\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"


def test_values_are_json_quoted_when_needed():
    assert quote("plain") == "plain"
    assert quote("a, b") == '"a, b"'
    assert quote("a: b") == '"a: b"'
    assert quote('say "hi"') == json.dumps('say "hi"')
    assert quote("two\nlines") == '"two\\nlines"'
    assert quote(" padded") == '" padded"'
    assert quote("ünïcode, ok") == '"ünïcode, ok"'
    r = Request(prompt="p", num_inference_steps=1, model='m: "x", y\nz', extra={"Note": "a, b: c"})
    back = Request.from_infotext(r.to_infotext())
    assert back.model == 'm: "x", y\nz' and back.extra == {"Note": "a, b: c"}


def test_parse_params_rejects_non_parameter_lines():
    assert parse_params("Steps: 20, Seed: 1") == [("Steps", "20"), ("Seed", "1")]
    assert parse_params('A: "x, y", B: 2') == [("A", "x, y"), ("B", "2")]
    assert parse_params('A: "unterminated, B: 2') == [("A", '"unterminated'), ("B", "2")]
    assert parse_params("no colon here") is None
    assert parse_params("hello, world: 1") is None


def test_not_a_string():
    with pytest.raises(RequestError):
        Request.from_infotext(None)


# ---------------------------------------------------------------------------- PNG


def test_from_png_written_by_a1111_style_pnginfo(tmp_path):
    info = PngInfo()
    info.add_text("parameters", A1111_HIRES)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    r = Request.from_png(path)
    assert r.scheduler == "DPM++ 2M Karras" and r.seed == 2771394851
    assert Request.from_png(Image.open(path)) == r
    assert Request.from_png(str(path)) == r


def test_from_png_round_trip_of_our_text(tmp_path):
    r = Request(
        prompt="a red circle\non blue",
        num_inference_steps=3,
        seed=9,
        scheduler="DPM++ 2M SDE Karras",
    )
    info = PngInfo()
    info.add_itxt("parameters", r.to_infotext())
    path = tmp_path / "ours.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert Request.from_png(path) == r


def test_from_png_without_parameters(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(RequestError) as err:
        Request.from_png(path)
    assert err.value.field == "parameters"
    with pytest.raises(RequestError) as err:
        Request.from_png(tmp_path / "nope.png")
    assert err.value.field == "image"


# ---------------------------------------------------------------------------- property

_ALPHABET = "abcxyz XYZ019,:;()[]<>\"'!?-_.=/\\é中"
_line = (
    st.text(_ALPHABET, max_size=20)
    .map(str.strip)
    .filter(lambda s: not s.startswith("Negative prompt:"))
)
_text = st.lists(_line, max_size=4).map(lambda lines: "\n".join(lines).strip())
_key = (
    st.text("abcdefgh XYZ-/", min_size=1, max_size=12)
    .map(str.strip)
    .filter(lambda k: k and k[0].isalnum() and k not in KNOWN_KEYS and k != "Schedule type")
)
_value = st.text(_ALPHABET + "\n", max_size=15)
_a1111_schedulers = [n for n in scheduler_names() if not n.endswith("Scheduler")]


@st.composite
def requests(draw) -> Request:
    return Request(
        mode=draw(st.sampled_from(MODES)),
        prompt=draw(_text),
        negative_prompt=draw(_text),
        num_inference_steps=draw(st.integers(1, 1000)),
        guidance_scale=draw(st.none() | st.floats(0, 30, allow_nan=False)),
        width=draw(st.none() | st.integers(1, 512).map(lambda v: v * 8)),
        height=draw(st.none() | st.integers(1, 512).map(lambda v: v * 8)),
        seed=draw(st.none() | st.integers(0, 2**32 - 1)),
        scheduler=draw(st.none() | st.sampled_from(_a1111_schedulers)),
        num_images=draw(st.integers(1, 16)),
        strength=draw(st.floats(0.01, 1.0)),
        mask_blur=draw(st.integers(0, 64)),
        grow=draw(st.integers(0, 64)),
        only_masked=draw(st.booleans()),
        padding=draw(st.integers(0, 256)),
        fill=draw(st.sampled_from(FILLS)),
        resize_mode=draw(st.sampled_from(RESIZE_MODES)),
        model=draw(st.none() | _value),
        extra=draw(st.dictionaries(_key, _value, max_size=3)),
        clip_skip=draw(st.none() | st.integers(1, 12)),
        loras=draw(st.lists(_lora, max_size=2)),
        hires_scale=draw(st.none() | st.floats(1, 4)),
        hires_steps=draw(st.integers(0, 1000)),
        hires_denoise=draw(st.floats(0.001, 1)),
        hires_upscaler=draw(st.sampled_from(HIRES_UPSCALERS)),
    )


_lora = st.fixed_dictionaries(
    {"name": st.text("abcxyz XYZ019_-.", min_size=1, max_size=8), "weight": st.floats(0, 4)}
)


def _applies(r: Request) -> Request:
    """What infotext carries for r's mode (fields its mode does not read keep their
    defaults; `loras` come back as tags in the prompt)."""
    from sdkit import modes

    reads = modes.get(r.mode).fields
    d = dict(r.__dict__)
    defaults = Request()
    for name in (
        "strength",
        "resize_mode",
        "mask_blur",
        "grow",
        "only_masked",
        "padding",
        "fill",
        "hires_scale",
        "hires_steps",
        "hires_denoise",
        "hires_upscaler",
        "clip_skip",
        "loras",
    ):
        if name not in reads:
            d[name] = getattr(defaults, name)
    if r.hires_scale is None:
        for name in ("hires_steps", "hires_denoise", "hires_upscaler"):
            d[name] = getattr(defaults, name)
    if not r.only_masked:
        d["padding"] = defaults.padding
    if d["width"] is None or d["height"] is None:
        d["width"] = d["height"] = None
    if d["clip_skip"] == 1:
        d["clip_skip"] = None  # A1111 omits 1 (the same layer)
    d["prompt"], d["loras"] = with_lora_tags(r.prompt, d["loras"]), []
    return Request(**d)


@settings(max_examples=200, deadline=None)
@given(requests())
def test_infotext_round_trip_property(r):
    assert Request.from_infotext(r.to_infotext()) == _applies(r)


@settings(max_examples=50, deadline=None)
@given(requests())
def test_dict_round_trip_property(r):
    assert Request.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_upscale_writes_and_reads_its_factor_and_overlap():
    """Load PNG settings restores an upscale: its factor and tile overlap are recorded."""
    req = Request(
        mode="upscale",
        prompt="a red circle",
        upscale_factor=2.5,
        tile_overlap=12,
        strength=0.3,
        width=160,
        height=160,
        seed=4,
    )
    text = req.to_infotext()
    assert "Upscale factor: 2.5" in text and "Tile overlap: 12" in text
    back = Request.from_infotext(text)
    assert back.mode == "upscale" and not back.extra
    assert (back.upscale_factor, back.tile_overlap, back.strength) == (2.5, 12, 0.3)
    other = Request.from_infotext(text.replace("Mode: upscale, ", ""))  # not an upscale: kept
    assert other.upscale_factor == 2.0 and other.extra["Upscale factor"] == "2.5"
