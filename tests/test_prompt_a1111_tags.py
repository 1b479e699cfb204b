"""A1111 compatibility of prompt words for adapters (issue 14), on a tiny real pipeline:
`<lyco:NAME:W>` is `<lora:NAME:W>` (A1111's built-in Lora network registers `lyco` as its
alias), and embedding names match regardless of case, as in A1111, whose tokenizer
lowercases the prompt and the embedding name alike before matching their token ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_lora import kohya_lora

from sdkit.engine import Engine
from sdkit.prompt_syntax import lora_tags, without_lora_tags
from sdkit.request import Request

KW = {"seed": 4, "num_inference_steps": 3, "guidance_scale": 7.5, "scheduler": "PNDM"}
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    from diffusers import StableDiffusionPipeline

    loras = tmp_path_factory.mktemp("loras")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
    kohya_lora(pipe, loras / "kohya_a.safetensors", seed=1)
    embeddings = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(5)
    # two vectors each (A1111 .pt): a second vector only counts when the word is expanded
    for name in ("tinystyle", "CamelStyle"):
        vectors = torch.randn(2, 32, generator=g)
        torch.save({"string_to_param": {"*": vectors}, "name": name}, embeddings / f"{name}.pt")
    return loras, embeddings


@pytest.fixture(scope="module")
def engine(tiny_models, folders):
    torch.set_num_threads(1)
    loras, embeddings = folders
    eng = Engine(tiny_models["sd"], device="cpu", lora_dirs=[loras], embedding_dirs=[embeddings])
    yield eng
    eng.close()


def run(engine, prompt, **fields):
    return engine.generate(Request(prompt=prompt, **{**KW, **fields}), progress=False)


def arr(result) -> np.ndarray:
    return np.asarray(result[0])


def test_lyco_tags_are_lora_tags():
    assert lora_tags("a <lyco:x:0.5> b <lora:y>") == ("a  b ", [("x", 0.5), ("y", 1.0)])
    assert without_lora_tags("a <lyco:x:0.5>, b") == "a , b"
    assert lora_tags("<hypernet:x:1>") == ("<hypernet:x:1>", [])  # other networks stay
    with pytest.raises(ValueError, match="lyco"):
        lora_tags("<lyco:x:heavy>")


def test_a_lyco_tag_applies_the_lora(engine):
    lyco = run(engine, f"{PROMPT} <lyco:kohya_a:0.7>")
    lora = run(engine, f"{PROMPT} <lora:kohya_a:0.7>")
    plain = run(engine, f"{PROMPT} ")
    assert np.array_equal(arr(lyco), arr(lora))
    assert not np.array_equal(arr(lyco), arr(plain))
    assert "Lora hashes: " in lyco.infotexts[0] and "kohya_a: " in lyco.infotexts[0]


def test_embedding_names_match_regardless_of_case(engine):
    # mixed case first, on an engine that has loaded nothing yet
    for word, name in (
        ("TinyStyle", "tinystyle"),
        ("TINYSTYLE", "tinystyle"),
        ("camelstyle", "CamelStyle"),
    ):
        mixed = run(engine, f"a {word} circle", negative_prompt=f"({word.upper()}:0.5)")
        exact = run(engine, f"a {name} circle", negative_prompt=f"({name}:0.5)")
        assert np.array_equal(arr(mixed), arr(exact)), word
        assert (
            f'TI hashes: "{name}: ' in mixed.infotexts[0]
            or f"TI hashes: {name}: " in mixed.infotexts[0]
        )
    # the word really is the embedding: another word draws something else
    other = run(engine, "a plainstyle circle", negative_prompt="(plainstyle:0.5)")
    assert not np.array_equal(
        arr(other), arr(run(engine, "a tinystyle circle", negative_prompt="(tinystyle:0.5)"))
    )


def test_both_vectors_of_a_mixed_case_word_reach_clip(engine):
    from sdkit import conditioning

    pipe = engine.pipeline("txt2img")
    run(engine, "a tinystyle circle")  # loaded (it stays in the tokenizer)
    assert conditioning.embedding_spelling(pipe, "a TinyStyle, (TINYSTYLE:1.2)") == (
        "a tinystyle, (tinystyle:1.2)"
    )
    expanded = conditioning._convert(
        pipe, conditioning.embedding_spelling(pipe, "a TinyStyle"), pipe.tokenizer
    )
    assert expanded.split() == ["a", "tinystyle", "tinystyle_1"]
    assert conditioning.embedding_spelling(pipe, "a red circle") == "a red circle"
