#!/usr/bin/env python3
"""Build the add-on zip: a Blender 4.2+ extension and a legacy (3.x) add-on in one file.

    python build_addon.py                # dist/fg3d_blender-0.1.0-linux-x64.zip, with the dependency wheels
    python build_addon.py --no-wheels    # dist/fg3d_blender-0.1.0-linux-x64-no-wheels.zip (small: for a
                                         #   Blender that has the dependencies or installs them itself)
    python build_addon.py -o DIR         # write the zip into DIR

Layout: everything sits in one top-level folder ``fg3d_blender/`` (the package, with ``bl_info``),
and ``blender_manifest.toml`` sits in that folder next to the package's ``__init__.py``.  Blender's
extension installer accepts a manifest in a single top-level folder, and the legacy installer
(``preferences.addon_install``) refuses a zip with ``__init__.py`` at its root, so this is the one
layout both accept (a manifest at the very root would need ``__init__.py`` at the root too).

Inside: the Python package, the compiled ``render_ext`` and ``landmark_ext`` for the building platform
(build them first: ``python setup.py build_ext --inplace``), ``models/`` (the asset manifest and the
project's own weights, never the third-party model files), ``requirements-runtime.txt`` (the dependency
list the add-on's Install Dependencies button installs) and, unless ``--no-wheels``, ``wheels/``: every
package of that list but the ones Blender 4.2+ ships (numpy), at the pinned versions, fetched once with
``pip wheel --no-deps`` into a cache outside the source tree (``$FG3D_WHEEL_CACHE`` or
``~/.cache/fg3d_blender/wheels``; more pip options with ``--pip-args``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent
PKG = "fg3d_blender"
RUNTIME_REQUIREMENTS = ROOT / "requirements-runtime.txt"  # the one list, shipped inside the zip too
MANIFEST_NAME = "blender_manifest.toml"
CODE_SUFFIXES = {".py", ".pyx"}
COMPILED = {"render_ext": "_raster", "landmark_ext": "_ert"}  # package → its compiled module
# models/ files of these kinds are shipped (the project's own); third-party ones are excluded by name
MODEL_SUFFIXES = {".json", ".md", ".txt", ".pt", ".pth", ".npz", ".npy", ".safetensors", ".onnx"}


def version() -> str:
    text = (ROOT / PKG / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        raise SystemExit("build_addon: __version__ not found in fg3d_blender/__init__.py")
    return m.group(1)


def blender_platform() -> str:
    """Blender's name for this platform (``linux-x64``, ``windows-x64``, ``macos-arm64`` …)."""
    system = {"linux": "linux", "win32": "windows", "darwin": "macos"}.get(sys.platform, sys.platform)
    machine = platform.machine().lower()
    arch = {"x86_64": "x64", "amd64": "x64", "arm64": "arm64", "aarch64": "arm64"}.get(machine, machine)
    return f"{system}-{arch}"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def package_files() -> List[Tuple[Path, str]]:
    """(source path, path inside the package folder) of the code, the compiled renderer and models/."""
    out: List[Tuple[Path, str]] = []
    src = ROOT / PKG
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    compiled = set()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not path.is_file() or "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts[0] == "models":
            continue  # taken from the repository's models/ below
        if path.suffix in CODE_SUFFIXES:
            out.append((path, rel.as_posix()))
        elif rel.parts[0] in COMPILED and path.name.endswith(ext_suffix):
            out.append((path, rel.as_posix()))
            compiled.add(rel.parts[0])
    for package, module in COMPILED.items():
        if package not in compiled:
            raise SystemExit(
                f"build_addon: {PKG}/{package}/{module}{ext_suffix} is missing; build it first: "
                f"{sys.executable} setup.py build_ext --inplace"
            )
    models = ROOT / "models"
    third_party = third_party_names()
    for path in sorted(models.rglob("*")):
        rel = path.relative_to(models)
        if (
            not path.is_file()
            or any(p.startswith(".") for p in rel.parts)
            or path.suffix not in MODEL_SUFFIXES
        ):
            continue
        if rel.as_posix() in third_party or path.name in {Path(t).name for t in third_party}:
            continue  # a third-party model file: never shipped, fetched by the user
        out.append((path, f"models/{rel.as_posix()}"))
    if not any(a == "models/assets.json" for _, a in out):
        raise SystemExit("build_addon: models/assets.json is missing")
    for p in ROOT.glob("LICENSE*"):
        out.append((p, p.name))
    out.append((RUNTIME_REQUIREMENTS, RUNTIME_REQUIREMENTS.name))  # the dependency installer's list
    return out


def third_party_names() -> set:
    data = json.loads((ROOT / "models" / "assets.json").read_text(encoding="utf-8"))
    return {a["path"] for a in data["assets"]}


def _runtime_list():
    """(pip options, requirements) of requirements-runtime.txt, read by the add-on's own reader."""
    sys.path.insert(0, str(ROOT))
    try:
        from fg3d_blender.core.dependencies import read_requirements  # the list's one reader
    finally:
        sys.path.remove(str(ROOT))
    return read_requirements(RUNTIME_REQUIREMENTS)


