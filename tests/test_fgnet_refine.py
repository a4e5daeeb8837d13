"""FGNet in the pipeline (shipped weights, sha check) and the training command end to end on real photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fg3d_blender.core import assets, detect, onnx_models
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.geometry import shape_consistency, similarity_align
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import default_reconstructor
from fg3d_blender.core.refine import FGNetRefiner
from training import novel_view

pytestmark = pytest.mark.slow  # integration tier: FGNet over many real photos

REC = default_reconstructor()

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTO = SHARED / "photos" / "fg3d_examples" / "AFW_1814664578_2_0.jpg"


def test_shipped_weights_are_installed_and_verified(tmp_path, monkeypatch):
    info = assets.bundled("fgnet")
    assert info is not None, "models/assets.json names no FGNet weights, or their file is missing"
    assert Path(info["file"]).stat().st_size <= 30 * 2**20
    refiner = FGNetRefiner.load(REC.face_model)
    assert refiner.net.width == info["meta"]["width"] and isinstance(refiner.net, onnx_models.FGNetModel)
    assert refiner.uv_size == info["meta"]["uv_size"]
    # a models/ folder whose weights do not match the manifest's sha256 is refused with one line
    models = tmp_path / "fg3d_blender" / "models"
    shutil.copytree(Path(info["file"]).parent, models)
    with open(models / info["path"], "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 16)
    monkeypatch.setattr(assets, "_PACKAGE_DIR", models.parent)
    with pytest.raises(FG3DError, match="corrupt"):
        assets.bundled("fgnet")


def landmark_error(fit, vertices, keypoints) -> float:
    """Mean px distance of the mesh's 68 projected keypoints to the landmark head's prediction."""
    return float(np.linalg.norm(fit.project(vertices[keypoints])[:, :2] - fit.head_landmarks, axis=1).mean())


def shape_error_mm(fit, vertices, truth_image_vertices) -> float:
    """Mean distance (mm) of a posed mesh to the true one after a similarity alignment."""
    q = fit.project(vertices).astype(np.float64)
    aligned = similarity_align(truth_image_vertices.astype(np.float64), q)
    return float(np.linalg.norm(aligned - q, axis=1).mean() / fit.scale)


def test_refine_moves_the_coarse_shape_within_bounds():
    refiner = REC.refiner
    image = load_image(PHOTO)
    fit = REC.fit(image, detect.select_face(REC.faces(image), None).landmarks)
    out = refiner.refine(image, fit)
    assert out is not None and out.shape == fit.vertices.shape and np.isfinite(out).all()
    d = np.linalg.norm(out - fit.vertices, axis=1)
    assert 0.01 < d.mean() < 5.0 and d.max() < 25.0
    again = refiner.refine(image, fit)
    assert np.array_equal(out, again)  # deterministic (eval mode, no dropout)
    # what the landmark loss taught it: over the paper's example photos, the refined mesh's 68 points land
    # closer to the landmark head's prediction, which the coarse refit only approaches under its shape
    # prior (one photo may not: the views' 3D loss also moves keypoints).  Since the coarse fit explains
    # expression itself (ICT blendshapes) the gain left to FGNet is smaller: 1.00 → 0.95 (was ~15 %)
    kp = REC.face_model.keypoints
    errs = []
    for p in sorted(PHOTO.parent.glob("*.jpg")):
        img = load_image(p)
        faces = REC.faces(img)
        if not faces:
            continue
        f = REC.fit(img, detect.select_face(faces, None).landmarks)
        errs.append([landmark_error(f, v, kp) for v in (f.vertices, refiner.refine(img, f, applied=False))])
    errs = np.array(errs)
    assert len(errs) >= 15 and errs[:, 1].mean() < 0.97 * errs[:, 0].mean()


def test_the_applied_refinement_is_half_the_network_where_seen_and_none_where_hidden(photos_dir):
    """In profile (FRGC, ~70° of yaw) half the UV map is hidden: the product keeps the 3DMM there and
    applies REFINE_GAIN of the network's difference where the photo sees the surface."""
    import cv2

    from fg3d_blender.core import refine
    from fg3d_blender.core.fgnet_inputs import fgnet_inputs

    refiner = REC.refiner
    img = load_image(photos_dir / "frgc_multipose" / "02463d453_72_-2.jpg")
    fit = REC.fit(img, detect.select_face(REC.faces(img), None).landmarks)
    raw = refiner.difference(img, fit, applied=False)
    applied = refiner.difference(img, fit)
    inp = fgnet_inputs(img, fit, REC.face_model, refiner.uv_size, refiner.shape_range)
    seen = (inp.visibility > 0).astype(np.uint8)
    reach = int(np.ceil(4 * refine.VISIBLE_BLUR_TEXELS * refiner.uv_size / 128.0)) + 1  # cv2's kernel radius
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    inside = cv2.erode(seen, kernel).astype(bool)
    hidden = ~cv2.dilate(seen, kernel).astype(bool) & REC.face_model.uv_raster(refiner.uv_size).mask
    assert inside.mean() > 0.1 and hidden.mean() > 0.1, (inside.mean(), hidden.mean())
    assert np.abs(raw[hidden]).mean() > 0.05  # the network does predict something there
    assert np.abs(applied[hidden]).max() < 1e-3 * np.abs(raw).max()
    np.testing.assert_allclose(applied[inside], refine.REFINE_GAIN * raw[inside], atol=1e-4)
    verts = refiner.refine(img, fit)
    assert np.array_equal(verts, (fit.vertices + REC.face_model.from_uv(applied)).astype(np.float32))


