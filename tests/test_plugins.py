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
    for name in ("__init__.py", "docker.py", *plugins.SHARED_MODULES):
        assert (package / name).is_file(), name
    assert not list(package.rglob("__pycache__"))
    plugins.install("krita", tmp_path)  # re-installing over itself is fine


def test_install_gimp_layout_is_executable(tmp_path):
    package = plugins.install("gimp", tmp_path)
    script = package / "sdkit-gimp.py"
    assert package.name == script.stem  # GIMP wants plug-ins/NAME/NAME.py
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env python3")
    for name in plugins.SHARED_MODULES:
        assert (package / name).is_file(), name


BLOCK = "import sys; sys.path.insert(0, '.'); sys.modules.update(sdkit=None, zmq=None, PIL=None)\n"


def test_shared_modules_import_without_sdkit(tmp_path):
    """The copies next to the GIMP script work as plain top-level modules (stdlib only)."""
    package = plugins.install("gimp", tmp_path)
    code = BLOCK + (
        "import editor_actions as ea, editor_connection as conn, editor_geometry as geo\n"
        "import pictures, protocol, tracker\n"
        "r = geo.context_region(geo.Rect(1, 2, 3, 4), 20, 20)\n"
        "print(r.width, r.height, conn.tracker is tracker, conn.zmtp.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=package, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["24", "24", "True", "zmtp"]  # 20 px canvas, padded


def test_shared_modules_import_inside_the_krita_package(tmp_path):
    """In Krita they are modules of the plug-in's package (relative imports), still stdlib."""
    plugins.install("krita", tmp_path)
    code = BLOCK.replace("'.'", repr(str(tmp_path))) + (
        "from sdkit_krita import editor_actions, editor_connection, pictures, tracker\n"
        "print(editor_connection.zmtp.__name__, editor_actions.tracker is tracker)\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["sdkit_krita.zmtp", "True"], out.stderr


def test_editor_side_modules_import_only_the_standard_library():
    """What runs inside the editors imports the stdlib, each other, and the editor's API."""
    import ast

    editor_api = {"krita", "gi", "PyQt5", "PyQt6"}
    siblings = {name.removesuffix(".py") for name in plugins.SHARED_MODULES}
    siblings |= {p.stem for p in (plugins.HERE / "gimp").rglob("*.py")}  # the plug-in's own
    files = [plugins.HERE / name for name in plugins.SHARED_MODULES]
    files += list((plugins.HERE / "krita").rglob("*.py")) + list(
        (plugins.HERE / "gimp").rglob("*.py")
    )
    allowed = sys.stdlib_module_names | siblings | editor_api | {"__future__"}
    for path in files:
        tree = ast.parse(path.read_text())
        # PIL is optional: imported inside the functions that need it (pictures.to_image).
        lazy = {
            id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or (top == "PIL" and id(node) in lazy), (path.name, name)


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
