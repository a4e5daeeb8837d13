"""``bench memory``: peak memory of one reconstruction of a small face in a large photo.

The photo's face is shrunk to ``--face-px`` wide and pasted into a grey ``--canvas`` (default a 12 MP
4032×3024 frame).  After a warm-up run on the photo itself (models loaded), the large photo is
reconstructed once with tracemalloc on: ``traced_peak_mib`` is the peak of the memory numpy and Python
allocated during that run (the arrays of every stage), ``rss_peak_mib`` the process's high-water mark.
"""

from __future__ import annotations

import resource
import tracemalloc

import cv2
import numpy as np

from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import Options, Reconstructor


def pasted(image: np.ndarray, face_box, face_px: int, canvas_wh) -> np.ndarray:
    """``image`` scaled so the face box is ``face_px`` wide, pasted near the middle of a grey canvas."""
    s = face_px / float(face_box[2] - face_box[0])
    small = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    w, h = canvas_wh
    big = np.full((h, w, 3), 127, np.uint8)
    y, x = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    big[y : y + small.shape[0], x : x + small.shape[1]] = small[: h - y, : w - x]
    return big


def run(args) -> dict:
    rec = Reconstructor()
    opts = Options(texture_size=args.texture_size)
    image = load_image(args.photo)
    warm = rec.reconstruct(image, opts)
    w, h = (int(v) for v in args.canvas.lower().split("x"))
    big = pasted(image, warm.face_box, args.face_px, (w, h))
    tracemalloc.start()
    r = rec.reconstruct(big, opts)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "photo": args.photo,
        "canvas": [h, w],
        "face_px": args.face_px,
        "traced_peak_mib": round(peak / 2**20, 1),
        "rss_peak_mib": round(rss, 1),
        "timings_ms": {k: round(v, 1) for k, v in r.timings.items()},
    }
