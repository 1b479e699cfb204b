"""The type checker (mypy, offline, the config in pyproject.toml) finds nothing in sdkit/,
widgets/ and bridge/, nor in the editor plug-ins as `sdkit plugin install` lays them out.

mypy has no notion of setuptools' package-dir mapping (widgets/ is imported as
sdkit.widgets, bridge/ as sdkit.bridge), so the checked tree is a folder of links that
spells the installed names. Run `python tests/test_types.py` to see the errors by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sdkit.bridge import plugins

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".mypy_cache"  # mypy keeps it out of git (it writes its own .gitignore)
PACKAGES = {"widgets": ROOT / "widgets", "bridge": ROOT / "bridge"}


def link_tree(where: Path) -> Path:
    """`where/sdkit` with links to sdkit/'s entries plus widgets/ and bridge/; returns `where`."""
    pkg = where / "sdkit"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for entry in (ROOT / "sdkit").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, target in PACKAGES.items():
        (pkg / name).symlink_to(target)
    return where


def mypy(args: list[str], path: Path) -> tuple[int, str]:
    """Run mypy with the project's config and `path` as MYPYPATH; (exit status, output)."""
    env = {**os.environ, "MYPYPATH": str(path)}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    cmd += ["--cache-dir", str(CACHE), "--no-error-summary", "--hide-error-context", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return out.returncode, out.stdout + out.stderr


def _where(path: Path) -> str:
    """How mypy prints `path`: relative to its working directory when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check_package() -> tuple[int, str]:
    tree = link_tree(CACHE / "sdkit-tree")
    rc, out = mypy(["-p", "sdkit"], tree)
    top = _where(tree / "sdkit")
    for name in PACKAGES:  # report repository paths, not the links'
        out = out.replace(f"{top}/{name}/", f"{name}/")
    return rc, out.replace(f"{top}/", "sdkit/")


def check_plugins() -> tuple[int, str]:
    # a fixed place: mypy's cache remembers the paths it reported errors under
    where = CACHE / "plugins"
    if where.exists():
        shutil.rmtree(where)
    krita = plugins.install("krita", where / "pykrita")
    gimp = plugins.install("gimp", where / "plug-ins")
    rc1, out1 = mypy(["-p", krita.name], krita.parent)
    # the script alone: its copied modules are checked above, as a package (at the top
    # level their `from . import` fallback is a blocking error for mypy)
    rc2, out2 = mypy(["--follow-imports=skip", str(gimp / f"{gimp.name}.py")], gimp)
    out = out1 + out2
    for folder, repo in ((krita, "bridge/krita/sdkit_krita"), (gimp, "bridge/gimp/sdkit-gimp")):
        for name in plugins.SHARED_MODULES:  # copies of bridge/<name>
            out = out.replace(f"{_where(folder)}/{name}:", f"bridge/{name}:")
        out = out.replace(f"{_where(folder)}/", f"{repo}/")
    return max(rc1, rc2), out


@pytest.mark.slow
def test_sdkit_widgets_and_bridge_type_check():
    rc, out = check_package()
    assert rc == 0 and "error" not in out, out


@pytest.mark.slow
def test_editor_plugins_type_check_as_installed():
    rc, out = check_plugins()
    assert rc == 0 and "error" not in out, out


if __name__ == "__main__":
    # the Krita package holds copies of bridge modules: one line per finding
    out = check_package()[1] + check_plugins()[1]
    print("".join(dict.fromkeys(out.splitlines(keepends=True))), end="")
