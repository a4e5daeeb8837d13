"""Shared maths: similarity (Umeyama) alignment, generalised Procrustes spread, landmark NME, the
second-order spherical-harmonic basis, non-negative least squares, closest points on a mesh and its
Laplacian.  Numpy; the SH basis also takes torch tensors when given ``torch.stack``.  scipy (sparse,
spatial) is imported only by the two functions that build derived files, so a reconstruction never
pays its import (~0.2 s of every cold start)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp


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


def pose_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    """R = Rz(roll) @ Rx(pitch) @ Ry(yaw) in the BFM frame (x right, y up, z toward the viewer): the
    decomposition ``Fit.pose_degrees`` reads back (yaw + = face toward the photo's right, pitch + = head
    down, roll in the image plane)."""
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


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


def closest_points_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """Closest point of each triangle (a,b,c: (...,3)) to p (...,3): (distance (...), barycentric
    weights (...,3)).  The interior projection where it falls inside, else the nearest of the three
    edge segments."""
    p, a, b, c = (np.asarray(x, np.float64) for x in (p, a, b, c))
    ab, ac, ap = b - a, c - a, p - a
    d00, d01, d11 = (ab * ab).sum(-1), (ab * ac).sum(-1), (ac * ac).sum(-1)
    d20, d21 = (ap * ab).sum(-1), (ap * ac).sum(-1)
    den = np.where(np.abs(d00 * d11 - d01 * d01) < 1e-30, 1e-30, d00 * d11 - d01 * d01)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.stack([1 - v - w, v, w], -1)
    inside = (v >= 0) & (w >= 0) & (v + w <= 1)
    best = np.where(inside, np.linalg.norm(p - (a + v[..., None] * ab + w[..., None] * ac), axis=-1), np.inf)
    corners = (a, b, c)
    for i, j in ((0, 1), (1, 2), (2, 0)):
        e = corners[j] - corners[i]
        t = np.clip(((p - corners[i]) * e).sum(-1) / np.maximum((e * e).sum(-1), 1e-30), 0.0, 1.0)
        d = np.linalg.norm(p - (corners[i] + t[..., None] * e), axis=-1)
        closer = d < best
        if closer.any():
            edge_bary = np.zeros(bary.shape)
            edge_bary[..., i], edge_bary[..., j] = 1 - t, t
            bary = np.where(closer[..., None], edge_bary, bary)
            best = np.where(closer, d, best)
    return best, bary


def closest_points_on_mesh(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, k: int = 16):
    """The closest surface point of a triangle mesh to each of ``points`` (N,3): (distance (N,),
    triangle index (N,), barycentric weights (N,3)).  Candidates are the ``k`` triangles whose
    centroids are nearest, exact on meshes of even density."""
    v = np.asarray(vertices, np.float64)
    tri = np.asarray(triangles)
    k = min(k, len(tri))
    from scipy.spatial import cKDTree  # building derived files and benchmarks only

    _, cand = cKDTree(v[tri].mean(1)).query(points, k=k)
    cand = cand.reshape(len(points), k)
    corners = v[tri[cand]]  # (N,k,3,3)
    p = np.asarray(points, np.float64)[:, None, :]
    dist, bary = closest_points_on_triangles(p, corners[:, :, 0], corners[:, :, 1], corners[:, :, 2])
    best = dist.argmin(1)
    rows = np.arange(len(points))
    return dist[rows, best], cand[rows, best], bary[rows, best]


def uniform_laplacian(n: int, triangles: np.ndarray) -> sp.csr_matrix:
    """Graph Laplacian I − D⁻¹A of a triangle mesh's edges (n vertices)."""
    import scipy.sparse as sp  # building derived files only

    e = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    a = sp.csr_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    a.data[:] = 1.0
    deg = np.asarray(a.sum(1)).ravel()
    deg[deg == 0] = 1.0
    return (sp.identity(n) - sp.diags(1.0 / deg) @ a).tocsr()


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 0) -> np.ndarray:
    """argmin |a x − b|² over x ≥ 0: Lawson and Hanson's active-set method (the algorithm behind
    ``scipy.optimize.nnls``, to which ``tests/test_face_model.py`` compares it), in numpy so the pipeline
    does not import scipy.optimize (~0.25 s of every cold start).  ``max_iter`` 0: 3 × columns."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, bool)
    atb, ata = a.T @ b, a.T @ a
    tol = 10.0 * np.finfo(np.float64).eps * np.abs(a).sum(0).max() * max(a.shape)
    w = atb.copy()
    for _ in range(max_iter or 3 * n):
        if passive.all() or w[~passive].max() <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while passive.any():
            s = np.zeros(n)
            s[passive] = _passive_solve(a, b, ata, atb, passive)
            if s[passive].min() > 0:
                x = s
                break
            step = passive & (s <= 0) & (x - s > 0)  # the variables that leave on the way to s
            alpha = np.min(x[step] / (x[step] - s[step])) if step.any() else 0.0
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = atb - ata @ x
    return x


def _passive_solve(a, b, ata, atb, passive) -> np.ndarray:
    """Least squares in the passive columns: the normal equations (fast), or the columns' own lstsq
    where they are singular (nearly equal columns)."""
    try:
        return np.linalg.solve(ata[np.ix_(passive, passive)], atb[passive])
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
