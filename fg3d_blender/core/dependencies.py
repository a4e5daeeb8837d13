"""The Python packages the pipeline needs: which are missing, and installing them into a folder of ours.

``requirements-runtime.txt`` is the one list (the add-on's installer, the extension's bundled wheels and
a hand install all read it).  Standard library only: the add-on runs this before anything is installed.

``install`` runs pip in a separate process (``--target`` a staging folder, ``--no-deps``: exactly the
pinned list), logs everything pip says, and moves the result into place only when pip succeeded, so a
failed or cancelled install leaves the folder as it was.  ``--target`` also keeps clear of a system
Python's own packages (Debian's Blender runs the system Python, where PEP 668 refuses plain installs).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .errors import FG3DError

REQUIREMENTS = "requirements-runtime.txt"
WHERE_TO_CLICK = "open Preferences › Add-ons › FG3D › Install Dependencies"


@dataclass(frozen=True)
class Requirement:
    dist: str  # distribution name as pip knows it
    version: str  # the pinned version
    module: Optional[str] = None  # the module checked for (None: a dependency of a dependency)
    blender_ships: bool = False  # Blender 4.2+ bundles it: install it only where it is missing

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def label(self) -> str:
        return self.module or self.dist


def requirements_file() -> Path:
    """The list: inside the package in an add-on zip, at the repository root in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / REQUIREMENTS, here.parent / REQUIREMENTS):
        if cand.is_file():
            return cand
    raise FG3DError(f"{REQUIREMENTS} is missing from this installation; reinstall the add-on")


def read_requirements(path: Optional[Path] = None) -> Tuple[List[str], List[Requirement]]:
    """(pip options such as ``--extra-index-url …``, the pinned requirements) of the list."""
    options: List[str] = []
    reqs: List[Requirement] = []
    for raw in (path or requirements_file()).read_text(encoding="utf-8").splitlines():
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        if line.startswith("-"):
            options += line.split()
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m is None:
            raise FG3DError(f"{REQUIREMENTS}: cannot read {line!r} (want name==version)")
        mod = re.search(r"import:([A-Za-z0-9_.]+)", comment)
        reqs.append(Requirement(m[1], m[2], mod[1] if mod else None, "blender-ships" in comment))
    return options, reqs


def installed_version(req: Requirement) -> Optional[str]:
    """The version found on ``sys.path`` ("?" when importable without metadata), or None when absent.
    Nothing is imported."""
    try:
        if req.module is not None and importlib.util.find_spec(req.module) is None:
            return None
    except (ImportError, ValueError):  # a broken package counts as absent
        return None
    try:
        return importlib.metadata.version(req.dist)
    except importlib.metadata.PackageNotFoundError:
        return "?" if req.module is not None else None


def status(reqs: Optional[List[Requirement]] = None) -> List[Tuple[Requirement, Optional[str]]]:
    """Each requirement with the version found (None: missing).  Import caches are left alone (the
    preferences call this while a worker thread may be importing; ``add_to_path`` refreshes them)."""
    return [(r, installed_version(r)) for r in (reqs if reqs is not None else read_requirements()[1])]


def missing(reqs: Optional[List[Requirement]] = None) -> List[Requirement]:
    return [r for r, v in status(reqs) if v is None]


def missing_line(what: Optional[List[Requirement]] = None) -> Optional[str]:
    """One line naming the missing modules and the fix, or None when nothing the pipeline imports is
    missing."""
    gone = [r for r in (missing() if what is None else what) if r.module is not None]
    if not gone:
        return None
    names = ", ".join(r.module for r in gone if r.module)
    return f"FG3D needs Python modules that are missing here ({names}): {WHERE_TO_CLICK}"


def add_to_path(folder: Path) -> None:
    """Make packages installed in ``folder`` importable (after Blender's own, which win)."""
    p = str(folder)
    if p not in sys.path:
        sys.path.append(p)
    importlib.invalidate_caches()


