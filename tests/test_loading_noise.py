"""Issue 12.8: loading a model prints nothing of its own; the libraries' settings survive it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from diffusers.utils import logging as dlog
from transformers.utils import logging as tlog

from sdkit.models import load_model, quiet_loading

# A fresh interpreter: transformers warns once per process and diffusers imports a pipeline
# module once, so in a shared test process an earlier test could hide the noise.
LOAD = "from sdkit.models import load_model; m = load_model(); print('loaded', m.name)"


@pytest.mark.slow
def test_loading_the_embedded_model_is_quiet():
    out = subprocess.run(
        [sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "loaded sdkit-embedded"
    assert "Loading pipeline components" not in out.stderr
    assert "Loading weights" not in out.stderr
    assert "torchvision" not in out.stderr
    assert out.stderr.strip() == ""


def test_quiet_loading_restores_what_the_user_set(capfd):
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    try:
        for lib in (dlog, tlog):
            lib.set_verbosity_info()
            lib.disable_progress_bar()
        with quiet_loading():
            assert dlog.get_verbosity() == tlog.get_verbosity() == tlog.ERROR
        assert dlog.get_verbosity() == tlog.get_verbosity() == tlog.INFO
        assert not dlog.is_progress_bar_enabled() and not tlog.is_progress_bar_enabled()

        for lib in (dlog, tlog):
            lib.set_verbosity_warning()
            lib.enable_progress_bar()
        load_model()
        assert dlog.get_verbosity() == tlog.get_verbosity() == tlog.WARNING
        assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()
        assert "Loading pipeline components" not in capfd.readouterr().err
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()
