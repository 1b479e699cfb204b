"""`Request`: validation (one clear error per bad field), defaults, the JSON dict."""

from __future__ import annotations

import base64
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from sdkit import modes
from sdkit.request import (
    FILLS,
    MODES,
    RANGES,
    Request,
    RequestError,
    image_to_base64,
    load_image,
    load_mask,
)


def rgb(w=16, h=16, colour=(200, 30, 40)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def mask(w=16, h=16) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, (4, 4, 12, 12))
    return m


def good(**fields) -> Request:
    base = {"prompt": "a red circle on a blue background"}
    mode = fields.get("mode", "txt2img")
    required = modes.get(mode).required if mode in {str(s.name) for s in modes.registered()} else ()
    if "image" in required:
        base["image"] = rgb()
    if "mask" in required:
        base["mask"] = mask()
    if mode == "unconditional":
        base["prompt"] = ""
    return Request(**{**base, **fields})


def error(req: Request, **kw) -> RequestError:
    with pytest.raises(RequestError) as info:
        req.validate(**kw)
    err = info.value
    assert str(err) == f"{err.field}: {err.message}"
    assert str(err).startswith(err.field + ":")
    return err


@pytest.mark.parametrize("mode", MODES)
def test_a_good_request_of_every_mode_validates(mode):
    good(
        mode=mode, num_inference_steps=20, guidance_scale=7.5, width=64, height=64, seed=1
    ).validate()


def test_none_fields_mean_model_default_and_are_valid():
    Request(prompt="x").validate()


def test_unknown_mode_names_the_allowed_ones():
    err = error(good(mode="text2img"))
    assert err.field == "mode"
    for m in MODES:
        assert m in err.message


@pytest.mark.parametrize(
    "fields, msg",
    [
        ({"mode": "txt2img", "prompt": ""}, "unconditional"),
        ({"mode": "txt2img", "prompt": "   "}, "non-empty"),
        ({"mode": "txt2img", "prompt": None}, "missing"),
        ({"mode": "img2img", "prompt": None}, "missing"),
        ({"mode": "inpaint", "prompt": 5}, "string"),
        ({"mode": "unconditional", "prompt": "a cat"}, "empty"),
    ],
)
def test_prompt_errors(fields, msg):
    err = error(good(**fields))
    assert err.field == "prompt"
    assert msg in err.message


def test_empty_prompt_is_fine_for_img2img_and_inpaint():
    good(mode="img2img", prompt="").validate()
    good(mode="inpaint", prompt="").validate()
    good(mode="unconditional", prompt=None).validate()


def test_negative_prompt_must_be_a_string():
    assert error(good(negative_prompt=None)).field == "negative_prompt"


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, "20", True])
def test_steps_out_of_range(steps):
    err = error(good(num_inference_steps=steps))
    assert err.field == "num_inference_steps"
    assert "1..1000" in err.message


@pytest.mark.parametrize("steps", [1, 1000, np.int64(30)])
def test_steps_in_range(steps):
    good(num_inference_steps=steps).validate()


@pytest.mark.parametrize("g", [-0.5, float("nan"), float("inf"), "7", True])
def test_bad_guidance(g):
    err = error(good(guidance_scale=g))
    assert err.field == "guidance_scale"
    assert "0..100" in err.message


def test_zero_guidance_is_allowed():
    good(guidance_scale=0).validate()


@pytest.mark.parametrize("name", ["width", "height"])
@pytest.mark.parametrize("value", [0, -8, 100, 4104, 64.0, "64"])
def test_bad_sizes_name_the_vae_factor(name, value):
    err = error(good(**{name: value}))
    assert err.field == name
    assert "multiple of 8" in err.message and "4096" in err.message


def test_size_hint_and_other_vae_factors():
    err = error(good(width=100))
    assert "try 96 or 104" in err.message
    good(width=68, height=4).validate(vae_factor=4)
    err = error(good(width=66), vae_factor=4)
    assert "multiple of 4" in err.message


@pytest.mark.parametrize("s", [0, -0.1, 1.01, float("nan"), None, "0.5"])
def test_bad_strength(s):
    err = error(good(mode="img2img", strength=s))
    assert err.field == "strength"
    assert "0.001..1" in err.message


