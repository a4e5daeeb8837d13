"""``--format blend`` for the command line: one reconstruction → one .blend (same builder as the add-on).

Needs the ``bpy`` module (``pip install bpy``, Python 3.11) or running inside Blender.  Each file holds a
fresh empty scene with the face object, its material and packed images, and the matching camera.  The
command line passes a temporary name from ``export.AtomicWriter``, which renames the file only when all
outputs of the photo are complete.
"""

from __future__ import annotations

import os

from ..core.errors import FG3DError


def require_bpy():
    """The bpy module, or one clear line saying how to get it."""
    try:
        import bpy  # optional: the bpy module or Blender itself; the CLI runs without it
    except ImportError:
        raise FG3DError(
            "--format blend needs Blender's Python module: pip install bpy==5.0.1 "
            "(Python 3.11), or run inside Blender"
        ) from None
    return bpy


def write_blend(path: str, result, add_camera: bool = True, add_images: bool = True) -> None:
    """Save ``result`` as a .blend at ``path`` (the current bpy session is reset to an empty file)."""
    bpy = require_bpy()
    from .build import BuildOptions, add_result  # imports bpy, which require_bpy has just checked

    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    scene = bpy.context.scene
    add_result(
        result,
        scene,
        scene.collection,
        bpy.context.view_layer,
        BuildOptions(add_camera=add_camera, add_images=add_images),
    )
    if os.path.exists(path):  # the empty placeholder of the temporary; Blender would keep it as "<name>1"
        os.unlink(path)
    path = os.path.abspath(path)  # Blender 3.x refuses a relative filepath
    try:
        bpy.ops.wm.save_as_mainfile(filepath=path, copy=True, compress=True, check_existing=False)
        failed = ""
    except RuntimeError as exc:  # disk full, permission denied: Blender reports it as the operator's error
        failed = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
    if failed or not os.path.isfile(path) or os.path.getsize(path) == 0:
        for leftover in (path, path + "@"):  # Blender writes "<name>@" and renames it when complete
            if os.path.exists(leftover):
                os.unlink(leftover)
        where = os.path.dirname(path)
        raise FG3DError(f"Blender could not write the .blend file in {where} ({failed or 'no file'})")
