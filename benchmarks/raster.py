"""``bench raster``: the compiled rasterizer vs the pure-numpy reference (``raster_reference``, one
triangle at a time, numpy inside each) on the real posed 53,215-vertex / 105,954-triangle BFM mesh:
milliseconds to rasterize it into the photo (depth + triangle id + barycentrics) and to interpolate
PNCC colours."""

from __future__ import annotations

import time

from fg3d_blender.core import render
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import Reconstructor

from . import raster_reference


def ms(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1000.0


def run(args) -> dict:
    rec = Reconstructor()
    image = load_image(args.photo)
    fit = rec.fit(image, rec.faces(image)[0].landmarks)
    fm = rec.face_model
    iv = fit.project(fit.vertices)
    h, w = image.shape[:2]
    compiled = ms(lambda: render.rasterize(iv, fm.triangles, h, w), 20)
    ras = render.rasterize(iv, fm.triangles, h, w)
    compiled_interp = ms(lambda: render.interpolate(ras, fm.triangles, fm.pncc_colors), 20)
    t = time.perf_counter()
    raster_reference.rasterize(iv, fm.triangles, h, w)
    naive = (time.perf_counter() - t) * 1000.0
    return {
        "photo": args.photo,
        "size": [h, w],
        "triangles": int(len(fm.triangles)),
        "render_ext_raster_ms": round(compiled, 2),
        "render_ext_interpolate_ms": round(compiled_interp, 2),
        "numpy_reference_raster_ms": round(naive, 1),
        "speedup": round(naive / compiled, 1),
    }
