"""The 3D Viewport sidebar tab "FG3D": photo picker with a preview, options, Reconstruct."""

from __future__ import annotations

import os
from typing import Any, Optional

import bpy
from bpy.props import PointerProperty, StringProperty
from bpy.utils import previews

from . import prefs
from .job import running_label
from .ops import PHOTO_GLOB, with_reconstruct_options

_previews: Optional[Any] = None  # bpy.utils.previews collection of photo thumbnails
PHOTO_EXTS = tuple(e.lstrip("*") for e in PHOTO_GLOB.split(";"))


@with_reconstruct_options(add_camera=True)  # the panel's button adds the photo camera unless unticked
class FG3D_SceneSettings(bpy.types.PropertyGroup):
    """The panel's choices, stored with the scene: the photo, and the operator's options
    (``ops.reconstruct_options``), which the Reconstruct button copies into the operator."""

    photo: StringProperty(  # type: ignore[valid-type]
        name="Photo", subtype="FILE_PATH", default="", description="The photo of a face to reconstruct"
    )


def _preview_icon(path: str) -> int:
    """Icon id of a thumbnail of ``path`` (0 if it cannot be shown)."""
    if _previews is None or not path.lower().endswith(PHOTO_EXTS) or not os.path.isfile(path):
        return 0
    key = f"{path}:{os.path.getmtime(path)}"
    if key not in _previews:
        try:
            _previews.load(key, path, "IMAGE")
        except (KeyError, RuntimeError):
            return 0
    return _previews[key].icon_id


class FG3D_PT_reconstruct(bpy.types.Panel):
    bl_idname = "FG3D_PT_reconstruct"
    bl_label = "Face from Photo"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "FG3D"

    def draw(self, context):
        layout = self.layout
        s = context.scene.fg3d
        layout.prop(s, "photo", text="")
        path = bpy.path.abspath(s.photo) if s.photo else ""
        icon = _preview_icon(path) if path else 0
        if icon:
            layout.template_icon(icon_value=icon, scale=8.0)
        elif path and not os.path.isfile(path):
            layout.label(text="No such file", icon="ERROR")
        col = layout.column(align=True)
        col.prop(s, "refine")
        col.prop(s, "face_index")
        row = col.row(align=True)
        row.label(text="Texture")
        row.prop(s, "texture_size", text="")
        col.prop(s, "add_images")
        col.prop(s, "add_camera")
        ready = _draw_setup_needed(layout)
        busy = running_label("reconstruct")
        row = layout.row()
        row.scale_y = 1.5
        row.enabled = bool(s.photo) and not busy and ready
        op = row.operator("fg3d.reconstruct", text="Reconstruct", icon="USER")
        op.filepath = s.photo
        op.refine = s.refine
        op.face_index = s.face_index
        op.texture_size = s.texture_size
        op.add_images = s.add_images
        op.add_camera = s.add_camera
        if busy:
            layout.label(text=busy, icon="TIME")
            layout.label(text="Esc cancels")


def _draw_setup_needed(layout) -> bool:
    """A box with the button that fixes a missing dependency or model file; True when nothing is missing."""
    st = prefs.status()
    if st["missing_modules"] or st.get("deps_error"):
        box = layout.box()
        box.label(text="Python modules missing", icon="ERROR")
        box.operator("fg3d.install_dependencies", icon="CONSOLE")
        label = running_label("install")
        if label:
            box.label(text=label, icon="TIME")
        return False
    bad = st["unusable_assets"]
    if bad or st.get("assets_error"):
        box = layout.box()
        box.label(text=f"{len(bad)} model files missing" if bad else "Asset cache unusable", icon="ERROR")
        box.operator("fg3d.fetch_assets", icon="IMPORT")
        label = running_label("fetch")
        if label:
            box.label(text=label, icon="TIME")
        return False
    return True


CLASSES = (FG3D_SceneSettings, FG3D_PT_reconstruct)


def register_props() -> None:
    global _previews
    bpy.types.Scene.fg3d = PointerProperty(  # type: ignore[attr-defined,func-returns-value]
        type=FG3D_SceneSettings
    )
    if not bpy.app.background:
        _previews = previews.new()


def unregister_props() -> None:
    global _previews
    if _previews is not None:
        previews.remove(_previews)
        _previews = None
    if hasattr(bpy.types.Scene, "fg3d"):
        del bpy.types.Scene.fg3d  # type: ignore[attr-defined]
