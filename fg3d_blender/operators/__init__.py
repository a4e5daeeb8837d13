"""The thin bpy layer (issue 4: the Blender add-on).  Everything it computes lives in ``fg3d_blender.core``.

Importing this package does not import bpy; ``register()`` does.  Modules: ``job`` (worker thread, no
bpy), ``build`` (Result → Blender data), ``ops`` (operators), ``ui`` (sidebar panel), ``prefs``
(add-on preferences), ``blend_writer`` (``--format blend`` for the command line).  Registering needs only
bpy and the standard library: the pipeline's own dependencies may still be missing (Install Dependencies
in the preferences adds them).
"""

import sys


def _classes():
    from . import ops, prefs, ui  # they import bpy: only inside Blender, at registration

    return (*prefs.CLASSES, *ui.CLASSES, *ops.CLASSES)


def register():
    import bpy  # inside Blender only

    from ..core import dependencies  # standard library only: safe before anything is installed
    from . import prefs, ui  # they import bpy

    dependencies.add_to_path(prefs.deps_dir())  # what Install Dependencies put there (if anything)
    for cls in _classes():
        bpy.utils.register_class(cls)
    ui.register_props()
    line = dependencies.missing_line()
    if line is not None:  # enabled all the same: the preferences show what is missing and install it
        print(line, file=sys.stderr, flush=True)


def unregister():
    import bpy  # inside Blender only

    from . import ui  # imports bpy

    ui.unregister_props()
    for cls in reversed(_classes()):
        try:
            bpy.utils.unregister_class(cls)
        except RuntimeError:  # never registered (a failed register), nothing to undo
            pass
