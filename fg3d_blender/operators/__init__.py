"""The thin bpy layer (issue: Blender add-on).  Everything it calls lives in ``fg3d_blender.core``."""


def register():
    pass


def unregister():
    pass