def find_python() -> str:
    """An interpreter of the running Python's version that has pip.  Inside Blender ``sys.executable``
    is not always it (Debian's Blender reports whatever ``python3.11`` is first on PATH)."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    base = Path(sys.base_prefix) / "bin"
    cands = [
        sys.executable,
        getattr(sys, "_base_executable", ""),
        str(base / f"python{want}"),
        str(base / "python3"),
        shutil.which(f"python{want}") or "",
    ]
    seen = set()
    for exe in cands:
        if not exe or exe in seen or not os.path.isfile(exe):
            continue
        seen.add(exe)
        try:
            r = subprocess.run(
                [exe, "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0 and r.stdout.strip() == want:
            return exe
    raise FG3DError(
        f"no Python {want} with pip found for Blender's Python (tried {', '.join(sorted(seen)) or 'none'}); "
        f"on Debian/Ubuntu: sudo apt install python3-pip, or install {REQUIREMENTS} by hand"
    )


def _pip_progress(line: str, done: int, total: int) -> Tuple[int, Optional[Tuple[str, float]]]:
    """Read one line of pip's output: (packages collected so far, (message, fraction) to show or None)."""
    m = re.match(r"(?:Collecting|Processing) (\S+)", line)  # from an index / from a local file
    if m:
        done += 1
        return done, (f"fetching {os.path.basename(m[1])}", 0.85 * done / max(total, 1))
    if line.startswith("Building wheel"):
        return done, ("building wheels", 0.88)
    if line.startswith("Installing collected packages"):
        return done, ("installing", 0.92)
    return done, None


def install(
    target: Path,
    reqs: Optional[List[Requirement]] = None,
    progress: Optional[Callable[[str, float], None]] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    python: Optional[str] = None,
) -> List[str]:
    """Install the missing requirements (all of ``reqs`` when given) into ``target``; returns the pins
    installed.  pip's whole output goes to ``target/install.log``.  Raises FG3DError with one line."""
    options, listed = read_requirements()
    todo = reqs if reqs is not None else missing(listed)
    if not todo:
        return []
    exe = python or find_python()
    target = Path(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}-staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise FG3DError(f"cannot write the dependency folder {target}: {exc.strerror or exc}") from None
    log_path = target / "install.log"
    cmd = [exe, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check"]
    cmd += ["--no-warn-script-location", "--progress-bar", "off", "--target", str(staging), *options]
    cmd += [r.pin for r in todo]
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(" ".join(cmd) + "\n")
            code = _run_logged(cmd, log, len(todo), progress, cancelled)
        if code != 0:
            raise FG3DError(f"pip could not install the dependencies (exit {code}); see {log_path}")
        _move_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    add_to_path(target)
    if progress is not None:
        progress("installed", 1.0)
    return [r.pin for r in todo]


def _run_logged(cmd, log, total: int, progress, cancelled) -> int:
    """Run pip, copying its output to ``log`` and its progress to ``progress``; stop it when
    ``cancelled()`` turns true (checked every 0.2 s, also during a long silent download)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_pip_env())
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout or ()], daemon=True)
    reader.start()
    done = 0
    while True:
        if cancelled is not None and cancelled():
            proc.terminate()
            proc.wait(30)
            raise FG3DError("dependency install cancelled; nothing was changed")
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None and not reader.is_alive() and lines.empty():
                return proc.returncode
            continue
        log.write(line)
        log.flush()
        done, say = _pip_progress(line, done, total)
        if say is not None and progress is not None:
            progress(*say)


def _pip_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # pip must see only the interpreter's own packages, not Blender's paths
    env.pop("PYTHONHOME", None)
    return env


def _move_into(staging: Path, target: Path) -> None:
    """Move every top-level entry of ``staging`` into ``target``, replacing older copies."""
    for entry in sorted(staging.iterdir()):
        dest = target / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(entry, dest)
