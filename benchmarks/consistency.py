"""``bench consistency``: one person at many poses — each shape's mean vertex deviation (mm) from their
Procrustes mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fg3d_blender.core.errors import NoFaceError
from fg3d_blender.core.geometry import shape_consistency
from fg3d_blender.core.pipeline import Options, Reconstructor


def run(args) -> dict:
    rec = Reconstructor()
    photos = sorted(p for p in Path(args.dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    shapes, names, missed = [], [], []
    for p in photos:
        try:
            r = rec.reconstruct(p, Options(refine=not args.no_refine, texture_size=256))
        except NoFaceError:
            missed.append(p.name)
            continue
        shapes.append(r.vertices)
        names.append(p.name)
    dev = shape_consistency(shapes) if len(shapes) > 1 else np.zeros(len(shapes))
    return {
        "mean_mm": float(dev.mean()) if len(dev) else float("nan"),
        "n": len(shapes),
        "no_face": missed,
        "per_view_mm": {n: round(float(d), 3) for n, d in zip(names, dev)},
        "refine": not args.no_refine,
    }