def wanted_wheels() -> Dict[str, str]:
    """{normalised name: pinned version} of requirements-runtime.txt, less what Blender 4.2+ ships."""
    return {_norm(r.dist): r.version for r in _runtime_list()[1] if not r.blender_ships}


def pip_options() -> List[str]:
    """The list's pip options (index URLs, if any), for ``pip wheel``."""
    return _runtime_list()[0]


def cached_wheels(cache: Path) -> Dict[str, Path]:
    """The wheels in ``cache`` that match the installed versions, by normalised name."""
    wanted = wanted_wheels()
    found = {}
    for whl in Path(cache).glob("*.whl"):
        dist, ver = whl.name.split("-")[:2]
        if wanted.get(_norm(dist)) == ver.replace("_", "+"):
            found[_norm(dist)] = whl
    return found


def collect_wheels(cache: Path, pip_args: List[str]) -> List[Path]:
    """The wheels of requirements-runtime.txt at their pinned versions; downloaded once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = wanted_wheels()
    have = cached_wheels(cache)
    missing = [f"{n}=={v}" for n, v in wanted.items() if n not in have]
    if missing:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(cache), *pip_options()]
        cmd += [*pip_args, *missing]
        print("build_addon: fetching wheels:", " ".join(missing), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(
                "build_addon: could not fetch the wheels (see pip's message above); "
                "use --no-wheels, or --pip-args for another index"
            )
    found = cached_wheels(cache)
    still = [n for n in wanted if n not in found]
    if still:
        raise SystemExit(f"build_addon: no wheel for {', '.join(still)} in {cache}")
    return [found[n] for n in wanted]


def manifest_toml(ver: str, wheels: List[str]) -> str:
    bl = _bl_info()
    lines = [
        'schema_version = "1.0.0"',
        f'id = "{PKG}"',
        f'version = "{ver}"',
        f'name = "{bl["name"]}"',
        'tagline = "Reconstruct a textured, editable 3D face mesh from one photo"',
        f'maintainer = "{bl["author"]}"',
        'type = "add-on"',
        'tags = ["Import-Export", "Mesh"]',
        'blender_version_min = "4.2.0"',
        'license = ["SPDX:BSD-2-Clause"]',
        f'platforms = ["{blender_platform()}"]',
    ]
    if wheels:
        lines.append("wheels = [")
        lines += [f'  "./wheels/{w}",' for w in wheels]
        lines.append("]")
    lines += [
        "",
        "[permissions]",
        'files = "Read photos and keep the model files in a cache folder"',
        'network = "Download the model files when asked (Fetch Assets)"',
        "",
    ]
    return "\n".join(lines)


def _bl_info() -> dict:
    import ast

    tree = ast.parse((ROOT / PKG / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "bl_info" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("build_addon: bl_info not found in fg3d_blender/__init__.py")


def default_wheel_cache() -> Path:
    """Where downloaded wheels are kept: outside the source tree (``$FG3D_WHEEL_CACHE`` or the user cache)."""
    env = os.environ.get("FG3D_WHEEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fg3d_blender" / "wheels"


def zip_name(ver: str, with_wheels: bool) -> str:
    """``fg3d_blender-VER-PLATFORM.zip`` with the wheels, ``…-no-wheels.zip`` without: both can sit side
    by side, and the name says which platform's compiled renderer and wheels are inside."""
    return f"{PKG}-{ver}-{blender_platform()}{'' if with_wheels else '-no-wheels'}.zip"


def build(
    out_dir: Path,
    with_wheels: bool = True,
    wheel_cache: Optional[Path] = None,
    pip_args: Optional[List[str]] = None,
) -> Path:
    ver = version()
    files = package_files()
    wheels = collect_wheels(wheel_cache or default_wheel_cache(), pip_args or []) if with_wheels else []
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / zip_name(ver, with_wheels)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{PKG}/{MANIFEST_NAME}", manifest_toml(ver, [w.name for w in wheels]))
            for src, arc in files:
                z.write(src, f"{PKG}/{arc}")
            for whl in wheels:  # already compressed
                z.write(whl, f"{PKG}/wheels/{whl.name}", compress_type=zipfile.ZIP_STORED)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default=str(ROOT / "dist"), metavar="DIR", help="output folder (dist/)")
    p.add_argument(
        "--no-wheels",
        action="store_true",
        help="leave the dependency wheels out (for a Blender that already has them)",
    )
    p.add_argument(
        "--wheel-cache",
        default=None,
        metavar="DIR",
        help="where wheels are kept ($FG3D_WHEEL_CACHE or ~/.cache/fg3d_blender/wheels)",
    )
    p.add_argument("--pip-args", default="", help="extra arguments for `pip wheel` (quoted)")
    args = p.parse_args(argv)
    dest = build(
        Path(args.output),
        with_wheels=not args.no_wheels,
        wheel_cache=Path(args.wheel_cache) if args.wheel_cache else None,
        pip_args=shlex.split(args.pip_args),
    )
    size = dest.stat().st_size / 1e6
    print(f"{dest} ({size:.1f} MB{', no wheels' if args.no_wheels else ''}; Blender {blender_platform()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
