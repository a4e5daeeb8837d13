"""Add-on preferences: what is installed (dependencies with versions, model files, cache size), the
Install Dependencies and Fetch Assets buttons, the asset cache and mirror folders, threads, licences."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import bpy
from bpy.props import IntProperty, StringProperty

from ..core import dependencies
from ..core.assets import (
    CACHE_ENV,
    MIRROR_ENV,
    asset_report,
    cache_bytes,
    cache_dir,
    manifest,
    unusable_assets,
)
from ..core.errors import FG3DError
from .job import running_label

#: The add-on's module name: ``fg3d_blender`` (legacy add-on, bpy module) or
#: ``bl_ext.<repository>.fg3d_blender`` (Blender 4.2+ extension).
ADDON_ID = (__package__ or "fg3d_blender.operators").rsplit(".", 1)[0]


class FG3D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    cache_dir: StringProperty(  # type: ignore[valid-type]
        name="Asset cache folder",
        subtype="DIR_PATH",
        default="",
        description="Where the model files are kept (empty: $FG3D_CACHE_DIR or ~/.cache/fg3d_blender)",
    )
    mirror_dir: StringProperty(  # type: ignore[valid-type]
        name="Mirror folder",
        subtype="DIR_PATH",
        default="",
        description="A folder that already holds the model files (same layout); they are copied from "
        "there instead of downloaded (empty: $FG3D_ASSET_MIRROR or the upstream URLs)",
    )
    threads: IntProperty(  # type: ignore[valid-type]
        name="Threads",
        default=0,
        min=0,
        max=256,
        description="CPU threads for every stage: OpenCV, BLAS and the networks (0 = automatic: one, "
        "the fastest measured)",
    )

    def draw(self, context):
        draw_preferences(self.layout, self)


def deps_dir() -> Path:
    """The add-on's own folder for the packages Install Dependencies adds (per Python version)."""
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if ADDON_ID.startswith("bl_ext.") and hasattr(bpy.utils, "extension_path_user"):
        return Path(bpy.utils.extension_path_user(ADDON_ID, path=f"site-packages-{ver}", create=False))
    return Path(bpy.utils.user_resource("SCRIPTS", path=os.path.join("fg3d_blender_deps", ver)))


_status: Dict[str, Any] = {}  # what the preferences show, read at most every few seconds (draw is frequent)


def refresh_status() -> None:
    _status.clear()


def status() -> Dict[str, Any]:
    if _status and time.monotonic() - _status["at"] < 5.0:
        return _status
    _status.clear()
    _status["at"] = time.monotonic()
    try:
        _status["deps"] = [(r, v) for r, v in dependencies.status() if r.module is not None]
    except FG3DError as exc:
        _status["deps"], _status["deps_error"] = [], str(exc)
    _status["missing_modules"] = [r.module for r, v in _status["deps"] if v is None]
    try:
        _status["assets"] = asset_report()
        _status["cache"] = (str(cache_dir()), cache_bytes())
    except FG3DError as exc:
        _status["assets"], _status["cache"], _status["assets_error"] = {}, None, str(exc)
    _status["unusable_assets"] = unusable_assets(_status["assets"])
    return _status


def draw_preferences(layout, prefs) -> None:
    st = status()
    box = layout.box()
    missing = st["missing_modules"]
    head = box.row()
    if st.get("deps_error"):
        head.label(text=st["deps_error"], icon="ERROR")
    elif missing:
        head.label(text=f"Missing Python modules: {', '.join(missing)}", icon="ERROR")
    else:
        head.label(text="Python modules: all present", icon="CHECKMARK")
    grid = box.grid_flow(columns=2, even_columns=True)
    for r, v in st["deps"]:
        grid.label(text=f"{r.module} {v or 'missing'}", icon="DOT" if v else "X")
    row = box.row()
    row.operator("fg3d.install_dependencies", icon="CONSOLE")
    label = running_label("install")
    row.label(text=label or f"into {deps_dir()}")

    box = layout.box()
    assets = st["assets"]
    if st.get("assets_error"):
        box.label(text=st["assets_error"], icon="ERROR")
    else:
        bad = st["unusable_assets"]
        ok = sum(1 for s in assets.values() if s in ("verified", "present"))
        box.label(
            text=f"Model files: {ok} of {len(assets)} present" + (f", {len(bad)} missing" if bad else ""),
            icon="ERROR" if bad else "CHECKMARK",
        )
        for rel in bad[:3]:
            box.label(text=f"  {rel}: {assets[rel]}")
        if st["cache"] is not None:
            folder, size = st["cache"]
            box.label(text=f"Cache: {size / 1e6:.0f} MB in {folder}")
    row = box.row()
    row.operator("fg3d.fetch_assets", icon="IMPORT")
    label = running_label("fetch")
    if label:
        row.label(text=label)

    col = layout.column()
    col.prop(prefs, "cache_dir")
    col.prop(prefs, "mirror_dir")
    col.prop(prefs, "threads")
    box = layout.box()
    box.label(text="Licences", icon="INFO")
    for line in licence_lines():
        box.label(text=line)


def get_prefs(context=None) -> Optional[FG3D_AddonPreferences]:
    ctx = context or bpy.context
    if ctx.preferences is None:
        return None
    addon = ctx.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon is not None else None  # type: ignore[return-value]


def environment(context=None) -> Dict[str, str]:
    """``FG3D_CACHE_DIR`` / ``FG3D_ASSET_MIRROR`` from the preferences (only the ones that are set)."""
    prefs = get_prefs(context)
    env: Dict[str, str] = {}
    if prefs is not None:
        if prefs.cache_dir:
            env[CACHE_ENV] = bpy.path.abspath(prefs.cache_dir)
        if prefs.mirror_dir:
            env[MIRROR_ENV] = bpy.path.abspath(prefs.mirror_dir)
    return env


def threads(context=None) -> int:
    prefs = get_prefs(context)
    return int(prefs.threads) if prefs is not None else 0


def licence_lines() -> List[str]:
    lines = ["Add-on code: BSD-2-Clause.", "Model files are third-party, fetched separately, never bundled:"]
    try:
        seen: Dict[str, str] = {}
        for rel, entry in manifest().items():
            seen.setdefault(rel.split("/")[0], entry.get("licence", "see upstream"))
        lines += [f"  {folder}: {text}" for folder, text in sorted(seen.items())]
    except Exception as exc:  # noqa: BLE001 - the panel must draw even with a broken install
        lines.append(f"  (asset list unreadable: {exc})")
    lines.append("BFM-derived data: non-commercial research use only.")
    return lines


CLASSES = (FG3D_AddonPreferences,)
