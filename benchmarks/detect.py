"""``bench detect``: the largest-face search (``detect.largest_hog``, what the default reconstruction
runs) against the full detection, photo by photo: the same face (box, score, landmarks) or not, how
many the short search decides (the rest fall back to the full one), and the time of each (HOG and
landmarks, no CNN fallback; a photo the short search cannot decide pays for both searches).

It also checks the landmark predictor (``landmarks.LandmarkPredictor``) against dlib's own
``shape_predictor`` on every box HOG finds in the working copy: the same 68 points or not, the time of
each, and what each costs to load in this process."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import dlib
import numpy as np

from fg3d_blender.core.assets import dlib_model_path
from fg3d_blender.core.detect import Detector, quick_largest, working_gray
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.image_io import IMAGE_EXTS, load_image
from fg3d_blender.core.landmarks import MODEL_FILE, LandmarkPredictor


def _timed(fn, *args):
    """(``fn(*args)``, the ms it took)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t0) * 1000.0


def run(args) -> dict:
    det = Detector()
    ours, ours_load_ms = _timed(LandmarkPredictor)
    theirs, theirs_load_ms = _timed(dlib.shape_predictor, str(dlib_model_path(MODEL_FILE)))
    dlib_points = lambda g, r: np.array([[q.x, q.y] for q in theirs(g, r).parts()], np.int64)  # noqa: E731
    lm_equal, lm_differ, ours_ms, theirs_ms = 0, [], [], []
    paths = [p for d in args.dir for p in sorted(Path(d).rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
    same, differ, no_face, short, full_ms, largest_ms = 0, [], 0, 0, [], []
    for p in paths:
        try:
            img = load_image(p)
        except FG3DError:
            continue
        full, t_full = _timed(det.faces, img, False, False)
        alone, t_alone = _timed(det.faces, img, False, True)
        gray, s, _ = working_gray(img)
        short += quick_largest(img, det.hog, gray, s) is not None
        for rect in det.hog(gray, 0):
            a, t_a = _timed(ours, gray, rect)
            b, t_b = _timed(dlib_points, gray, rect)
            ours_ms.append(t_a)
            theirs_ms.append(t_b)
            if np.array_equal(a, b):
                lm_equal += 1
            else:
                lm_differ.append(str(p))
        full_ms.append(t_full)
        largest_ms.append(t_alone)
        if not full and not alone:
            no_face += 1
        elif (
            full
            and len(alone) == 1
            and np.array_equal(full[0].box, alone[0].box)
            and np.array_equal(full[0].landmarks, alone[0].landmarks)
            and full[0].score == alone[0].score
        ):
            same += 1
        else:
            differ.append(str(p))
    return {
        "photos": len(full_ms),
        "same_face": same,
        "different_face": len(differ),
        "no_face_either": no_face,
        "decided_by_the_short_search": short,
        "full_ms_mean": round(statistics.fmean(full_ms), 2),
        "largest_ms_mean": round(statistics.fmean(largest_ms), 2),
        "full_ms_median": round(statistics.median(full_ms), 2),
        "largest_ms_median": round(statistics.median(largest_ms), 2),
        "differing": differ[:20],
        "landmark_faces": lm_equal + len(lm_differ),
        "landmarks_equal_to_dlib": lm_equal,
        "landmarks_different": len(lm_differ),
        "landmarks_ms_median": round(statistics.median(ours_ms), 3) if ours_ms else None,
        "dlib_landmarks_ms_median": round(statistics.median(theirs_ms), 3) if theirs_ms else None,
        "predictor_load_s": round(ours_load_ms / 1000, 3),
        "dlib_predictor_load_s": round(theirs_load_ms / 1000, 3),
        "landmarks_differing": lm_differ[:20],
    }
