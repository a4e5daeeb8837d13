"""The compiled renderer (render_ext) against the pure-numpy reference in benchmarks/raster_reference.py."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import raster_reference as ref
from fg3d_blender import render_ext as rx
from fg3d_blender.core import render
from fg3d_blender.core.pipeline import default_reconstructor

REC = default_reconstructor()


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


def compare_raster(verts, tris, h, w):
    """Compiled vs reference; returns (compiled outputs, reference outputs); asserts agreement."""
    depth, tri_id, bary = rx.rasterize(_f32(verts), _i32(tris), h, w)
    r_depth, r_tri, r_bary, amb = ref.rasterize(verts, tris, h, w)
    assert depth.shape == (h, w) and tri_id.shape == (h, w) and bary.shape == (h, w, 3)
    assert depth.dtype == np.float32 and tri_id.dtype == np.int32 and bary.dtype == np.float32
    sure = ~amb
    np.testing.assert_array_equal(tri_id[sure], r_tri[sure])
    hit = sure & (r_tri >= 0)
    np.testing.assert_allclose(depth[hit], r_depth[hit], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(bary[hit], r_bary[hit], atol=1e-4)
    assert np.all(np.isneginf(depth[tri_id < 0]))
    assert np.all(bary[tri_id < 0] == 0)
    # ambiguous pixels (on an edge or a depth tie, where float32 may decide either way) are excluded
    # above; they must stay rare or the comparison would prove little
    assert amb.mean() < 0.05, "the reference marks too many pixels ambiguous: test mesh is badly chosen"
    return (depth, tri_id, bary), (r_depth, r_tri, r_bary)


def random_mesh(rng, n_tri, h, w, margin=8):
    verts = np.column_stack(
        [
            rng.uniform(-margin, w + margin, 3 * n_tri),
            rng.uniform(-margin, h + margin, 3 * n_tri),
            rng.uniform(-50, 50, 3 * n_tri),
        ]
    )
    tris = rng.permutation(3 * n_tri).reshape(n_tri, 3)
    return verts, tris


@pytest.mark.parametrize("seed", range(6))
def test_rasterize_random_meshes_match_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = 37, 53
    verts, tris = random_mesh(rng, 25, h, w)
    (depth, tri_id, _), _ = compare_raster(verts, tris, h, w)
    assert (tri_id >= 0).sum() > 0.3 * h * w  # the overlapping triangles really cover the image
    assert len(np.unique(tri_id[tri_id >= 0])) > 5


def test_rasterize_small_triangles_match_reference():
    """Many sub-pixel and few-pixel triangles: the cases where pixel-centre sampling matters most."""
    rng = np.random.default_rng(42)
    h, w = 24, 24
    centres = rng.uniform(0, 24, (200, 2))
    offs = rng.normal(0, 1.2, (200, 3, 2))
    verts = np.concatenate([centres[:, None, :] + offs, rng.uniform(0, 10, (200, 3, 1))], axis=2).reshape(
        -1, 3
    )
    tris = np.arange(600).reshape(200, 3)
    compare_raster(verts, tris, h, w)


def test_nearer_triangle_wins_in_either_order():
    h, w = 20, 20
    far = [[1.3, 1.2, 1.0], [18.7, 1.4, 1.0], [1.1, 18.6, 1.0]]
    near = [[18.6, 18.8, 5.0], [1.2, 2.1, 5.0], [17.9, 1.3, 5.0]]
    verts = np.array(far + near)
    for tris in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]):
        (depth, tri_id, _), _ = compare_raster(verts, np.array(tris), h, w)
        near_id = [t for t, tri in enumerate(tris) if tri[0] == 3][0]
        both = tri_id >= 0
        # a pixel covered by both (e.g. near the top edge centre) shows the near one
        assert tri_id[3, 10] == near_id and depth[3, 10] == pytest.approx(5.0)
        assert tri_id[15, 3] == 1 - near_id and depth[15, 3] == pytest.approx(1.0)
        assert both.sum() > 200


def test_both_windings_cover_the_same_pixels_with_the_same_weights():
    h, w = 30, 30
    verts = np.array([[2.3, 3.1, 0.0], [27.2, 5.4, 10.0], [9.7, 26.8, 20.0]])
    d_ccw, t_ccw, b_ccw = rx.rasterize(_f32(verts), _i32([[0, 1, 2]]), h, w)
    d_cw, t_cw, b_cw = rx.rasterize(_f32(verts), _i32([[0, 2, 1]]), h, w)
    np.testing.assert_array_equal(t_ccw >= 0, t_cw >= 0)
    np.testing.assert_allclose(d_ccw, d_cw, atol=1e-4)
    m = t_ccw >= 0
    np.testing.assert_allclose(b_ccw[m][:, [0, 2, 1]], b_cw[m], atol=1e-5)
    np.testing.assert_allclose(b_ccw[m].sum(1), 1.0, atol=1e-5)
    assert np.all(b_ccw[m] >= -1e-6)
    compare_raster(verts, np.array([[0, 2, 1]]), h, w)


def test_bary_weights_reproduce_the_pixel_centre():
    rng = np.random.default_rng(7)
    verts, tris = random_mesh(rng, 10, 32, 32)
    depth, tri_id, bary = rx.rasterize(_f32(verts), _i32(tris), 32, 32)
    ys, xs = np.nonzero(tri_id >= 0)
    corners = verts[tris[tri_id[ys, xs]]]  # (K,3,3)
    p = np.einsum("kj,kjc->kc", bary[ys, xs], corners)
    np.testing.assert_allclose(p[:, 0], xs, atol=2e-3)
    np.testing.assert_allclose(p[:, 1], ys, atol=2e-3)
    np.testing.assert_allclose(p[:, 2], depth[ys, xs], atol=2e-3)


def test_triangle_partly_outside_the_image_is_clipped():
    h, w = 16, 24
    verts = np.array([[-30.5, -10.2, 1.0], [40.3, 8.1, 2.0], [5.2, 50.7, 3.0]])
    (depth, tri_id, _), _ = compare_raster(verts, np.array([[0, 1, 2]]), h, w)
    assert 0 < (tri_id == 0).sum() < h * w
    off = np.array([[-30.0, -30.0, 1], [-5.0, -30.0, 1], [-20.0, -5.0, 1]])
    _, t_off, _ = rx.rasterize(_f32(off), _i32([[0, 1, 2]]), h, w)
    assert (t_off < 0).all()


def test_shared_edge_has_no_gaps():
    """A square split along its diagonal covers every pixel centre inside it (edges are inclusive)."""
    h, w = 20, 20
    verts = np.array([[2.0, 2.0, 1.0], [17.0, 2.0, 1.0], [17.0, 17.0, 1.0], [2.0, 17.0, 1.0]])
    tris = np.array([[0, 1, 2], [0, 2, 3]])
    _, tri_id, _ = rx.rasterize(_f32(verts), _i32(tris), h, w)
    assert (tri_id[2:18, 2:18] >= 0).all()
    assert (tri_id[:2] < 0).all() and (tri_id[18:] < 0).all()
    assert (tri_id[:, :2] < 0).all() and (tri_id[:, 18:] < 0).all()


def test_degenerate_and_invalid_triangles_draw_nothing():
    h, w = 16, 16
    verts = np.array(
        [
            [1.0, 1.0, 1.0],
            [8.0, 8.0, 1.0],
            [14.0, 14.0, 1.0],  # collinear
            [3.0, 12.0, 1.0],
        ]
    )
    tris = np.array([[0, 1, 2], [0, 0, 3], [3, 3, 3], [0, 1, 9], [-1, 1, 3]])
    depth, tri_id, bary = rx.rasterize(_f32(verts), _i32(tris), h, w)
    assert (tri_id < 0).all() and np.isneginf(depth).all() and (bary == 0).all()
    compare_raster(verts, tris[:3], h, w)


def test_rasterize_rejects_bad_shapes():
    with pytest.raises(ValueError):
        rx.rasterize(_f32(np.zeros((3, 2))), _i32([[0, 1, 2]]), 4, 4)


@pytest.mark.parametrize("seed", range(3))
def test_interpolate_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    h, w = 28, 31
    verts, tris = random_mesh(rng, 15, h, w)
    attrs = rng.normal(size=(len(verts), 4))
    depth, tri_id, bary = rx.rasterize(_f32(verts), _i32(tris), h, w)
    out = rx.interpolate(tri_id, bary, _i32(tris), _f32(attrs))
    assert out.shape == (h, w, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref.interpolate(tri_id, bary, tris, attrs), atol=1e-5)
    assert (out[tri_id < 0] == 0).all() and (tri_id >= 0).any()
    # interpolating z reproduces the depth buffer
    z = rx.interpolate(tri_id, bary, _i32(tris), _f32(verts[:, 2:3]))[:, :, 0]
    np.testing.assert_allclose(z[tri_id >= 0], depth[tri_id >= 0], atol=1e-3)


def test_render_wrappers_accept_1d_attributes_and_any_dtype():
    rng = np.random.default_rng(3)
    verts, tris = random_mesh(rng, 8, 20, 20)
    r = render.rasterize(verts.astype(np.float64), tris.astype(np.int64), 20, 20)
    a = rng.normal(size=len(verts))
    one = render.interpolate(r, tris, a)
    assert one.shape == (20, 20)
    np.testing.assert_allclose(one, ref.interpolate(r.tri_id, r.bary, tris, a[:, None])[:, :, 0], atol=1e-5)
    np.testing.assert_array_equal(r.mask, r.tri_id >= 0)


def test_vertex_normals_match_reference():
    rng = np.random.default_rng(11)
    verts = rng.normal(size=(40, 3))
    tris = rng.integers(0, 40, size=(70, 3))
    tris = tris[(tris[:, 0] != tris[:, 1]) & (tris[:, 1] != tris[:, 2]) & (tris[:, 0] != tris[:, 2])]
    n = rx.vertex_normals(_f32(verts), _i32(tris))
    r = ref.vertex_normals(verts, tris)
    np.testing.assert_allclose(n, r, atol=1e-4)
    used = np.isin(np.arange(40), tris)
    np.testing.assert_allclose(np.linalg.norm(n[used], axis=1), 1.0, atol=1e-5)


def test_vertex_normals_of_known_surfaces():
    # a flat square in z = 3 wound counter-clockwise seen from +z: every normal is +z
    verts = np.array([[0, 0, 3], [1, 0, 3], [1, 1, 3], [0, 1, 3], [9, 9, 9]], dtype=np.float64)
    tris = np.array([[0, 1, 2], [0, 2, 3]])
    n = rx.vertex_normals(_f32(verts), _i32(tris))
    np.testing.assert_allclose(n[:4], [[0, 0, 1]] * 4, atol=1e-6)
    assert (n[4] == 0).all()  # an unused vertex keeps a zero normal
    n_rev = rx.vertex_normals(_f32(verts), _i32(tris[:, ::-1]))
    np.testing.assert_allclose(n_rev[:4], [[0, 0, -1]] * 4, atol=1e-6)
    # a closed octahedron: vertex normals point away from the centre
    o = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
    ot = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    np.testing.assert_allclose(rx.vertex_normals(_f32(o), _i32(ot)), o, atol=1e-6)


def test_sample_bilinear_matches_reference():
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 255, size=(13, 17, 3))
    pts = np.concatenate(
        [
            rng.uniform(-3, 20, size=(300, 2)),
            [[0, 0], [16, 12], [16.0, 0.0], [0.0, 12.0], [-5, -5], [40, 40], [7.5, 3.25]],
        ]
    )
    out = rx.sample_bilinear(_f32(img), _f32(pts))
    assert out.shape == (len(pts), 3)
    np.testing.assert_allclose(out, ref.sample_bilinear(img, pts), rtol=1e-5, atol=1e-3)
    # integer points read the pixel itself (pixel centres at integer coordinates)
    np.testing.assert_allclose(rx.sample_bilinear(_f32(img), _f32([[4, 9]])), img[9:10, 4], rtol=1e-6)
    # the wrapper in core.render squeezes single-channel maps
    g = img[:, :, 0]
    np.testing.assert_allclose(
        render.sample(g, pts), ref.sample_bilinear(g[:, :, None], pts)[:, 0], rtol=1e-5, atol=1e-3
    )


# ---- UV space on the real BFM mesh ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bfm(shared_dir):
    return REC.face_model


def test_uv_round_trip_returns_per_vertex_values(bfm):
    """to_uv (rasterize the UV layout, interpolate) then from_uv (bilinear at each vertex's UV)."""
    attrs = bfm.mean_mm.astype(np.float64)  # smooth, linear over each triangle
    size = 1024
    uv_map = bfm.to_uv(attrs, size)
    assert uv_map.shape == (size, size, 3)
    layout = bfm.uv_raster(size).mask
    assert layout.mean() > 0.9  # BFM_UV fills the unit square
    back = bfm.from_uv(uv_map)
    err = np.linalg.norm(back - attrs, axis=1)
    # vertices whose 2×2 bilinear footprint is inside the layout come back almost exactly
    px = render.uv_pixel_coords(bfm.uvs, size)[:, :2]
    x0 = np.clip(np.floor(px[:, 0]).astype(int), 0, size - 2)
    y0 = np.clip(np.floor(px[:, 1]).astype(int), 0, size - 2)
    inner = layout[y0, x0] & layout[y0 + 1, x0] & layout[y0, x0 + 1] & layout[y0 + 1, x0 + 1]
    assert inner.mean() > 0.9
    assert np.percentile(err[inner], 99) < 0.5  # mm; the mesh spans ~180 mm
    assert np.median(err[inner]) < 0.1
    # and a texel's value is the value interpolated at the texel centre (the PNCC-style code)
    r = bfm.uv_raster(size)
    ys, xs = np.nonzero(r.mask)
    pick = np.random.default_rng(0).choice(len(ys), 500, replace=False)
    exp = ref.interpolate(
        r.tri_id[ys[pick], xs[pick]][None], r.bary[ys[pick], xs[pick]][None], bfm.triangles, attrs
    )[0]
    np.testing.assert_allclose(uv_map[ys[pick], xs[pick]], exp, atol=1e-3)


def test_uv_raster_matches_reference_on_a_bfm_patch(bfm):
    """The compiled rasterizer on the real UV layout agrees with the reference on a 64×64 window."""
    size = 512
    pix = render.uv_pixel_coords(bfm.uvs, size)
    pix[:, :2] -= 224  # a window in the middle of the layout
    pix[:, 2] = np.random.default_rng(1).uniform(0, 1, len(pix))
    sel = np.all(
        np.all((pix[bfm.triangles][:, :, :2] > -2) & (pix[bfm.triangles][:, :, :2] < 66), axis=2), axis=1
    )
    tris = bfm.triangles[sel]
    assert len(tris) > 500
    compare_raster(pix.astype(np.float64), tris, 64, 64)
