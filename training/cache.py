"""The training cache: per photo, its coarse fit exactly as the pipeline makes it, and the loss inputs.

For every photo: dlib's 68 landmarks, the coarse 3DMM fit (shape parameters, camera A, b, rotation; with
the landmark refit), the landmark head's prediction, the visibility UV map and the per-photo
spherical-harmonic (SH) lighting (and a low-pass albedo map, kept for inspection) estimated from the
coarse shape.  Photos where HOG finds no face are skipped.  A ``HOLDOUT`` fraction of the photos (by a
hash of the name) is held out.  Shards of ``SHARD`` records are written atomically and resumed.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np

from fg3d_blender.core import detect, render
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.fgnet_inputs import fgnet_inputs, load_shape_range
from fg3d_blender.core.geometry import sh_basis
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.morphable import FaceModel, Fit
from fg3d_blender.core.pipeline import Reconstructor

HOLDOUT = 0.05
SHARD = 500
CACHE_VERSION = 5  # 2: refitted coarse fits and the landmark head's prediction; 3: expression weights;
# 4: the refit's expression sparsity grows with the yaw (RefitPriors.profile); 5: the landmark head
# averaged over the shifted crops (morphable.HEAD_SHIFTS)
ALBEDO_SIGMA_FRAC = 1.0 / 32  # low-pass of the albedo estimate, fraction of the UV size


def estimate_albedo_light(tex: np.ndarray, normals_cam: np.ndarray, w: np.ndarray, size: int):
    """Gray SH lighting (9,) by weighted least squares, and a low-pass albedo map (S,S,3)."""
    y = sh_basis(normals_cam)
    g = tex.mean(-1)
    sel = w > 0.05
    if sel.sum() < 50:
        return np.zeros((size, size, 3), np.float32), np.zeros(9, np.float32)
    yw = y[sel] * w[sel, None]
    light = np.linalg.solve(yw.T @ y[sel] + 1e-3 * np.eye(9), yw.T @ g[sel])
    shade = np.clip(y @ light, 0.05, None)
    sig = max(1.0, size * ALBEDO_SIGMA_FRAC)
    num = cv2.GaussianBlur((tex * w[..., None]).astype(np.float32), (0, 0), sig)
    den = cv2.GaussianBlur((shade * w).astype(np.float32), (0, 0), sig)
    alb = num / np.maximum(den, 1e-3)[..., None]
    return np.clip(alb, 0, 3).astype(np.float32), light.astype(np.float32)


def cache_one(
    rec: Reconstructor, image: np.ndarray, landmarks: np.ndarray, size: int, shape_range: Tuple[float, float]
) -> dict:
    """Everything training needs about one photo (coarse fit, UV maps, albedo, lighting)."""
    fm = rec.face_model
    fit = rec.fit(image, landmarks)
    inp = fgnet_inputs(image, fit, fm, size, shape_range)
    rgb = image[:, :, ::-1].astype(np.float32) / 255.0
    pos = inp.positions / inp.scale
    tex = render.remap_at(rgb, pos)
    n = render.vertex_normals(fit.vertices, fm.triangles) @ fit.rotation.T
    n_uv = fm.to_uv(n, size)
    n_uv /= np.maximum(np.linalg.norm(n_uv, axis=-1, keepdims=True), 1e-6)
    alb, light = estimate_albedo_light(tex, n_uv, inp.visibility, size)
    return {
        "alpha": fit.params[12:52].astype(np.float32),
        "expression": (fit.expression if fit.expression is not None else np.zeros(0)).astype(np.float32),
        "A": fit.A.astype(np.float32),
        "b": fit.b.astype(np.float32),
        "rot": fit.rotation.astype(np.float32),
        "landmarks": landmarks.astype(np.float32),
        "head_landmarks": fit.head_landmarks.astype(np.float32),
        "vis": (inp.visibility * 255 + 0.5).astype(np.uint8),
        "albedo": alb.astype(np.float16),
        "light": light,
    }


def _load_fixed(path: Path, side: int) -> np.ndarray:
    img = load_image(path)
    if img.shape[:2] != (side, side):
        raise ValueError("size")
    return img


def build_cache(
    rec: Reconstructor,
    photos: List[Path],
    cache: Path,
    size: int,
    worker: int = 0,
    workers: int = 1,
    side: int = 200,
    log=print,
) -> None:
    """Write ``shard_XXX.npz`` files (``SHARD`` photos each); existing shards of this version and UV size
    are kept (resume), others are rebuilt.  Photos that are unreadable or not ``side``² are skipped,
    and so are those where HOG finds no face; each shard's log line counts them."""
    shape_range = load_shape_range()
    cache.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(photos) / SHARD)
    total = {"faces": 0, "skipped": 0, "no face": 0, "built": 0}
    for si in range(worker, n_shards, workers):
        out = cache / f"shard_{si:03d}.npz"
        if out.is_file() and shard_meta(out) == (CACHE_VERSION, size, ""):
            continue
        recs, names, images, skipped = [], [], [], 0
        t0 = time.perf_counter()
        part = photos[si * SHARD : (si + 1) * SHARD]
        for p in part:
            try:
                img = _load_fixed(p, side)
            except Exception:  # noqa: BLE001 - unreadable or not side×side: skipped, and counted
                skipped += 1
                continue
            faces = rec.faces(img, use_cnn=False)
            if not faces:
                total["no face"] += 1
                continue
            face = detect.nearest_face(faces, (side / 2, side / 2))
            recs.append(cache_one(rec, img, face.landmarks, size, shape_range))
            names.append(p.name)
            images.append(img)
        stacked = np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)
        write_shard(out, recs, names, stacked, size)
        log(
            f"cache shard {si + 1}/{n_shards}: {len(recs)} faces of {len(part)} photos "
            f"({skipped} unreadable or not {side}×{side}) in {time.perf_counter() - t0:.0f} s"
        )
        total["faces"] += len(recs)
        total["skipped"] += skipped
        total["built"] += len(part)
    if total["skipped"] or total["no face"]:
        log(
            f"of {total['built']} photos cached now, {total['skipped']} were skipped as unreadable or not "
            f"{side}×{side} (train-fgnet takes aligned {side}×{side} face crops, as UTKFace's) and "
            f"{total['no face']} showed no face"
        )


