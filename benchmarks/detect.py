"""``bench detect``: the largest-face search (``detect.largest_hog``, what the default reconstruction
runs) against the full detection, photo by photo: the same face (box, score, landmarks) or not, how
many the short search decides (the rest fall back to the full one), and the time of each (HOG and
landmarks, no CNN fallback; a photo the short search cannot decide pays for both searches)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from fg3d_blender.core.detect import Detector, quick_largest, working_gray
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.image_io import IMAGE_EXTS, load_image


def _timed(det: Detector, img: np.ndarray, largest: bool):
    t0 = time.perf_counter()
    out = det.faces(img, use_cnn=False, largest=largest)
    return out, (time.perf_counter() - t0) * 1000.0


def run(args) -> dict:
    det = Detector()
    paths = [p for d in args.dir for p in sorted(Path(d).rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
    same, differ, no_face, short, full_ms, largest_ms = 0, [], 0, 0, [], []
    for p in paths:
        try:
            img = load_image(p)
        except FG3DError:
            continue
        full, t_full = _timed(det, img, False)
        alone, t_alone = _timed(det, img, True)
        gray, s, _ = working_gray(img)
        short += quick_largest(img, det.hog, gray, s) is not None
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
    }
