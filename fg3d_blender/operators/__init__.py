"""The thin bpy layer (issue 4: the Blender add-on).  Everything it computes lives in ``fg3d_blender.core``.

Importing this package does not import bpy; ``register()`` does.  Modules: ``job`` (worker thread, no
bpy), ``build`` (Result → Blender data), ``ops`` (operators), ``ui`` (sidebar panel), ``prefs``
(add-on preferences), ``blend_writer`` (``--format blend`` for the command line).
"""


def _classes():
    from . import ops, prefs, ui  # they import bpy: only inside Blender, at registration

    return (*prefs.CLASSES, *ui.CLASSES, *ops.CLASSES)


def register():
    import bpy  # inside Blender only

    from . import ui  # imports bpy

    for cls in _classes():
        bpy.utils.register_class(cls)
    ui.register_props()


def unregister():
    import bpy  # inside Blender only

    from . import ui  # imports bpy

    ui.unregister_props()
    for cls in reversed(_classes()):
        try:
            bpy.utils.unregister_class(cls)
        except RuntimeError:  # never registered (a failed register), nothing to undo
            pass
