"""Run the pipeline off Blender's main thread.  No bpy in here: the worker only computes.

The worker reports ``(stage, fraction)`` through a queue that the operator's modal timer drains on the
main thread; the result (or the one-line error) arrives on the same queue.  A thread cannot be killed,
so cancelling only marks the job: the computation runs to its end and its result is then dropped.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..core import dependencies
from ..core.assets import asset_report, unusable_assets
from ..core.errors import FG3DError

FETCH_HINT = "open Preferences › Add-ons › FG3D › Fetch Assets"

STAGE_LABELS = {
    "models": "Loading models",
    "load": "Loading the photo",
    "detect": "Finding the face",
    "3dmm": "Fitting the face",
    "refine": "Refining (FGNet)",
    "render": "Rendering maps",
    "texture": "Baking texture",
    "done": "Building mesh",
}


@dataclass
class Settings:
    """What the user chose (operator properties + preferences), plain values only."""

    filepath: str
    refine: bool = True
    face_index: int = 0
    texture_size: int = 1024
    threads: int = 0  # CPU threads for every stage, core.threads' policy (0 = automatic: one)
    env: Dict[str, str] = field(default_factory=dict)  # FG3D_CACHE_DIR / FG3D_ASSET_MIRROR from prefs


def apply_environment(settings: Settings) -> None:
    """Point the asset code at the preference folders."""
    for key, value in settings.env.items():
        if value:
            os.environ[key] = value


def preflight(settings: Settings) -> Optional[str]:
    """What stops a run before it starts, as one line that says where to click, or None: missing
    Python modules, then missing or damaged model files (checked by size; sha256 at first use)."""
    apply_environment(settings)
    line = dependencies.missing_line()
    if line is not None:
        return line
    try:
        bad = unusable_assets(asset_report())
    except FG3DError as exc:
        return str(exc)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return f"FG3D: model files are missing ({bad[0]}{more}): {FETCH_HINT}"
    return None


def import_pipeline() -> None:
    """Import the pipeline and its compiled dependencies (numpy, scipy, OpenCV, dlib, onnxruntime) on
    the calling thread, the main one, before a worker starts: Blender 3.4 segfaulted when the worker
    imported scipy while the main thread ran Python (a UI timer, the panel's draw).  The worker then
    runs only code that is already imported."""
    from ..core import pipeline  # noqa: F401 - importing it is the point (~1 s, once)


def run_pipeline(
    settings: Settings,
    progress: Optional[Callable[[str, float], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
):
    """The one call both the synchronous and the threaded path make (a run is not stopped half-way:
    ``cancelled`` is accepted like every job target's, and the result is discarded)."""
    from ..core import threads as thread_policy  # with the pipeline: at the first run
    from ..core.pipeline import reconstruct  # the heavy imports: at the first run, never at enable time

    apply_environment(settings)
    with thread_policy.kept():  # Blender's other add-ons keep their OpenCV and BLAS thread counts
        return reconstruct(
            settings.filepath,
            face_index=settings.face_index,
            refine=settings.refine,
            texture_size=settings.texture_size,
            progress=progress,
            threads=settings.threads,  # core.threads: 0 = automatic (one: more were never faster)
        )


def error_line(exc: BaseException) -> str:
    """One line for the user: FG3DError text as is; anything else named, without a traceback."""
    if isinstance(exc, FG3DError):
        return str(exc)
    return " ".join(f"internal error ({type(exc).__name__}: {exc})".split())


class Job:
    """One reconstruction in a daemon thread.  ``poll()`` (main thread) returns new events."""

    def __init__(self, settings: Settings, target: Optional[Callable[..., Any]] = None):
        self.settings = settings
        self.events: queue.Queue[Tuple[str, Any]] = queue.Queue()
        self.cancelled = threading.Event()
        self.result: Any = None
        self.error: Optional[str] = None
        self.finished = False
        self.stage, self.fraction = "load", 0.0
        self._target = target or run_pipeline
        self._thread = threading.Thread(target=self._work, name="fg3d-reconstruct", daemon=True)

    def start(self) -> Job:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancelled.set()

    def _work(self) -> None:
        try:
            result = self._target(
                self.settings,
                progress=lambda s, f: self.events.put(("progress", (s, f))),
                cancelled=self.cancelled.is_set,
            )
        except BaseException as exc:  # noqa: BLE001 - reported as one line on the main thread
            self.events.put(("error", error_line(exc)))
        else:
            self.events.put(("result", None if self.cancelled.is_set() else result))

    def poll(self) -> List[Tuple[str, Any]]:
        """Drain the queue; updates ``stage``/``fraction``/``result``/``error``/``finished``."""
        got = []
        while True:
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                break
            got.append((kind, value))
            if kind == "progress":
                self.stage, self.fraction = value
            elif kind == "result":
                self.result, self.finished = value, True
            elif kind == "error":
                self.error, self.finished = value, True
        return got

    def join(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def label(self) -> str:
        return f"{STAGE_LABELS.get(self.stage, self.stage)} … {int(round(self.fraction * 100))}%"


#: The jobs now running, by kind ("reconstruct", "fetch"), for the panel and the preferences.
running: Dict[str, Job] = {}


def running_label(kind: str) -> str:
    job = running.get(kind)
    return job.label if job is not None else ""
