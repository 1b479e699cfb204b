"""Adapter folders, A1111 short hashes and the `<lora:...>` tag parser (no model needed)."""

from __future__ import annotations

import hashlib
import os

import pytest

from sdkit.adapters import (
    AdapterFolders,
    format_hashes,
    lora_info,
    parse_hashes,
    safetensors_header,
    short_hash,
)
from sdkit.prompt_syntax import lora_tags, without_lora_tags
from sdkit.request import RequestError


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folders_in_order_given_env_next_to_model_then_shipped(tmp_path):
    given, env1, env2 = tmp_path / "given", tmp_path / "env1", tmp_path / "env2"
    model = tmp_path / "models" / "mymodel"
    (model / "loras").mkdir(parents=True)
    touch(given / "a.safetensors")
    touch(env1 / "a.safetensors")  # shadowed by the given folder
    touch(env1 / "b.safetensors")
    touch(env2 / "c.safetensors")
    touch(model / "loras" / "d.safetensors")
    touch(tmp_path / "models" / "loras" / "e.safetensors")  # next to the model folder
    touch(given / "notes.txt")
    touch(given / "emb.pt")  # another kind's file type
    folders = AdapterFolders(
        lora_dirs=[given],
        model_path=model,
        embedded=True,
        environ={"SDKIT_LORA_DIRS": f"{env1}{os.pathsep}{env2}"},
    )
    assert folders.folders("lora")[:5] == [
        given,
        env1,
        env2,
        model / "loras",
        tmp_path / "models" / "loras",
    ]
    assert folders.names("lora") == ["a", "b", "c", "d", "e", "sdkcross"]
    assert folders.find("lora", "a") == given / "a.safetensors"
    assert folders.names("embedding") == ["sdkdarkgreen"]  # the shipped .pt only


def test_single_file_model_folders_are_beside_it(tmp_path):
    ckpt = touch(tmp_path / "m.safetensors")
    touch(tmp_path / "embeddings" / "style.pt")
    touch(tmp_path / "controlnet" / "canny" / "config.json", b"{}")
    folders = AdapterFolders(model_path=ckpt, environ={})
    assert folders.names("embedding") == ["style"]
    assert folders.names("control") == ["canny"]
    assert folders.names("lora") == []


def test_unknown_name_lists_every_folder_searched(tmp_path):
    folders = AdapterFolders(lora_dirs=[tmp_path / "x", tmp_path / "y"], environ={})
    with pytest.raises(RequestError) as err:
        folders.find("lora", "missing")
    assert err.value.field == "loras"
    assert "'missing'" in str(err.value)
    assert str(tmp_path / "x") in str(err.value) and str(tmp_path / "y") in str(err.value)
    with pytest.raises(ValueError):
        folders.names("hypernetwork")


def test_short_hash_is_a1111s(tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "l.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(lora), {"ss_note": "a"})
    raw = lora.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert short_hash(lora, "lora") == hashlib.sha256(raw[8 + n :]).hexdigest()[:12]
    assert short_hash(lora, "embedding") == hashlib.sha256(raw).hexdigest()[:12]
    # A1111's addnet hash ignores the metadata: another header, the same hash
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(lora), {"ss_note": "b"})
    assert short_hash(lora, "lora") == hashlib.sha256(raw[8 + n :]).hexdigest()[:12]


def test_hashes_text_round_trip():
    text = format_hashes([("sdkcross", "e34e8a742d19"), ("a:b,c", "0123456789ab")])
    assert text == "sdkcross: e34e8a742d19, abc: 0123456789ab"
    assert parse_hashes(text) == {"sdkcross": "e34e8a742d19", "abc": "0123456789ab"}


def test_header_checks_catch_truncation_and_garbage(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "g.safetensors"
    save_file({"a.lora_down.weight": torch.ones(4, 4)}, str(good))
    assert "a.lora_down.weight" in safetensors_header(good)
    cut = touch(tmp_path / "cut.safetensors", good.read_bytes()[:-10])
    junk = touch(tmp_path / "junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    for bad in (cut, junk, touch(tmp_path / "tiny.safetensors", b"abc")):
        with pytest.raises(ValueError):
            safetensors_header(bad)
    notlora = tmp_path / "w.safetensors"
    save_file({"conv.weight": torch.ones(2)}, str(notlora))
    with pytest.raises(ValueError, match="not a LoRA"):
        lora_info(notlora)


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a red x", "a red x", []),
        ("a red x <lora:sdkcross:0.8>", "a red x ", [("sdkcross", 0.8)]),
        ("<lora:a>a <lora:b:1.5> c", "a  c", [("a", 1.0), ("b", 1.5)]),
        ("(red:1.2) <lora:my style v1.5:.5>, x", "(red:1.2) , x", [("my style v1.5", 0.5)]),
        ("<hypernet:h:1> stays", "<hypernet:h:1> stays", []),
    ],
)
def test_lora_tags_are_found_and_removed_from_the_text(prompt, text, tags):
    assert lora_tags(prompt) == (text, tags)
    assert without_lora_tags(prompt) == text


def test_plain_prompt_comes_back_as_the_same_string():
    prompt = "a red circle on a blue background"
    assert lora_tags(prompt)[0] is prompt


@pytest.mark.parametrize("tag", ["<lora:>", "<lora:x:abc>", "<lora:x:1:2>", "<lora::1>"])
def test_bad_tags_are_errors(tag):
    with pytest.raises(ValueError, match="lora"):
        lora_tags(f"a {tag}")
