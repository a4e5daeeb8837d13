"""Operators: ``fg3d.reconstruct`` (photo → face object), ``fg3d.fetch_assets`` and
``fg3d.install_dependencies``.

A run started from the UI (invoked: the panel's button, F3, the file browser) is modal: the work runs in
a worker thread (``job.Job``, no bpy there), a timer drains its progress queue on the main thread into
``window_manager.progress_*`` and the status bar, Esc cancels (a thread cannot be killed: its result is
discarded when it arrives), and the result is turned into Blender data on the main thread.  Everything
else runs synchronously on the main thread: a script's ``bpy.ops.fg3d.reconstruct(...)``, background
mode, ``synchronous=True``, and a re-run from the *Adjust Last Operation* panel (redo), which Blender
expects to finish inside ``execute()``.

Nothing here imports the pipeline's dependencies at module level, so the add-on registers, and says
what is missing, in a Blender that has none of them yet.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from ..core import choices, dependencies
from ..core.assets import cache_dir, fetch_assets, manifest
from . import prefs
from .job import (
    STAGE_LABELS,
    Job,
    Settings,
    apply_environment,
    error_line,
    import_pipeline,
    preflight,
    run_pipeline,
    running,
)

PHOTO_GLOB = "*.jpg;*.jpeg;*.png;*.bmp;*.tif;*.tiff;*.webp"
TEXTURE_SIZES = [(str(s), str(s), f"{s}×{s} pixel texture") for s in choices.TEXTURE_SIZES]
_C = TypeVar("_C", bound=type)


def reconstruct_options(*, add_camera: bool) -> dict[str, Any]:
    """The reconstruction options, declared once for both places that hold them: the properties of
    ``fg3d.reconstruct`` and the panel's scene settings (``ui.FG3D_SceneSettings``), which the panel's
    button copies into the operator.  Names, descriptions, limits and defaults are the same in both;
    the one deliberate difference is ``add_camera``'s default: a run the panel starts adds the photo
    camera unless it is unticked (``True``), the operator called by itself (a script's
    ``bpy.ops.fg3d.reconstruct(...)``, F3, the file browser) adds it only when asked (``False``)."""
    return {
        "refine": BoolProperty(  # type: ignore[func-returns-value]
            name="FGNet detail",
            default=True,
            description="Refine the 3DMM shape with FGNet (off: coarse 3DMM only)",
        ),
        "face_index": IntProperty(  # type: ignore[func-returns-value]
            name="Face",
            default=0,
            min=0,
            max=99,
            description="Which face of several: 0 = the largest, then smaller ones, then turned ones",
        ),
        "texture_size": EnumProperty(  # type: ignore[func-returns-value]
            name="Texture",
            items=TEXTURE_SIZES,
            default="1024",
            description="Width and height of the face texture baked from the photo, in pixels",
        ),
        "add_images": BoolProperty(  # type: ignore[func-returns-value]
            name="Depth/PNCC maps",
            default=True,
            description="Also add the depth map and the PNCC image as packed images",
        ),
        "add_camera": BoolProperty(  # type: ignore[func-returns-value]
            name="Photo camera",
            default=add_camera,
            description="Add an orthographic camera that sees the face as in the photo, photo as background",
        ),
    }


def with_reconstruct_options(*, add_camera: bool) -> Callable[[_C], _C]:
    """Class decorator: ``reconstruct_options(add_camera=…)`` added to the class's annotations, after
    its own, for ``bpy.utils.register_class`` to read (Blender turns annotations into properties when
    the class is registered, not when it is defined).  A class that declares one of them itself is an
    error: there is one declaration of each option."""

    def add(cls: _C) -> _C:
        own = dict(cls.__dict__.get("__annotations__", {}))
        options = reconstruct_options(add_camera=add_camera)
        twice = sorted(own.keys() & options.keys())
        if twice:
            raise TypeError(f"{cls.__name__} declares {', '.join(twice)}: reconstruct_options() owns them")
        cls.__annotations__ = {**own, **options}
        return cls

    return add


def _redraw(context) -> None:
    """Redraw every region of the 3D views and the preferences in every window (the panel's button and
    progress label live in the sidebar region, which an area redraw alone can leave stale)."""
    wm = getattr(context, "window_manager", None)
    for win in wm.windows if wm is not None else ():
        for area in win.screen.areas:
            if area.type in {"VIEW_3D", "PREFERENCES"}:
                for region in area.regions:
                    region.tag_redraw()


class _ModalJob:
    """Shared modal machinery: timer, progress bar, status text, Esc, clean-up."""

    kind = ""
    _job: Optional[Job] = None
    _timer: Any = None

    def _start_modal(self, context, job: Job):
        if self.kind in running:
            self.report({"ERROR"}, "FG3D is already busy with this; wait for it or press Esc")  # type: ignore[attr-defined]
            return {"CANCELLED"}
        self._job = job.start()
        running[self.kind] = job
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.1, window=context.window)
        wm.progress_begin(0, 100)
        wm.modal_handler_add(self)
        self._status(context, job.label)
        return {"RUNNING_MODAL"}

    def _status(self, context, text: Optional[str]) -> None:
        ws = getattr(context, "workspace", None)
        if ws is not None:
            ws.status_text_set(f"FG3D: {text} (Esc to cancel)" if text else None)
        _redraw(context)

    def _stop(self, context) -> None:
        wm = context.window_manager
        if self._timer is not None:
            wm.event_timer_remove(self._timer)
            self._timer = None
        wm.progress_end()
        running.pop(self.kind, None)
        self._status(context, None)

    def modal(self, context, event):
        job = self._job
        assert job is not None
        if event.type == "ESC" and event.value == "PRESS":
            job.cancel()
            self._stop(context)
            self.report(
                {"WARNING"},
                "FG3D: cancelled; the computation already running "  # type: ignore[attr-defined]
                "finishes in the background and its result is discarded",
            )
            return {"CANCELLED"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        job.poll()
        context.window_manager.progress_update(int(job.fraction * 100))
        self._status(context, job.label)
        if not job.finished:
            return {"PASS_THROUGH"}
        self._stop(context)
        if job.error is not None:
            self.report({"ERROR"}, job.error)  # type: ignore[attr-defined]
            return {"CANCELLED"}
        return self._apply(context, job.result)

    def cancel(self, context):  # Blender calls this when the window closes mid-run
        if self._job is not None:
            self._job.cancel()
        self._stop(context)

    def _run_job(self, context, settings: Settings, target):
        """``target(settings, progress=…, cancelled=…)`` modal in a worker thread when the UI started the
        operator, else here and now (progress printed in background mode); the result goes to
        ``_apply``, a failure is one reported line."""
        if _interactive(self, context):
            return self._start_modal(context, Job(settings, target=target))
        try:
            result = target(settings, progress=_print_progress if bpy.app.background else None)
        except Exception as exc:  # noqa: BLE001 - one line for the user, no traceback
            self.report({"ERROR"}, error_line(exc))  # type: ignore[attr-defined]
            return {"CANCELLED"}
        return self._apply(context, result)

    def _apply(self, context, result):
        raise NotImplementedError


def _interactive(op, context) -> bool:
    """Modal (worker thread) only for a run the UI started; see the module docstring."""
    o = op.options
    if bpy.app.background or getattr(op, "synchronous", False) or context.window is None:
        return False
    return bool(o.is_invoke) and not (o.is_repeat or o.is_repeat_last)


def _print_progress(stage: str, fraction: float) -> None:
    print(
        f"FG3D: {STAGE_LABELS.get(stage, stage)} {int(round(fraction * 100))}%", file=sys.stderr, flush=True
    )


@with_reconstruct_options(add_camera=False)  # scripts, F3 and the file browser: no camera unless asked
class FG3D_OT_reconstruct(_ModalJob, bpy.types.Operator):
    """Reconstruct a textured, editable 3D face from one photo"""

    bl_idname = "fg3d.reconstruct"
    bl_label = "Reconstruct Face"
    bl_options = {"REGISTER", "UNDO"}
    kind = "reconstruct"

    filepath: StringProperty(name="Photo", subtype="FILE_PATH", default="")  # type: ignore[valid-type]
    filter_glob: StringProperty(default=PHOTO_GLOB, options={"HIDDEN"})  # type: ignore[valid-type]
    if TYPE_CHECKING:  # what mypy sees of the properties reconstruct_options() adds
        refine: bool
        face_index: int
        texture_size: str
        add_images: bool
        add_camera: bool
    synchronous: BoolProperty(  # type: ignore[valid-type]
        name="Synchronous",
        default=False,
        options={"HIDDEN", "SKIP_SAVE"},
        description="Block until done, even with a window (for scripts)",
    )

    def _settings(self, context) -> Settings:
        return Settings(
            filepath=bpy.path.abspath(self.filepath),
            refine=self.refine,
            face_index=self.face_index,
            texture_size=int(self.texture_size),
            threads=prefs.threads(context),
            env=prefs.environment(context),
        )

    def invoke(self, context, event):
        if not self.filepath and _interactive(self, context):
            context.window_manager.fileselect_add(self)
            return {"RUNNING_MODAL"}
        return self.execute(context)

    def execute(self, context):
        if not self.filepath:
            self.report({"ERROR"}, "FG3D: choose a photo first")
            return {"CANCELLED"}
        settings = self._settings(context)
        problem = preflight(settings)  # before any work: missing modules or model files
        if problem is not None:
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        import_pipeline()  # on the main thread, before any worker: see job.import_pipeline
        return self._run_job(context, settings, run_pipeline)

    def _apply(self, context, result):
        if result is None:
            return {"CANCELLED"}
        from .build import BuildOptions, add_result, frame_in_views  # numpy: only once a run succeeded

        try:
            built = add_result(
                result,
                context.scene,
                context.collection or context.scene.collection,
                context.view_layer,
                BuildOptions(add_images=self.add_images, add_camera=self.add_camera),
                location=tuple(context.scene.cursor.location),
            )
        except Exception as exc:  # noqa: BLE001 - add_result already removed what it had added
            self.report({"ERROR"}, f"FG3D: could not build the Blender object: {error_line(exc)}")
            return {"CANCELLED"}
        frame_in_views(context, built.obj)
        _redraw(context)
        pose = result.pose
        self.report(
            {"INFO"},
            f"FG3D: added {built.obj.name} ({len(result.vertices)} vertices, "
            f"yaw {pose['yaw']:+.0f}°, pitch {pose['pitch']:+.0f}°, "
            f"{'refined' if result.refined else 'coarse 3DMM'})",
        )
        return {"FINISHED"}


def _fetch(settings: Settings, progress=None, cancelled=None, prepare: bool = False):
    """Fetch the assets; with ``prepare`` (the pipeline imported on the main thread first) also load
    the models once, which makes every derived file (dlib's arrays, the dense basis: ~10 s in a fresh
    cache) and keeps them loaded, so the first Reconstruct does not wait for them."""
    apply_environment(settings)
    total = max(1, sum(1 for e in manifest().values() if e.get("required", True))) + prepare
    done = [0]

    def say(message: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(message, min(done[0] / total, 1.0))

    fetched = fetch_assets(progress=say)
    if prepare:
        say("prepare the models (once)")
        try:
            from ..core.pipeline import default_reconstructor  # imported already: see execute

            default_reconstructor().load_models()
        except Exception:  # noqa: BLE001 - the assets are ready; the first Reconstruct will say more
            pass
    return fetched


class FG3D_OT_fetch_assets(_ModalJob, bpy.types.Operator):
    """Download (or copy from the mirror folder) the model files the reconstruction needs"""

    bl_idname = "fg3d.fetch_assets"
    bl_label = "Fetch Assets"
    bl_options = {"REGISTER"}
    kind = "fetch"

    synchronous: BoolProperty(default=False, options={"HIDDEN", "SKIP_SAVE"})  # type: ignore[valid-type]

    def execute(self, context):
        prepare = not dependencies.missing()
        if prepare:
            import_pipeline()  # on the main thread, before the worker: see job.import_pipeline
        target = functools.partial(_fetch, prepare=prepare)
        return self._run_job(context, Settings(filepath="", env=prefs.environment(context)), target)

    def _apply(self, context, result):
        self.report({"INFO"}, f"FG3D: assets ready in {cache_dir()} ({result or 0} fetched now)")
        _redraw(context)
        return {"FINISHED"}


def _install(folder, settings: Settings, progress=None, cancelled=None):
    return dependencies.install(folder, progress=progress, cancelled=cancelled)


class FG3D_OT_install_dependencies(_ModalJob, bpy.types.Operator):
    """Install the Python packages FG3D needs (requirements-runtime.txt) into the add-on's own folder,
    with pip in a separate process"""

    bl_idname = "fg3d.install_dependencies"
    bl_label = "Install Dependencies"
    bl_options = {"REGISTER"}
    kind = "install"

    synchronous: BoolProperty(default=False, options={"HIDDEN", "SKIP_SAVE"})  # type: ignore[valid-type]

    def execute(self, context):
        folder = prefs.deps_dir()  # bpy: read here on the main thread, never in the worker
        return self._run_job(context, Settings(filepath=""), functools.partial(_install, folder))

    def _apply(self, context, result):
        prefs.refresh_status()
        line = dependencies.missing_line()
        if line is not None:
            self.report({"ERROR"}, line)
            return {"CANCELLED"}
        what = f"{len(result)} packages installed into {prefs.deps_dir()}" if result else "none was missing"
        self.report({"INFO"}, f"FG3D: dependencies ready ({what})")
        _redraw(context)
        return {"FINISHED"}


CLASSES = (FG3D_OT_reconstruct, FG3D_OT_fetch_assets, FG3D_OT_install_dependencies)

__all__ = ["FG3D_OT_reconstruct", "FG3D_OT_fetch_assets", "FG3D_OT_install_dependencies", "CLASSES"]
