"""The dense BFM mesh the product delivers: a smooth identity basis (no ridges from the 64×64 grid), a
clean forehead border, no folded triangles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from fg3d_blender.core import morphable
from fg3d_blender.core.assets import asset_path
from fg3d_blender.core.geometry import uniform_laplacian
from fg3d_blender.core.pipeline import default_reconstructor

REC = default_reconstructor()


@pytest.fixture(scope="module")
def fm():
    return REC.face_model


def _random_faces(fm, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [fm.param_std[12:52] * rng.normal(size=40) * 1.5 for _ in range(n)]


def _roughness(fm, basis_um, alphas):
    """99th percentile of |L (v − mean)| over the vertices (mm): fine ridges show up here."""
    lap = uniform_laplacian(len(fm.mean_mm), fm.triangles)
    out = []
    for a in alphas:
        d = basis_um.astype(np.float64) @ a / 1000.0
        out.append(np.percentile(np.linalg.norm(lap @ d, axis=1), 99))
    return float(np.mean(out))


def test_identity_basis_is_smooth_on_the_dense_mesh(fm):
    """The old 4-nearest inverse-distance transfer of the grid basis drew ridges across cheeks and neck
    (roughness ~0.25 mm); the Laplacian-regularised fit is smooth and still matches the grid."""
    on = np.flatnonzero(cKDTree(fm.mean_um).query(fm.grid_mean)[0] < morphable.GRID_OFF_SURFACE_UM)
    d, j = cKDTree(fm.grid_mean[on]).query(fm.mean_um, k=morphable.GRID_K)
    w = 1.0 / np.maximum(d, 1.0) ** 2
    old = np.einsum("nk,nkcj->ncj", w / w.sum(1, keepdims=True), fm.grid_basis[on][j])
    alphas = _random_faces(fm)
    ours, before = _roughness(fm, fm.basis_um, alphas), _roughness(fm, old, alphas)
    assert ours < 0.06 and before > 3 * ours, (ours, before)
    # the grid points themselves are still reproduced (the vertex nearest each, within 0.2 mm)
    near = cKDTree(fm.mean_um).query(fm.grid_mean[on])[1]
    for a in alphas[:2]:
        grid = fm.grid_basis[on] @ a / 1000.0
        dense = fm.basis_um[near].astype(np.float64) @ a / 1000.0
        assert np.median(np.linalg.norm(grid - dense, axis=1)) < 0.2


def _tri_normals(v, tris):
    n = np.cross(v[tris[:, 1]] - v[tris[:, 0]], v[tris[:, 2]] - v[tris[:, 0]])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def test_forehead_border_is_smooth_and_nothing_folds(fm):
    nb = morphable.boundary_neighbours(fm.triangles)
    top = [
        k for k, n in nb.items() if len(n) == 2 and fm.mean_um[k, 1] > morphable.FOREHEAD_BORDER_Y_MM * 1000
    ]
    assert len(top) > 100

    def saw(v):
        return np.percentile([np.linalg.norm(v[k] - 0.5 * (v[nb[k][0]] + v[nb[k][1]])) for k in top], 90)

    from_files = np.load(asset_path("beyond3dmm/u_shp.npy")) + np.load(asset_path("beyond3dmm/u_exp.npy"))
    raw = from_files.reshape(3, -1, order="F").T / 1000.0
    assert saw(raw) > 0.5  # the BFM's own staircase (~0.9 mm)
    assert saw(fm.mean_mm.astype(np.float64)) < 0.1
    assert np.abs(fm.mean_mm - raw).max() < 1.5
    flips = (_tri_normals(raw, fm.triangles) * _tri_normals(fm.mean_mm.astype(np.float64), fm.triangles)).sum(
        1
    )
    assert (flips < 0).sum() == 0


def test_keypoint_vertices_are_the_dense_shape_at_the_68_points(fm):
    """fit_3dmm's early passes take the 68 points from the keypoint rows alone: the same points."""
    rng = np.random.default_rng(3)
    alpha = (fm.param_std[12:52] * rng.normal(size=40) * 1.5).astype(np.float32)
    expression = rng.uniform(0, 0.5, len(fm.expressions.names)).astype(np.float32)
    for e in (None, expression):
        dense = fm.face_vertices(alpha, e)[fm.keypoints]
        np.testing.assert_allclose(fm.keypoint_vertices(alpha, e), dense, atol=1e-3)


def test_nnls_equals_scipys_on_random_and_refit_sized_problems():
    """Our Lawson–Hanson NNLS (the pipeline's, so it never imports scipy.optimize) against scipy's."""
    from scipy.optimize import nnls as scipy_nnls

    from fg3d_blender.core.geometry import nnls

    rng = np.random.default_rng(7)
    active = []
    for m, n in [(136, 53)] * 40 + [
        (int(rng.integers(20, 200)), int(rng.integers(1, 60))) for _ in range(200)
    ]:
        a = rng.normal(size=(m, min(n, m)))
        b = rng.normal(size=m) * rng.uniform(0.1, 10.0)
        want, got = scipy_nnls(a, b)[0], nnls(a, b)
        assert got.min() >= 0.0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * max(1.0, np.abs(want).max()))
        active.append((want > 0).mean())
    assert 0.2 < np.mean(active) < 0.8  # both bounds matter in these problems


def test_nnls_survives_nearly_equal_columns():
    """Columns equal to 1e-9: the normal equations are singular; the passive solve falls back to lstsq."""
    from scipy.optimize import nnls as scipy_nnls

    from fg3d_blender.core.geometry import nnls

    rng = np.random.default_rng(3)
    for _ in range(50):
        a = rng.normal(size=(40, 6))
        a[:, 1] = a[:, 0] * (1 + 1e-9)
        b = rng.normal(size=40) + 3 * a[:, 0]
        got, want = nnls(a, b), scipy_nnls(a, b)[0]
        assert got.min() >= 0.0
        np.testing.assert_allclose(np.linalg.norm(a @ got - b), np.linalg.norm(a @ want - b), rtol=1e-6)
