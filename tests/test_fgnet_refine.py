"""FGNet in the pipeline (shipped weights, sha check) and the training command end to end on real photos."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FG3D_ASSET_MIRROR", str(Path(__file__).resolve().parents[2] / "shared" / "models"))

from fg3d_blender.core import refine as refine_stage  # noqa: E402
from fg3d_blender.core.errors import FG3DError  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTO = SHARED / "photos" / "fg3d_examples" / "AFW_1814664578_2_0.jpg"


def test_shipped_weights_are_installed_and_verified():
    info = refine_stage.model_info()
    assert info is not None, "models/fgnet.json or its weights file is missing"
    assert Path(info["path"]).stat().st_size <= 30 * 2 ** 20
    net = refine_stage.load_verified(info)
    assert net.width == info["width"] and not net.training
    bad = dict(info, sha256="0" * 64)
    with pytest.raises(FG3DError, match="corrupt"):
        refine_stage.load_verified(bad)


def test_refine_moves_the_coarse_shape_within_bounds():
    from fg3d_blender.core import detect, morphable
    from fg3d_blender.core.image_io import load_image
    image = load_image(PHOTO)
    fit = morphable.fit_3dmm(image, detect.select_face(detect.detect_faces(image), None).landmarks)
    out = refine_stage.refine(image, fit)
    assert out is not None and out.shape == fit.vertices.shape and np.isfinite(out).all()
    d = np.linalg.norm(out - fit.vertices, axis=1)
    assert 0.01 < d.mean() < 5.0 and d.max() < 25.0
    again = refine_stage.refine(image, fit)
    assert np.array_equal(out, again)  # deterministic (eval mode, no dropout)
    # what the landmark loss taught it: over the paper's example photos, the refined mesh's 68 points land
    # closer to the landmark head's prediction, which the coarse refit only approaches under its shape
    # prior (one photo may not: the views' 3D loss also moves keypoints)
    kp = morphable.face_model().keypoints
    errs = []
    for p in sorted(PHOTO.parent.glob("*.jpg")):
        img = load_image(p)
        faces = detect.detect_faces(img)
        if not faces:
            continue
        f = morphable.fit_3dmm(img, detect.select_face(faces, None).landmarks)
        err = lambda v: float(np.linalg.norm(f.project(v[kp])[:, :2] - f.head_landmarks, axis=1).mean())
        errs.append((err(f.vertices), err(refine_stage.refine(img, f))))
    errs = np.array(errs)
    assert len(errs) >= 15 and errs[:, 1].mean() < 0.9 * errs[:, 0].mean()


def test_refine_removes_coarse_error_on_turned_views_of_unseen_faces(photos_dir):
    """What the synthetic views taught it: a face of known shape (a London photo's refined mesh, turned
    20° away and re-rendered) is fitted by the coarse stage, and the refinement brings the fit closer to
    the true shape (mm, after a similarity alignment). London faces were never used in training."""
    from fg3d_blender.core import bench, detect, morphable, novel_view
    from fg3d_blender.core.image_io import load_image
    fm = morphable.face_model()
    ratios = []
    for p in sorted((photos_dir / "london_faces").glob("*.jpg"))[:4]:
        img = load_image(p)
        fit = morphable.fit_3dmm(img, detect.select_face(detect.detect_faces(img), None).landmarks)
        drawn = fit.project(refine_stage.refine(img, fit))
        turn = novel_view.away_yaw(fit.pose_degrees["yaw"], 20.0, np.random.default_rng(0))
        moved = novel_view.turned(drawn, turn)
        view, _ = novel_view.render_view(img, drawn, moved, fm.triangles)
        face = detect.nearest_face(detect.detect_faces(view, use_cnn=False), moved[fm.keypoints, :2].mean(0))
        fit2 = morphable.fit_3dmm(view, face.landmarks)

        def error_mm(vertices):
            q = fit2.project(vertices).astype(np.float64)
            return np.linalg.norm(bench.similarity_align(moved.astype(np.float64), q) - q, axis=1).mean() / fit2.scale

        coarse, refined = error_mm(fit2.vertices), error_mm(refine_stage.refine(view, fit2))
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


def test_train_fgnet_command_builds_cache_trains_and_resumes(tmp_path):
    import torch
    from fg3d_blender.cli import main
    from fg3d_blender.core import train_fgnet
    from fg3d_blender.core.fgnet import load_checkpoint
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((SHARED / "training" / "utkface").iterdir())[:10]:
        shutil.copyfile(p, photos / p.name)
    out = tmp_path / "w.pt"
    args = ["train-fgnet", "--photos", str(photos), "--out", str(out), "--steps", "2", "--batch", "2",
            "--width", "4", "--uv-size", "64", "--checkpoint-every", "1", "--eval-every", "0"]
    assert main(args) == 0
    data = train_fgnet.load_cache(tmp_path / "w.cache")
    assert data["size"] == 64 and 8 <= len(data["names"]) <= 10
    assert data["landmarks"].shape[1:] == (68, 2) and np.isfinite(data["light"]).all()
    # the default landmark target is the regressor's head, which the coarse refit approaches but (under
    # its shape prior) does not reach: its error to the fit is below dlib's and above zero
    from fg3d_blender.core import morphable
    fm = morphable.face_model()
    kp = np.stack([fm.shape_mm(a)[fm.keypoints] for a in data["alpha"]])
    proj = np.einsum("nkj,nij->nki", kp, data["A"].astype(np.float64))[..., :2] + data["b"][:, None, :2]
    to_head = np.linalg.norm(proj - data["head_landmarks"], axis=-1).mean()
    to_dlib = np.linalg.norm(proj - data["landmarks"], axis=-1).mean()
    assert 0.05 < to_head < to_dlib
    ckpt_path = f"{out}.ckpt"
    ck = torch.load(ckpt_path, weights_only=True)
    assert ck["step"] == 2
    assert main(args[:6] + ["3"] + args[7:] + ["--resume"]) == 0
    assert torch.load(ckpt_path, weights_only=True)["step"] == 3
    net = load_checkpoint(out)
    assert net.width == 4
    models = tmp_path / "models"
    models.mkdir()
    info = train_fgnet.install_weights(out, models)
    assert json.loads((models / "fgnet.json").read_text())["sha256"] == info["sha256"]
    assert info["landmark_target"] == "head"
    # fine-tuning with synthetic views: the views' geometry is the coarse fit refined by --init
    out2 = tmp_path / "w2.pt"
    args2 = ["train-fgnet", "--photos", str(photos), "--out", str(out2), "--cache", str(tmp_path / "w.cache"),
             "--steps", "1", "--batch", "2", "--uv-size", "64", "--eval-every", "0", "--init", str(out),
             "--views", "6", "--views-per-batch", "2"]
    assert main(args2) == 0
    views = train_fgnet.load_cache(tmp_path / "w.cache" / "views", "views_*.npz")
    assert 4 <= len(views["names"]) <= 6 and all(str(n).startswith("view_") for n in views["names"])
    assert views["target"].shape[1:] == (64, 64, 3) and views["head_landmarks"].shape[1:] == (68, 2)
    # the coarse fit of a view misses its true shape by a plausible amount (mm, after similarity alignment)
    uvm = train_fgnet.UVModel(64)
    losses = train_fgnet.Losses(uvm, torch.device("cpu"))
    b = train_fgnet.Batcher(views, 64, torch.device("cpu")).batch(np.arange(len(views["names"])))
    err = losses.shape_error_mm(torch.zeros_like(b["shape"]), b).numpy()
    assert np.isfinite(err).all() and 0.2 < err.mean() < 5.0
    assert torch.load(out2, weights_only=True)["views"] == 6
    assert main(args2[:-4] + ["--init", str(tmp_path / "none.pt")]) == 1  # one-line error, nothing trained
    # a cache from an older version is refused with a message, not silently mixed in
    shard = next((tmp_path / "w.cache").glob("shard_*.npz"))
    old = dict(np.load(shard))
    old["version"] = np.array(train_fgnet.CACHE_VERSION - 1)
    np.savez(shard, **old)
    with pytest.raises(ValueError, match="older version"):
        train_fgnet.load_cache(tmp_path / "w.cache")
    # and rebuilt when the photos are given again (only that shard)
    train_fgnet.build_cache(train_fgnet.list_photos(photos), tmp_path / "w.cache", 64, log=lambda m: None)
    assert len(train_fgnet.load_cache(tmp_path / "w.cache")["names"]) == len(data["names"])


def test_consistency_alignment_removes_similarity_transforms():
    from fg3d_blender.core.bench import shape_consistency
    from fg3d_blender.core import morphable
    v = morphable.face_model().mean_mm.astype(np.float64)
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
