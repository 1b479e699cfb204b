"""`sdkit plugin install|path krita|gimp` (bridge/plugins.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sdkit.bridge import plugins


@pytest.mark.parametrize(
    ("editor", "platform", "env", "expected"),
    [
        ("krita", "linux", {"HOME": "/h"}, "/h/.local/share/krita/pykrita"),
        ("krita", "linux", {"HOME": "/h", "XDG_DATA_HOME": "/d"}, "/d/krita/pykrita"),
        ("gimp", "linux", {"HOME": "/h"}, "/h/.config/GIMP/3.0/plug-ins"),
        ("krita", "darwin", {"HOME": "/h"}, "/h/Library/Application Support/krita/pykrita"),
        ("gimp", "darwin", {"HOME": "/h"}, "/h/Library/Application Support/GIMP/3.0/plug-ins"),
        ("krita", "win32", {"HOME": "/h", "APPDATA": "/a"}, "/a/krita/pykrita"),
        ("gimp", "win32", {"HOME": "/h", "APPDATA": "/a"}, "/a/GIMP/3.0/plug-ins"),
    ],
)
def test_default_dir_per_os(editor, platform, env, expected):
    assert plugins.default_dir(editor, platform=platform, env=env) == Path(expected)


def test_unknown_editor_is_refused():
    with pytest.raises(ValueError, match="krita, gimp"):
        plugins.default_dir("photoshop")


def test_install_krita_layout(tmp_path):
    package = plugins.install("krita", tmp_path)
    assert package == tmp_path / "sdkit_krita"
    assert (tmp_path / "sdkit_krita.desktop").read_text().count("X-KDE-Library=sdkit_krita") == 1
    for name in ("__init__.py", "docker.py", "protocol.py", "zmtp.py", "editor_common.py"):
        assert (package / name).is_file(), name
    assert not list(package.rglob("__pycache__"))
    plugins.install("krita", tmp_path)  # re-installing over itself is fine


def test_install_gimp_layout_is_executable(tmp_path):
    package = plugins.install("gimp", tmp_path)
    script = package / "sdkit-gimp.py"
    assert package.name == script.stem  # GIMP wants plug-ins/NAME/NAME.py
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env python3")
    for name in ("protocol.py", "zmtp.py", "editor_common.py"):
        assert (package / name).is_file(), name


def test_shared_modules_import_without_sdkit(tmp_path):
    """The copies next to the GIMP script work as plain top-level modules (stdlib only)."""
    package = plugins.install("gimp", tmp_path)
    code = (
        "import sys; sys.path.insert(0, '.'); sys.modules['sdkit'] = None; sys.modules['zmq'] = None\n"
        "import editor_common as ec\n"
        "r = ec.context_region(ec.Rect(1, 2, 3, 4), 20, 20)\n"
        "print(r.width, r.height, ec.protocol.VERSION, ec._import_zmtp().__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=package, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["24", "24", "1", "zmtp"]  # 20 px canvas, padded


def test_cli_install_and_path(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sdkit")
    plugins.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plugin", "install", "gimp", "--dir", str(tmp_path)])
    assert args.func(args) == 0
    assert str(tmp_path / "sdkit-gimp") in capsys.readouterr().out
    args = parser.parse_args(["plugin", "path", "krita"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(plugins.default_dir("krita"))
    with pytest.raises(SystemExit):
        parser.parse_args(["plugin", "install", "inkscape"])
