"""Benchmark (not a test): the compiled rasterizer vs the pure-numpy reference on the real face mesh.

    .venv/bin/python tests/bench_raster.py [PHOTO]

Prints one JSON line: milliseconds to rasterize the posed 53,215-vertex / 105,954-triangle BFM mesh
into the photo (depth + triangle id + barycentrics) and to interpolate PNCC colours, for
``render_ext`` and for ``tests/raster_reference.py`` (one triangle at a time, numpy inside each).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import raster_reference  # noqa: E402
from fg3d_blender.core import detect, morphable, render  # noqa: E402
from fg3d_blender.core.image_io import load_image  # noqa: E402


def ms(fn, repeat):
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1000.0


def main():
    photo = sys.argv[1] if len(sys.argv) > 1 else str(
        Path(__file__).resolve().parents[2] / "shared/photos/fg3d_examples/AFW_1814664578_2_0.jpg")
    image = load_image(photo)
    fit = morphable.fit_3dmm(image, detect.detect_faces(image)[0].landmarks)
    fm = morphable.face_model()
    iv = fit.project(fit.vertices)
    h, w = image.shape[:2]
    colors = render.pncc_colors(fm.mean_mm)
    compiled = ms(lambda: render.rasterize(iv, fm.triangles, h, w), 20)
    ras = render.rasterize(iv, fm.triangles, h, w)
    compiled_interp = ms(lambda: render.interpolate(ras, fm.triangles, colors), 20)
    t = time.perf_counter()
    raster_reference.rasterize(iv, fm.triangles, h, w)
    naive = (time.perf_counter() - t) * 1000.0
    print(json.dumps({"photo": photo, "size": [h, w], "triangles": int(len(fm.triangles)),
                      "render_ext_raster_ms": round(compiled, 2), "render_ext_interpolate_ms": round(compiled_interp, 2),
                      "numpy_reference_raster_ms": round(naive, 1), "speedup": round(naive / compiled, 1)}))


if __name__ == "__main__":
    main()