def test_strength_one_is_allowed():
    good(mode="img2img", strength=1).validate()


@pytest.mark.parametrize("n", [0, 17, -1, 2.0])
def test_bad_num_images(n):
    err = error(good(num_images=n))
    assert err.field == "num_images"
    assert "1..16" in err.message


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "7"])
def test_bad_seed(seed):
    err = error(good(seed=seed))
    assert err.field == "seed"
    assert "0..4294967295" in err.message


def test_seed_edges_are_allowed():
    good(seed=0).validate()
    good(seed=2**32 - 1).validate()


@pytest.mark.parametrize("name", ["mask_blur", "grow", "padding"])
def test_negative_mask_numbers(name):
    err = error(good(mode="inpaint", **{name: -1}))
    assert err.field == name
    assert f"0..{RANGES[name][1]}" in err.message


def test_unknown_fill_lists_the_fills():
    err = error(good(mode="inpaint", fill="latent nothing"))
    assert err.field == "fill"
    for f in FILLS:
        assert f in err.message


def test_unknown_resize_mode_and_bad_only_masked():
    err = error(good(mode="img2img", resize_mode="stretch"))
    assert err.field == "resize_mode" and "crop" in err.message
    assert error(good(mode="inpaint", only_masked="yes")).field == "only_masked"


def test_unknown_scheduler_lists_known_names():
    err = error(good(scheduler="Euler b"))
    assert err.field == "scheduler"
    assert "Euler a" in err.message and "DPM++ 2M Karras" in err.message


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_image_missing(mode):
    err = error(good(mode=mode, image=None))
    assert err.field == "image"
    assert "missing" in err.message


def test_mask_missing_and_mask_size():
    err = error(good(mode="inpaint", mask=None))
    assert err.field == "mask" and "missing" in err.message
    err = error(good(mode="inpaint", mask=mask(16, 8)))
    assert err.field == "mask"
    assert "16x8" in err.message and "16x16" in err.message


def test_unreadable_images_name_the_field(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    err = error(good(mode="img2img", image=str(junk)))
    assert err.field == "image" and "junk.png" in err.message
    err = error(good(mode="img2img", image=tmp_path / "missing.png"))
    assert err.field == "image" and "no such image file" in err.message
    err = error(good(mode="inpaint", mask=b"\x89PNG garbage"))
    assert err.field == "mask"
    err = error(good(mode="img2img", image=12))
    assert err.field == "image" and "int" in err.message


def test_truncated_png_is_unreadable(tmp_path):
    path = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    path.write_bytes(buf.getvalue()[:200])
    err = error(good(mode="img2img", image=Image.open(path)))
    assert err.field == "image"


def test_validate_loads_paths_bytes_and_arrays(tmp_path):
    path = tmp_path / "in.png"
    rgb(16, 16, (1, 2, 3)).convert("RGBA").save(path)
    m = mask()
    buf = io.BytesIO()
    m.convert("RGB").save(buf, "PNG")
    req = good(mode="inpaint", image=path, mask=buf.getvalue())
    req.validate()
    assert isinstance(req.image, Image.Image) and req.image.mode == "RGB"
    assert req.image.getpixel((0, 0)) == (1, 2, 3)
    assert req.mask.mode == "L"
    assert np.array_equal(np.asarray(req.mask), np.asarray(m))
    req = good(mode="inpaint", image=np.zeros((16, 16, 3), np.uint8), mask=np.asarray(m))
    req.validate()
    assert req.image.size == (16, 16)


def test_load_helpers():
    b64 = image_to_base64(rgb(8, 8))
    assert load_image(b64).size == (8, 8)
    assert load_image("data:image/png;base64," + b64).size == (8, 8)
    assert load_mask(rgb(8, 8, (255, 255, 255))).getpixel((0, 0)) == 255
    with pytest.raises(RequestError) as err:
        load_image(np.zeros((4, 4), np.float32), "mask")
    assert err.value.field == "mask"


def test_error_is_a_value_error_and_pickles():
    err = RequestError("seed", "must be an integer in 0..4294967295, got -1")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.field, back.message, str(back)) == (err.field, err.message, str(err))


# ---------------------------------------------------------------------------- defaults


