"""Synthetic views with known geometry: a cached photo's face turned further from the camera.

``view_one`` re-renders a training photo's face (its coarse fit, refined by a teacher network when one
is given) turned 10–30° further from the camera and pitched ±10° (``novel_view``), and runs the
pipeline's coarse fit on the render.  The drawn shape is known, so its error after a similarity
alignment is a 3D loss (``Losses.shape_error_mm``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from fg3d_blender.core import detect
from fg3d_blender.core.fgnet_inputs import load_shape_range
from fg3d_blender.core.geometry import similarity_align
from fg3d_blender.core.pipeline import Reconstructor
from fg3d_blender.core.refine import FGNetRefiner

from . import novel_view
from .cache import CACHE_VERSION, SHARD, cache_one, cached_fit, shard_meta, write_shard

VIEW_TURN_DEG = (10.0, 30.0)  # yaw change of a synthetic view, always away from the camera
VIEW_PITCH_DEG = 10.0  # and a pitch change within ±this


def view_one(
    rec: Reconstructor,
    data: dict,
    i: int,
    size: int,
    shape_range: Tuple[float, float],
    teacher: Optional[FGNetRefiner] = None,
) -> Optional[dict]:
    """A cached photo's face re-rendered at a new pose (``novel_view``), as ``render_record`` of the
    render (HOG only).  The drawn mesh is the photo's coarse fit plus ``teacher``'s refinement (None:
    the coarse shape alone).  None when HOG finds no face in the render (or another one)."""
    fm = rec.face_model
    rng = np.random.default_rng(int(i))
    image = data["images"][i]
    fit = cached_fit(fm, data, i)
    shape = fit.vertices if teacher is None else teacher.refine(image, fit, applied=False)
    drawn = fit.project(shape)
    yaw = novel_view.away_yaw(fit.pose_degrees["yaw"], rng.uniform(*VIEW_TURN_DEG), rng)
    moved = novel_view.turned(drawn, yaw, rng.uniform(-VIEW_PITCH_DEG, VIEW_PITCH_DEG))
    view, _ = novel_view.render_view(image, drawn, moved, fm.triangles)
    return render_record(rec, view, moved, size, shape_range, use_cnn=False)


def drawn_face(rec: Reconstructor, view: np.ndarray, truth: np.ndarray, use_cnn: bool = True):
    """The detected face whose landmarks lie where the drawn face's 68 keypoints ``truth`` (68,2) are
    (centroids within a tenth of the drawn face's width), or None (no face, or only another one)."""
    faces = rec.faces(view, use_cnn=use_cnn)
    if not faces:
        return None
    face = detect.nearest_face(faces, truth.mean(0))
    if np.linalg.norm(face.landmarks.mean(0) - truth.mean(0)) > 0.1 * np.ptp(truth[:, 0]):
        return None
    return face


def render_record(
    rec: Reconstructor,
    view: np.ndarray,
    drawn: np.ndarray,
    size: int,
    shape_range: Tuple[float, float],
    use_cnn: bool = True,
) -> Optional[dict]:
    """The cache record of a render whose drawn image-space vertices (N,3) are known: the pipeline's
    detection and coarse fit of it (``cache_one``), plus

    * ``target``: the drawn mesh, moved onto the render's coarse fit by a similarity transform, as a UV
      map of image-space positions (px), so the error left is shape, not pose or size;
    * ``head_landmarks``: the drawn mesh's 68 keypoints (the render's exact landmarks);
    * ``view_image``: the render.

    None when no face is found near the drawn one (HOG, then, with ``use_cnn``, the CNN as in the
    pipeline)."""
    fm = rec.face_model
    truth = drawn[fm.keypoints, :2]
    face = drawn_face(rec, view, truth, use_cnn)
    if face is None:
        return None
    out = cache_one(rec, view, face.landmarks, size, shape_range)
    coarse = fm.face_vertices(out["alpha"], out["expression"] if len(out["expression"]) else None)
    coarse = coarse @ out["A"].T.astype(np.float64) + out["b"]
    target = similarity_align(drawn.astype(np.float64), coarse).astype(np.float32)
    out["target"] = fm.to_uv(target, size)
    out["head_landmarks"] = truth.astype(np.float32)
    out["view_image"] = view
    return out


def build_view_cache(
    rec: Reconstructor,
    data: dict,
    idx: np.ndarray,
    cache: Path,
    size: int,
    teacher: Optional[FGNetRefiner] = None,
    tag: str = "",
    log=print,
) -> None:
    """``views_XXX.npz`` shards of ``view_one`` records for the cached photos ``idx`` (``SHARD`` each);
    shards of this version, UV size and teacher ``tag`` are kept (resume), others are rebuilt."""
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{tag}|turn {VIEW_TURN_DEG}|pitch {VIEW_PITCH_DEG}"
    n_shards = math.ceil(len(idx) / SHARD)
    shape_range = load_shape_range()
    for si in range(n_shards):
        out = cache / f"views_{si:03d}.npz"
        if out.is_file() and shard_meta(out) == (CACHE_VERSION, size, tag):
            continue
        t0 = time.perf_counter()
        recs, names = [], []
        for i in idx[si * SHARD : (si + 1) * SHARD]:
            view = view_one(rec, data, int(i), size, shape_range, teacher)
            if view is not None:
                recs.append(view)
                names.append("view_" + str(data["names"][i]))
        images = np.stack([r.pop("view_image") for r in recs]) if recs else np.zeros((0, 1, 1, 3), np.uint8)
        write_shard(out, recs, names, images, size, tag)
        log(f"view shard {si + 1}/{n_shards}: {len(recs)} views in {time.perf_counter() - t0:.0f} s")
