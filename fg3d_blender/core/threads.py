"""The one thread policy: how many CPU threads OpenCV, the BLAS libraries, onnxruntime and torch (for
training and the torch backend) may use.  ``apply(n)`` sets all of them at once; onnxruntime takes
``n`` when its sessions are made (``onnx_models.session``).  The BLAS libraries are found in
/proc/self/maps, so on macOS and Windows they keep their own defaults (OpenCV and onnxruntime are set
everywhere).  The add-on runs inside Blender's process: ``kept()`` gives the other add-ons their
OpenCV and BLAS settings back after each run.

Automatic (``0``) is **one thread**, chosen by measurement on this project's 2-core machine: a second
thread was never faster for one photo (``bench speed --threads 2``: README, Speed), and under load the
libraries' own pools (OpenCV keeps one thread per core whatever ``OMP_NUM_THREADS`` says) were many
times slower.  Batches get more from one process per core than from threads inside one photo.
"""

from __future__ import annotations

import ctypes
import numbers
import sys
from contextlib import contextmanager
from typing import Dict

from .errors import FG3DError

#: The BLAS builds bundled by numpy, scipy and OpenCV's wheels, and their thread setters/getters.
_BLAS_SETTERS = (
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),  # numpy 1.x (64-bit ints)
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),  # numpy 2.x
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),  # scipy
    ("openblas_set_num_threads", "openblas_get_num_threads"),  # OpenCV's, and a system OpenBLAS
)


def resolve(threads: int) -> int:
    """The thread count ``threads`` stands for: 0 (automatic) is 1; a negative or non-integer value
    is refused (FG3DError)."""
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 0:
        raise FG3DError(f"threads {threads!r}: want a whole number, 0 (automatic: one) or more")
    return int(threads) or 1


def _blas_libraries() -> Dict[str, tuple]:
    """The OpenBLAS libraries loaded in this process (Linux: from /proc/self/maps) → (set, get)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux: the libraries keep their own defaults
        return {}
    paths = set()
    for line in lines:
        fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode, path (may hold spaces)
        if len(fields) == 6 and "openblas" in fields[5] and not fields[5].endswith("(deleted)"):
            paths.add(fields[5])
    found = {}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in _BLAS_SETTERS:
            if hasattr(lib, setter):
                found[path] = (getattr(lib, setter), getattr(lib, getter))
                break
    return found


def blas_threads() -> Dict[str, int]:
    """Each loaded OpenBLAS's current thread count, by library file name."""
    return {path.rsplit("/", 1)[-1]: int(get()) for path, (_, get) in _blas_libraries().items()}


_applied: tuple = ()  # (count, torch too, modules loaded) of the last apply(): a library loaded since


def apply(threads: int, torch: bool = False) -> int:
    """Set OpenCV and every loaded BLAS (and torch, with ``torch=True``: training and the torch
    backend) to ``resolve(threads)`` threads; returns that count, which onnxruntime sessions are then
    made with.  ~4 ms (it scans the process's libraries): ``ensure`` is the per-run call."""
    global _applied
    import cv2  # a runtime dependency; imported here so this module stays importable without it

    n = resolve(threads)
    cv2.setNumThreads(n)  # 1: OpenCV runs sequentially (its default is one thread per core)
    for set_threads, _ in _blas_libraries().values():
        set_threads(ctypes.c_int(n))
    module = sys.modules.get("torch") if torch else None
    if module is not None and hasattr(module, "set_num_threads"):
        module.set_num_threads(n)
    _applied = (n, torch, len(sys.modules))
    return n


def ensure(threads: int, torch: bool = False) -> int:
    """``apply(threads, torch)`` unless the last apply set the same and no module was imported since
    (a library loaded later, scipy's BLAS say, is then set too); free on every warm run."""
    n = resolve(threads)
    return n if (n, torch, len(sys.modules)) == _applied else apply(n, torch)


@contextmanager
def kept():
    """Restore OpenCV's and the BLAS libraries' thread counts on exit: a host process (Blender, where
    other add-ons use the same libraries) keeps its own settings after a reconstruction."""
    global _applied
    import cv2  # as in apply()

    cv_before, blas_before = cv2.getNumThreads(), {p: get() for p, (_, get) in _blas_libraries().items()}
    try:
        yield
    finally:
        cv2.setNumThreads(cv_before)
        for path, (set_threads, _) in _blas_libraries().items():
            if path in blas_before:
                set_threads(ctypes.c_int(blas_before[path]))
        _applied = ()  # the next run applies its count again
