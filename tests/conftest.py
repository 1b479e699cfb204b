"""Shared fixtures: tiny random-weight models saved once per session, engines on them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny diffusers pipelines: sd (4-ch), sd_inpaint (9-ch), sdxl, ddpm."""
    import tiny  # tests/ is on sys.path (rootdir conftest); imported lazily: it needs torch

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "sd": tiny.save(tiny.sd_pipeline(root / "sd"), root / "sd", tiny.TINY_DEFAULTS),
        "sd_inpaint": tiny.save(
            tiny.sd_pipeline(root / "sd_inpaint", inpainting=True),
            root / "sd_inpaint",
            tiny.TINY_DEFAULTS,
        ),
        "sdxl": tiny.save(tiny.sdxl_pipeline(root / "sdxl"), root / "sdxl", tiny.TINY_DEFAULTS),
        "ddpm": tiny.save(tiny.ddpm_pipeline(), root / "ddpm", {"num_inference_steps": 5}),
    }


@pytest.fixture(scope="session")
def sd_engine(tiny_models):
    from sdkit.engine import Engine

    engine = Engine(tiny_models["sd"], device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def inpaint_engine(tiny_models):
    from sdkit.engine import Engine

    engine = Engine(tiny_models["sd_inpaint"], device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def sdxl_engine(tiny_models):
    from sdkit.engine import Engine

    engine = Engine(tiny_models["sdxl"], device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def ddpm_engine(tiny_models):
    from sdkit.engine import Engine

    engine = Engine(tiny_models["ddpm"], device="cpu")
    yield engine
    engine.close()
