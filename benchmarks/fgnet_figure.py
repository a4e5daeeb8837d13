"""``bench figure OUT PHOTO…``: FGNet figure rows ``photo | coarse | refined | detail``.

Coarse and refined meshes are shaded (Lambert, light from the camera) over the photo's face region;
the detail panel colours the refinement's displacement along the surface normal (red = outward,
blue = inward, ±``DETAIL_RANGE_MM``).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import cv2
import numpy as np

from fg3d_blender.core import render
from fg3d_blender.core.pipeline import Options, Reconstructor

DETAIL_RANGE_MM = 2.0
PANEL = 256


def _shade(image, iv, normals_cam, triangles, colors=None):
    h, w = image.shape[:2]
    face = render.render_face(iv, triangles, h, w)
    ras = face.raster
    n = render.interpolate(ras, triangles, normals_cam)
    shade = np.clip(n[:, :, 2] / np.maximum(np.linalg.norm(n, axis=-1), 1e-6), 0, 1) * 0.85 + 0.1
    if colors is None:
        rgb = np.repeat(shade[..., None], 3, -1) * np.array([0.85, 0.88, 0.95])
    else:
        rgb = render.interpolate(ras, triangles, colors) * (0.5 + 0.5 * shade[..., None])
    out = (image.astype(np.float32) / 255) * 0.25
    win = out[face.slices]
    win[ras.mask] = rgb[ras.mask]
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def _diverging(x):
    t = np.clip(x / DETAIL_RANGE_MM, -1, 1)[:, None]
    white = np.ones(3)
    red, blue = np.array([0.15, 0.2, 0.85]), np.array([0.85, 0.35, 0.1])  # BGR
    return np.where(t >= 0, white * (1 - t) + red * t, white * (1 + t) - blue * t).astype(np.float32)


def figure_rows(photos: List[Path]) -> np.ndarray:
    rec = Reconstructor()
    rows = []
    for p in photos:
        r = rec.reconstruct(p, Options(texture_size=256))
        tri, rot = r.triangles, r.camera["rotation"]
        panels = [r.image]
        for v in (r.vertices_coarse, r.vertices):
            iv = (v @ r.camera["A"].T + r.camera["b"]).astype(np.float32)
            panels.append(_shade(r.image, iv, render.vertex_normals(v, tri) @ rot.T, tri))
        n = render.vertex_normals(r.vertices_coarse, tri)
        disp = ((r.vertices - r.vertices_coarse) * n).sum(1)
        panels.append(
            _shade(
                r.image,
                r.image_vertices,
                render.vertex_normals(r.vertices, tri) @ rot.T,
                tri,
                _diverging(disp),
            )
        )
        x0, y0 = r.landmarks_2d.min(0)
        x1, y1 = r.landmarks_2d.max(0)
        c, s = ((x0 + x1) / 2, (y0 + y1) / 2), max(x1 - x0, y1 - y0) * 0.75
        m = np.array(
            [
                [PANEL / (2 * s), 0, PANEL / 2 - c[0] * PANEL / (2 * s)],
                [0, PANEL / (2 * s), PANEL / 2 - c[1] * PANEL / (2 * s)],
            ]
        )
        rows.append(np.hstack([cv2.warpAffine(pn, m, (PANEL, PANEL), flags=cv2.INTER_AREA) for pn in panels]))
    return np.vstack(rows)


def run(args) -> dict:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), figure_rows([Path(a) for a in args.photos]))
    return {"out": str(out), "rows": len(args.photos)}
