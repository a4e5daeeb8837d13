"""Add-on preferences: asset cache folder, mirror folder, threads, "Fetch assets", licence notes."""

from __future__ import annotations

from typing import Dict, List, Optional

import bpy
from bpy.props import IntProperty, StringProperty

from ..core.assets import CACHE_ENV, MIRROR_ENV, manifest
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
        description="CPU threads for the neural network (0 = automatic)",
    )

    def draw(self, context):
        draw_preferences(self.layout, self)


def draw_preferences(layout, prefs) -> None:
    col = layout.column()
    col.prop(prefs, "cache_dir")
    col.prop(prefs, "mirror_dir")
    col.prop(prefs, "threads")
    row = layout.row()
    row.operator("fg3d.fetch_assets", icon="IMPORT")
    label = running_label("fetch")
    if label:
        row.label(text=label)
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