def write_shard(
    out: Path, recs: List[dict], names: List[str], images: np.ndarray, size: int, tag: str = ""
) -> None:
    """One shard of records, written atomically with its version, UV size and ``tag``."""
    arrays = {k: np.stack([r[k] for r in recs]) for k in recs[0]} if recs else {}
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.npz")
    np.savez(
        tmp,
        names=np.array(names),
        images=images,
        size=np.array(size),
        version=np.array(CACHE_VERSION),
        teacher=np.array(tag),
        **arrays,
    )
    os.replace(tmp, out)


def shard_meta(path: Path) -> tuple:
    """(cache version, UV size, tag) of a shard, read without loading its arrays."""
    with np.load(path, allow_pickle=False) as z:
        return int(z["version"]), int(z["size"]), str(z["teacher"]) if "teacher" in z.files else ""


def load_cache(cache: Path, pattern: str = "shard_*.npz") -> dict:
    files = sorted(cache.glob(pattern))
    if not files:
        raise FG3DError(f"{cache}: no training cache there (pass --photos to build it)")
    old = [f.name for f in files if shard_meta(f)[0] != CACHE_VERSION]
    if old:
        raise FG3DError(
            f"cache {cache} was built by an older version ({', '.join(old[:3])}…); "
            f"delete the folder, or pass --photos, to rebuild it"
        )
    parts = [dict(np.load(f, allow_pickle=False)) for f in files]
    parts = [p for p in parts if len(p["names"])]
    if not parts:
        raise FG3DError(
            f"cache {cache} holds no faces: train-fgnet takes aligned 200×200 face crops (as UTKFace's); "
            "photos of other sizes, unreadable ones and those without a face are skipped (see the log)"
        )
    out = {
        k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in ("size", "version", "teacher")
    }
    out["size"] = int(parts[0]["size"])
    return out


def is_holdout(name: str) -> bool:
    """Deterministic ~5 % split by a hash of the file name (independent of the name's age prefix)."""
    return zlib.crc32(name.encode()) % 100 < int(HOLDOUT * 100)


def cached_fit(fm: FaceModel, data: dict, i: int) -> Fit:
    """The coarse fit of cached record ``i`` (its shape parameters, expression and camera) as a ``Fit``."""
    expression = data["expression"][i] if data["expression"].shape[1] else None
    return Fit(
        params=np.zeros(62, np.float32),
        roi_box=np.zeros(4, np.float32),
        vertices=fm.face_vertices(data["alpha"][i], expression).astype(np.float32),
        A=data["A"][i].astype(np.float32),
        b=data["b"][i].astype(np.float32),
        expression=expression,
    )