def test_with_defaults_fills_only_none_fields():
    req = Request(prompt="x", num_inference_steps=10, seed=None)
    filled = req.with_defaults(
        {
            "num_inference_steps": 50,
            "guidance_scale": 7.5,
            "width": 512,
            "height": 512,
            "scheduler": "PNDM",
            "not_a_field": 1,
        }
    )
    assert filled.num_inference_steps == 10
    assert (filled.guidance_scale, filled.width, filled.height, filled.scheduler) == (
        7.5,
        512,
        512,
        "PNDM",
    )
    assert filled.seed is None
    assert req.guidance_scale is None  # the original is untouched
    filled.extra["k"] = "v"
    assert req.extra == {}


# ---------------------------------------------------------------------------- dict


def test_dict_round_trip_without_images_is_json_safe():
    req = good(
        mode="inpaint",
        negative_prompt="blurry",
        num_inference_steps=np.int64(12),
        guidance_scale=6.5,
        width=64,
        height=48,
        seed=7,
        scheduler="Euler a",
        num_images=3,
        strength=0.5,
        mask_blur=2,
        grow=3,
        only_masked=True,
        padding=8,
        fill="noise",
        resize_mode="crop",
        model="embedded",
        extra={"Clip skip": "2"},
    )
    d = req.to_dict()
    text = json.dumps(d)
    assert "image" not in d and "mask" not in d
    back = Request.from_dict(json.loads(text))
    assert back.image is None and back.mask is None
    expected = Request(**{**req.__dict__, "image": None, "mask": None})
    assert back == expected


def test_dict_round_trip_with_images_keeps_pixels():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    req = good(mode="inpaint", image=img, mask=mask())
    d = json.loads(json.dumps(req.to_dict(images=True)))
    assert base64.b64decode(d["image"])[:8] == b"\x89PNG\r\n\x1a\n"
    back = Request.from_dict(d)
    assert np.array_equal(np.asarray(back.image), np.asarray(img))
    assert np.array_equal(np.asarray(back.mask), np.asarray(mask()))
    back.validate()


def test_from_dict_unknown_keys_are_named():
    with pytest.raises(RequestError) as err:
        Request.from_dict({"prompt": "x", "steps": 20, "cfg": 7})
    assert err.value.field == "steps"
    assert "'steps'" in err.value.message and "'cfg'" in err.value.message
    assert "num_inference_steps" in err.value.message


def test_from_dict_bad_inputs():
    with pytest.raises(RequestError) as err:
        Request.from_dict(["prompt"])
    assert err.value.field == "request"
    with pytest.raises(RequestError) as err:
        Request.from_dict({"mode": "img2img", "image": "bm90IGFuIGltYWdl" * 8})
    assert err.value.field == "image"
    with pytest.raises(RequestError) as err:
        Request.from_dict({"extra": ["a"]})
    assert err.value.field == "extra"


@pytest.mark.parametrize("name", sorted(RANGES))
@pytest.mark.parametrize("value", [10**400, -(10**400), 1e308, float("inf")])
def test_every_numeric_field_is_bounded_without_overflow(name, value):
    """Issue 13.2: huge values are a RequestError naming the field, never OverflowError."""
    err = error(good(mode="inpaint", **{name: value}))
    assert err.field == name and len(err.message) < 200


@pytest.mark.parametrize("name", sorted(RANGES))
def test_range_edges(name):
    lo, hi = RANGES[name]
    size = name in ("width", "height")
    fields = {"num_inference_steps": 1000} if name == "strength" else {}
    for ok in (8 if size else lo, 4096 if size else hi):
        good(mode="inpaint", **fields, **{name: ok}).validate()
    assert error(good(mode="inpaint", **{name: hi + 1})).field == name


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (1-bit grey) with next to no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("size", [(6000, 6000), (100_000, 100_000)])
def test_picture_over_the_pixel_limit_is_refused_from_its_header(size, tmp_path):
    """Issue 13.3: a small file claiming many pixels is refused before decoding; PIL's own
    bomb error (over ~179 Mpx) is a RequestError too, never an escaping exception."""
    data = _png_header_only(*size)
    assert len(data) < 100
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    for value in (data, path, base64.b64encode(data).decode()):
        with pytest.raises(RequestError) as err:
            load_image(value)
        assert err.value.field == "image" and "limit" in err.value.message
