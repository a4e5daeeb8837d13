"""``bench expression-figure OUT``: six of the carried ICT expression modes on the BFM mean, shaded
(frontal and three-quarter), written as one PNG."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from fg3d_blender.core.morphable import FaceModel
from fg3d_blender.core.render import interpolate, render_face, vertex_normals

SHOWN = ("jawOpen", "mouthSmile_L", "eyeBlink_R", "browInnerUp_L", "mouthPucker", "cheekPuff_R")
SIZE = 320


def shaded(vertices: np.ndarray, triangles: np.ndarray, yaw_deg: float, size: int = SIZE) -> np.ndarray:
    """Grey Lambertian render of a mesh (mm, BFM frame) turned by ``yaw_deg``, filling a size² image."""
    a = np.radians(yaw_deg)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    v = vertices @ rot.T
    lo, hi = v[:, :2].min(0), v[:, :2].max(0)
    s = 0.92 * size / float((hi - lo).max())
    iv = np.column_stack(
        [
            (v[:, 0] - (lo[0] + hi[0]) / 2) * s + size / 2,
            size / 2 - (v[:, 1] - (lo[1] + hi[1]) / 2) * s,
            v[:, 2] * s,
        ]
    )
    face = render_face(iv, triangles, size, size)
    n = vertex_normals(v, triangles)
    light = np.array([0.3, 0.4, 1.0]) / np.linalg.norm([0.3, 0.4, 1.0])
    shade = 0.12 + 0.88 * np.clip(n @ light, 0, 1)
    img = face.in_photo(interpolate(face.raster, triangles, shade), 0.0)
    return (np.clip(img, 0, 1) * 240).astype(np.uint8)


def figure(fm: FaceModel, names=SHOWN) -> np.ndarray:
    ex = fm.expressions
    region = fm.face_region
    keep = np.all(region[fm.triangles], axis=1)
    tris = np.ascontiguousarray(fm.triangles[keep])
    cols = []
    for name in ("neutral", *names):
        v = fm.mean_mm + (ex.modes[ex.names.index(name)] if name != "neutral" else 0)
        tiles = [shaded(v, tris, 0.0), shaded(v, tris, 35.0)]
        col = np.concatenate(tiles, 0)
        cv2.putText(col, name, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1, cv2.LINE_AA)
        cols.append(col)
    return np.concatenate(cols, 1)


def run(args) -> dict:
    img = figure(FaceModel())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), img)
    return {"out": str(args.out), "modes": list(SHOWN), "size": list(img.shape[:2])}
