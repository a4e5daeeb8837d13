"""fg3d-blender: one photo → a fine-grained, textured, editable 3D face (FGNet, ECCV 2020).

Importing this package never needs bpy; Blender registration lives in ``fg3d_blender.operators`` and is
pulled in only by ``register()``.  The pipeline is ``fg3d_blender.core.pipeline.reconstruct``.
"""

__version__ = "0.1.0"

bl_info = {
    "name": "FG3D Face Reconstruction",
    "author": "fg3d-blender developers",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "View3D > Sidebar > FG3D",
    "description": "Reconstruct a fine-grained, textured 3D face mesh from one photo",
    "category": "Import-Export",
}


def register():
    from . import operators  # the bpy layer: only Blender calls register()

    operators.register()


def unregister():
    from . import operators  # the bpy layer: only Blender calls unregister()

    operators.unregister()
