"""Shared maths: similarity (Umeyama) alignment, generalised Procrustes spread, landmark NME and the
second-order spherical-harmonic basis.  Pure numpy; the SH basis also takes torch tensors when given
``torch.stack``."""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import numpy as np


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama) taking src (N,3) onto dst: (scale, rotation (3,3), shift (3,)),
    applied as ``scale * x @ rotation.T + shift``."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, sig, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt))
    e = np.diag([1.0, 1.0, d])
    r = u @ e @ vt
    scale = float((sig * np.diag(e)).sum() / (a * a).sum())
    return scale, r, md - scale * ms @ r.T


def similarity_align(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """src (N,3) moved onto dst by the least-squares similarity transform."""
    s, r, t = similarity_transform(src, dst)
    return (s * np.asarray(src, np.float64) @ r.T + t).astype(np.float64)


def shape_consistency(shapes: Sequence[np.ndarray], iterations: int = 5) -> np.ndarray:
    """Generalised Procrustes: per-shape mean vertex distance (mm) to the mean after similarity alignment.
    The mean is kept at the shapes' average centroid size, so alignment cannot shrink the error."""
    x = [np.asarray(v, np.float64) for v in shapes]
    size = np.mean([np.sqrt(((v - v.mean(0)) ** 2).sum(1).mean()) for v in x])
    mean = x[0]
    for _ in range(iterations):
        aligned = [similarity_align(v, mean) for v in x]
        mean = np.mean(aligned, 0)
        mean = (mean - mean.mean(0)) * (size / np.sqrt(((mean - mean.mean(0)) ** 2).sum(1).mean()))
    aligned = [similarity_align(v, mean) for v in x]
    return np.array([np.linalg.norm(v - mean, axis=1).mean() for v in aligned])


def nme(pred: np.ndarray, gt: np.ndarray) -> float:
    """pred, gt: (68,2).  Mean point error / sqrt(w·h) of the GT bounding box."""
    wh = gt.max(0) - gt.min(0)
    return float(np.linalg.norm(pred - gt, axis=1).mean() / np.sqrt(wh[0] * wh[1]))


def sh_basis(n, stack: Callable = np.stack):
    """Second-order real SH basis (9 functions, constants folded into the lighting) of unit normals
    (...,3); pass ``stack=torch.stack`` for tensors."""
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    one = x * 0 + 1
    return stack([one, y, z, x, x * y, y * z, 3 * z * z - 1, x * z, x * x - y * y], -1)