def test_refine_removes_coarse_error_on_turned_views_of_unseen_faces(photos_dir):
    """What the synthetic views taught it: a face of known shape (a London photo's refined mesh, turned
    20° away and re-rendered) is fitted by the coarse stage, and the refinement brings the fit closer to
    the true shape (mm, after a similarity alignment). London faces were never used in training."""
    refiner = REC.refiner
    fm = REC.face_model
    ratios = []
    for p in sorted((photos_dir / "london_faces").glob("*.jpg"))[:4]:
        img = load_image(p)
        fit = REC.fit(img, detect.select_face(REC.faces(img), None).landmarks)
        drawn = fit.project(refiner.refine(img, fit, applied=False))
        turn = novel_view.away_yaw(fit.pose_degrees["yaw"], 20.0, np.random.default_rng(0))
        moved = novel_view.turned(drawn, turn)
        view, _ = novel_view.render_view(img, drawn, moved, fm.triangles)
        face = detect.nearest_face(REC.faces(view, use_cnn=False), moved[fm.keypoints, :2].mean(0))
        fit2 = REC.fit(view, face.landmarks)
        coarse, refined = (
            shape_error_mm(fit2, v, moved) for v in (fit2.vertices, refiner.refine(view, fit2, applied=False))
        )
        assert 0.2 < coarse < 5.0 and refined < coarse, (p.name, coarse, refined)
        ratios.append(refined / coarse)
    assert np.mean(ratios) < 0.85, ratios


def test_pipeline_uses_fgnet_by_default_and_no_refine_skips_it():
    from fg3d_blender.core.pipeline import reconstruct

    r = reconstruct(PHOTO, texture_size=256)
    assert r.refined and not np.array_equal(r.vertices, r.vertices_coarse)
    c = reconstruct(PHOTO, refine=False, texture_size=256)
    assert not c.refined and np.array_equal(c.vertices, c.vertices_coarse)
    assert np.allclose(c.vertices, r.vertices_coarse)


def test_consistency_alignment_removes_similarity_transforms():
    v = REC.face_model.mean_mm.astype(np.float64)
    rng = np.random.default_rng(0)
    shapes = []
    for k in range(4):
        a = rng.normal(size=3)
        r, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        r *= np.sign(np.linalg.det(r))
        shapes.append((1 + 0.1 * k) * v @ r.T + a * 10)
    assert shape_consistency(shapes).max() < 1e-6
    bumped = [s.copy() for s in shapes]
    bumped[0][:1000] += 2.0  # one view differs locally
    dev = shape_consistency(bumped)
    assert dev[0] > 0.02 and dev[0] > dev[1:].max()
