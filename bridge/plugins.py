"""`sdkit plugin install|path krita|gimp`: put the editor plug-ins where the editors look.

A plug-in is copied together with the standard-library modules it needs
(`SHARED_MODULES`), because the editors' own Pythons have neither sdkit nor pyzmq. The CLI calls :func:`register` to add the subcommand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_MODULES = (
    "protocol.py",
    "zmtp.py",
    "tracker.py",
    "pictures.py",
    "editor_geometry.py",
    "editor_connection.py",
    "editor_actions.py",
    "editor_expand.py",
    "editor_control.py",
)
EDITORS = ("krita", "gimp")

KRITA_PACKAGE = "sdkit_krita"
GIMP_PLUGIN = "sdkit-gimp"


def default_dir(editor: str, *, platform: str | None = None, env: dict | None = None) -> Path:
    """The folder where ``editor`` looks for user plug-ins on this OS.

    Krita: its ``pykrita`` resource folder. GIMP 3: its ``plug-ins`` folder in the user
    configuration (each plug-in in a sub-folder of the same name).
    """
    _check_editor(editor)
    platform = platform or sys.platform
    environ = os.environ if env is None else env
    home = Path(environ.get("HOME") or Path.home())
    if platform.startswith("win"):
        base = Path(environ.get("APPDATA") or home / "AppData" / "Roaming")
        return (
            base / "krita" / "pykrita" if editor == "krita" else base / "GIMP" / "3.0" / "plug-ins"
        )
    if platform == "darwin":
        base = home / "Library" / "Application Support"
        return (
            base / "krita" / "pykrita" if editor == "krita" else base / "GIMP" / "3.0" / "plug-ins"
        )
    if editor == "krita":
        data = Path(environ.get("XDG_DATA_HOME") or home / ".local" / "share")
        return data / "krita" / "pykrita"
    config = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    return config / "GIMP" / "3.0" / "plug-ins"


def _check_editor(editor: str) -> None:
    if editor not in EDITORS:
        raise ValueError(f"editor must be one of {', '.join(EDITORS)}, got {editor!r}")


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(
        src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )


def install(editor: str, directory: str | Path | None = None) -> Path:
    """Copy the plug-in for ``editor`` into ``directory`` (default: the editor's own).

    Returns the folder that now holds the plug-in's code. Re-running replaces the files.
    """
    _check_editor(editor)
    target = Path(directory) if directory is not None else default_dir(editor)
    target.mkdir(parents=True, exist_ok=True)
    if editor == "krita":
        shutil.copy2(HERE / "krita" / f"{KRITA_PACKAGE}.desktop", target)
        package = target / KRITA_PACKAGE
        _copy_tree(HERE / "krita" / KRITA_PACKAGE, package)
    else:
        package = target / GIMP_PLUGIN
        _copy_tree(HERE / "gimp" / GIMP_PLUGIN, package)
        script = package / f"{GIMP_PLUGIN}.py"
        # GIMP runs plug-ins as programs: the entry script must be executable.
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    for name in SHARED_MODULES:
        shutil.copy2(HERE / name, package / name)
    return package


def _cmd_install(args: argparse.Namespace) -> int:
    target = Path(args.dir) if args.dir else default_dir(args.editor)
    package = install(args.editor, target)
    print(f"installed the {args.editor} plug-in into {package}")
    if args.editor == "krita":
        print(
            "next: restart Krita, enable 'sdkit' in Settings > Configure Krita > "
            "Python Plugin Manager, restart again, then Settings > Dockers > sdkit"
        )
    else:
        print("next: restart GIMP; the actions are under Filters > sdkit")
    print("the plug-in talks to a running server: start one with `sdkit serve`")
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    print(default_dir(args.editor))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plugin install|path krita|gimp`` to the ``sdkit`` command line.

    Each leaf parser sets ``func`` to a callable taking the parsed arguments and
    returning an exit status.
    """
    parser = subparsers.add_parser(
        "plugin",
        help="install the Krita or GIMP plug-in",
        description="Install the Krita or GIMP plug-in, or print where it goes.",
    )
    sub = parser.add_subparsers(dest="plugin_command", required=True, metavar="{install,path}")
    p_install = sub.add_parser("install", help="copy the plug-in into the editor's plug-in folder")
    p_install.add_argument("editor", choices=EDITORS)
    p_install.add_argument("--dir", help="plug-in folder (default: the editor's, see `path`)")
    p_install.set_defaults(func=_cmd_install)
    p_path = sub.add_parser("path", help="print the editor's default plug-in folder")
    p_path.add_argument("editor", choices=EDITORS)
    p_path.set_defaults(func=_cmd_path)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m sdkit.bridge.plugins``), same as ``sdkit plugin``."""
    parser = argparse.ArgumentParser(prog="sdkit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
