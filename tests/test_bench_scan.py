"""``bench scan``: the real scan's loading, frame and landmark mapping, the exact point–triangle distance,
the alignment, and (slow tier) one render through the pipeline.  Real files from ``../shared``."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from benchmarks import cli as bench_cli
from benchmarks import scan
from fg3d_blender.core import render
from fg3d_blender.core.detect import Detector
from fg3d_blender.core.geometry import closest_points_on_triangles
from fg3d_blender.core.morphable import FaceModel
from fg3d_blender.core.pipeline import Reconstructor


@pytest.fixture(scope="module")
def face_model(shared_dir) -> FaceModel:
    return FaceModel()


@pytest.fixture(scope="module")
def james(shared_dir, face_model) -> scan.Scan:
    return scan.load_scan(shared_dir / "scans/james", face_model.mean_mm[face_model.keypoints].astype(float))


@pytest.fixture(scope="module")
def detector(shared_dir) -> Detector:
    return Detector()


def _eye_centres(lm):
    return lm[36:42].mean(0), lm[42:48].mean(0)


def test_the_scan_loads_with_its_stated_counts(james):
    assert james.vertices.shape == (6393, 3)
    assert james.triangles.shape == (12228, 3)
    assert len(james.corner_vertex) == 6680  # one render vertex per (v, vt) pair: the UV seams
    assert james.render_triangles.shape == (12228, 3)
    assert np.array_equal(
        np.sort(james.corner_vertex[james.render_triangles], 1), np.sort(james.triangles, 1)
    )
    assert james.texture.shape == (1600, 2400, 3)
    assert np.isfinite(james.landmarks).all()
    right, left = _eye_centres(james.landmarks)
    assert np.linalg.norm(left - right) == pytest.approx(66.5, abs=0.2)  # millimetres
    assert 800 < len(james.face_region()) < len(james.vertices)


def test_the_scan_is_turned_into_the_bfm_frame(james):
    """The file's frame is already y up, face toward +z (a small turn is left): the rotation found from
    the landmarks stays near the identity, and afterwards x is right, y up, z toward the viewer."""
    angle = np.degrees(np.arccos((np.trace(james.rotation) - 1) / 2))
    assert angle < 15
    lm = james.landmarks
    right, left = _eye_centres(lm)
    assert left[0] - right[0] > 60 and abs(left[1] - right[1]) < 3 and abs(left[2] - right[2]) < 5
    assert (right[1] + left[1]) / 2 - lm[48:68, 1].mean() > 40  # eyes above the mouth
    assert lm[30, 2] == lm[:, 2].max()  # the nose tip nearest the viewer
    assert lm[30, 2] - lm[[0, 16], 2].mean() > 60
    # outward normals: the nose tip's faces the viewer
    n = render.vertex_normals(james.vertices, james.triangles)
    tip = np.argmin(np.linalg.norm(james.vertices - lm[30], axis=1))
    assert n[tip, 2] > 0.7


def test_the_scan_is_not_mirrored(james):
    """Its texture holds two photos; the image-left side of the face (x < 0, the subject's right) takes
    its colours from the left photo, the one showing the subject's right cheek and ear."""
    u = james.corner_uv[:, 0]
    x = james.vertices[james.corner_vertex, 0]
    assert u[x < -50].mean() < 0.3 and u[x > 50].mean() > 0.7


def _render_error(james, detector, labels):
    image = scan.render_view(james, 0, 0, scan.LIGHTINGS[0], scan.clean_background(detector))
    faces = detector.faces(image)
    assert len(faces) == 1
    found = faces[0].landmarks
    mapped = scan.landmarks_in_view(james, 0, 0)[labels]
    right, left = _eye_centres(found)
    return np.linalg.norm(mapped - found, axis=1) / np.linalg.norm(left - right)


def test_the_landmark_mapping_matches_dlib_on_a_frontal_render(james, detector):
    """The mapped 3D landmarks projected into a frontal render vs dlib's 68 points on it, per group, in
    inter-ocular units (measured: inner 51 mean 0.033, groups 0.026–0.042, jaw 0.15 — the scan's jaw
    points lie on the jaw, dlib's on the silhouette).  Swapped sides measure ≈ 1.0, one eye's points in
    reverse order 0.155, the outer lip's reversed 0.20."""
    err = _render_error(james, detector, np.arange(68))
    assert err[17:].mean() < 0.045
    for a, b in ((17, 22), (22, 27), (27, 36), (36, 42), (42, 48), (48, 60), (60, 68)):
        assert err[a:b].mean() < 0.06, (a, b, err[a:b].mean())
    assert err[:17].mean() < 0.25


def test_menpo_left_is_the_image_left_not_the_subjects_left(james, detector):
    """Reading menpo's "leye"/"leyebrow" as the subject's left (iBUG 42–47, 22–26) swaps the eyes and
    brows across the face: errors of most of the inter-ocular distance, far past the bound above."""
    swap = np.arange(68)
    swap[36:42], swap[42:48] = np.arange(42, 48), np.arange(36, 42)
    swap[17:22], swap[22:27] = np.arange(22, 27), np.arange(17, 22)
    err = _render_error(james, detector, swap)
    assert err[17:27].mean() > 0.5 and err[36:48].mean() > 0.5


def test_point_triangle_distance_matches_brute_force():
    """The exact distance never exceeds, and is within the sampling step of, the nearest of a dense
    barycentric sampling of each triangle; its closest point lies on the triangle at that distance."""
    rng = np.random.default_rng(0)
    n = 80  # samples per edge
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    w = np.stack([i[keep], j[keep]], 1) / n  # (S,2) barycentric (v, w)
    for _ in range(20):
        a, b, c = rng.normal(size=(3, 3)) * [2.0, 1.0, 0.5]
        p = rng.normal(size=(25, 3)) * 2.0
        dist, bary = closest_points_on_triangles(p, a[None], b[None], c[None])
        samples = a + w[:, :1] * (b - a) + w[:, 1:] * (c - a)
        brute = np.linalg.norm(p[:, None] - samples[None], axis=2).min(1)
        step = max(np.linalg.norm(b - a), np.linalg.norm(c - a), np.linalg.norm(c - b)) / n
        assert np.all(dist <= brute + 1e-9)
        assert np.all(brute - dist <= step)
        assert np.all(bary >= -1e-12) and np.allclose(bary.sum(1), 1)
        closest = bary @ np.stack([a, b, c])
        assert np.allclose(np.linalg.norm(p - closest, axis=1), dist)


def test_scan_to_mesh_matches_the_minimum_over_all_triangles():
    """On a small random bumpy sheet, the candidate search finds the exact nearest-surface distance."""
    rng = np.random.default_rng(1)
    g = 12
    x, y = np.meshgrid(np.arange(g, dtype=float), np.arange(g, dtype=float))
    verts = np.stack([x.ravel(), y.ravel(), rng.normal(scale=0.4, size=g * g)], 1)
    verts[:, :2] += rng.uniform(-0.3, 0.3, size=(g * g, 2))
    k = np.arange(g * g).reshape(g, g)[:-1, :-1].ravel()
    tris = np.concatenate([np.stack([k, k + 1, k + g], 1), np.stack([k + 1, k + g + 1, k + g], 1)])
    points = rng.uniform([1, 1, -2], [g - 2, g - 2, 2], size=(300, 3))
    corners = verts[tris]
    brute, _ = closest_points_on_triangles(
        points[:, None], corners[None, :, 0], corners[None, :, 1], corners[None, :, 2]
    )
    assert np.allclose(scan.scan_to_mesh(points, verts, tris), brute.min(1), atol=1e-12)


def test_aligning_the_scan_to_itself_gives_zero(james):
    """The scan moved by a known similarity comes back onto itself: 0 mm (landmarks, then ICP)."""
    ang = np.radians(20.0)
    rot = np.array([[np.cos(ang), 0, np.sin(ang)], [0, 1, 0], [-np.sin(ang), 0, np.cos(ang)]])
    moved = 1.15 * james.vertices @ rot.T + [30.0, -10.0, 5.0]
    moved_lm = 1.15 * james.landmarks @ rot.T + [30.0, -10.0, 5.0]
    face = james.face_region()
    aligned, d = scan.measure(moved, moved_lm, james.triangles, james, face)
    assert np.abs(aligned - james.vertices).max() < 1e-6
    assert d.max() < 1e-6


def test_the_mean_face_is_a_sane_floor(james, face_model):
    """The BFM mean face against the scan: below a millimetre typical (measured 0.79 median)."""
    kp = face_model.keypoints
    _, d = scan.measure(
        face_model.mean_mm, face_model.mean_mm[kp], face_model.triangles, james, james.face_region()
    )
    assert 0.5 < np.median(d) < 1.1 and d.mean() < 1.3


def test_the_bench_is_registered_with_its_options(shared_dir):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(["scan"])
    assert bench_cli.RUNNERS["scan"] == "scan"
    assert (shared_dir / "scans/james").samefile(args.dir)
    assert (args.no_refine, args.no_refit, args.lightings, args.json) == (False, False, 2, False)
    args = parser.parse_args(["scan", "--no-refine", "--no-refit", "--lightings", "3", "--json"])
    assert (args.no_refine, args.no_refit, args.lightings, args.json) == (True, True, 3, True)
    names = [v[0] for v in scan.views(2)]
    assert len(names) == len(set(names)) == 42


@pytest.mark.slow  # integration tier: renders of the scan through the whole pipeline
def test_renders_reconstruct_close_to_the_scan(james, face_model):
    """A frontal and a 60° render through detection, the fit and FGNet: found, posed as rendered, and
    within a few tenths of a millimetre of the mean face's floor."""
    rec = Reconstructor()
    backdrop = scan.clean_background(rec)
    face = james.face_region()
    for yaw in (0, 60):
        image = scan.render_view(james, yaw, 0, scan.LIGHTINGS[0], backdrop)
        faces = rec.faces(image)
        assert faces
        fit = rec.fit(image, faces[0].landmarks)
        assert fit.pose_degrees["yaw"] == pytest.approx(yaw, abs=10)
        verts = scan.reconstruct(rec, image, refine=True, refit=True)
        _, d = scan.measure(verts, verts[rec.face_model.keypoints], rec.face_model.triangles, james, face)
        assert np.median(d) < 1.2
