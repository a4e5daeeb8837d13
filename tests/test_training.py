"""FGNet training (the ``training`` package beside the shipped one): the train-fgnet command end to end
on real photos, and the FGNet input contract shared by training and inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fg3d_blender.cli import main
from fg3d_blender.core import detect
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.fgnet import load_checkpoint
from fg3d_blender.core.fgnet_inputs import fgnet_inputs
from fg3d_blender.core.image_io import list_photos, load_image
from fg3d_blender.core.pipeline import default_reconstructor
from training import cache, trainer
from training.batches import Batcher
from training.losses import Losses

REC = default_reconstructor()
SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_training_and_inference_build_identical_fgnet_inputs():
    """The one FGNet input contract: a cached training record gives the network exactly the inputs the
    pipeline's ``fgnet_inputs`` gives for that photo and fit, bit for bit; and the cached fit (stored in
    float32) is the pipeline's own fit, so those inputs match the pipeline's to float32 precision."""
    photos = sorted((SHARED / "training" / "utkface").iterdir())[:3]
    fm, shape_range = REC.face_model, REC.refiner.shape_range
    images, fits, records = [], [], []
    for p in photos:
        img = load_image(p)
        face = detect.nearest_face(REC.faces(img, use_cnn=False), (100, 100))
        images.append(img)
        fits.append(REC.fit(img, face.landmarks))
        records.append(cache.cache_one(REC, img, face.landmarks, 64, shape_range))
    data = {k: np.stack([r[k] for r in records]) for k in records[0]}
    data["images"] = np.stack(images)
    batcher = Batcher(fm, data, 64, torch.device("cpu"))
    for i in range(len(photos)):
        training_side = batcher.inputs(i)
        same_fit = fgnet_inputs(images[i], cache.cached_fit(fm, data, i), fm, 64, shape_range)
        pipeline_fit = fgnet_inputs(images[i], fits[i], fm, 64, shape_range)
        for name in ("paf", "visibility", "shape", "positions"):
            assert np.array_equal(getattr(same_fit, name), getattr(training_side, name)), name
        assert np.abs(pipeline_fit.paf - training_side.paf).max() < 0.02
        assert np.abs(pipeline_fit.shape - training_side.shape).max() < 1e-4
        assert np.abs(pipeline_fit.visibility - training_side.visibility).mean() < 1e-3
    b = batcher.batch([0, 1])
    assert b["paf"].shape == (2, 3, 192, 192) and b["vis"].shape == (2, 1, 64, 64)


@pytest.mark.slow  # trains, fine-tunes and resumes (about 50 s)
def test_train_fgnet_command_builds_cache_trains_and_resumes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((SHARED / "training" / "utkface").iterdir())[:10]:
        shutil.copyfile(p, photos / p.name)
    out = tmp_path / "w.pt"
    args = [
        "train-fgnet",
        "--photos",
        str(photos),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch",
        "2",
        "--width",
        "4",
        "--uv-size",
        "64",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "0",
    ]
    assert main(args) == 0
    data = cache.load_cache(tmp_path / "w.cache")
    assert data["size"] == 64 and 8 <= len(data["names"]) <= 10
    assert data["landmarks"].shape[1:] == (68, 2) and np.isfinite(data["light"]).all()
    # the default landmark target is the regressor's head, which the coarse refit approaches but (under
    # its shape prior) does not reach: its error to the fit is below dlib's and above zero
    fm = REC.face_model
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
    (models / "assets.json").write_text(json.dumps({"assets": []}))
    info = trainer.install_weights(out, models)
    manifest = json.loads((models / "assets.json").read_text())
    assert manifest["bundled"] == [info] and info["role"] == "fgnet" and (models / info["path"]).is_file()
    assert info["meta"]["landmark_target"] == "head" and info["meta"]["width"] == 4
    # fine-tuning with synthetic views: the views' geometry is the coarse fit refined by --init
    out2 = tmp_path / "w2.pt"
    args2 = [
        "train-fgnet",
        "--photos",
        str(photos),
        "--out",
        str(out2),
        "--cache",
        str(tmp_path / "w.cache"),
        "--steps",
        "1",
        "--batch",
        "2",
        "--uv-size",
        "64",
        "--eval-every",
        "0",
        "--init",
        str(out),
        "--views",
        "6",
        "--views-per-batch",
        "2",
    ]
    assert main(args2) == 0
    views = cache.load_cache(tmp_path / "w.cache" / "views", "views_*.npz")
    assert 4 <= len(views["names"]) <= 6 and all(str(n).startswith("view_") for n in views["names"])
    assert views["target"].shape[1:] == (64, 64, 3) and views["head_landmarks"].shape[1:] == (68, 2)
    # the coarse fit of a view misses its true shape by a plausible amount (mm, after similarity alignment)
    batcher = Batcher(fm, views, 64, torch.device("cpu"))
    losses = Losses(fm, batcher.uvm, torch.device("cpu"))
    b = batcher.batch(np.arange(len(views["names"])))
    err = losses.shape_error_mm(torch.zeros_like(b["shape"]), b).numpy()
    assert np.isfinite(err).all() and 0.2 < err.mean() < 5.0
    assert torch.load(out2, weights_only=True)["views"] == 6
    assert main(args2[:-4] + ["--init", str(tmp_path / "none.pt")]) == 1  # one-line error, nothing trained
    # a cache from an older version is refused with a message, not silently mixed in
    shard = next((tmp_path / "w.cache").glob("shard_*.npz"))
    old = dict(np.load(shard))
    old["version"] = np.array(cache.CACHE_VERSION - 1)
    np.savez(shard, **old)
    with pytest.raises(FG3DError, match="older version"):
        cache.load_cache(tmp_path / "w.cache")
    # and rebuilt when the photos are given again (only that shard)
    cache.build_cache(REC, list_photos(photos), tmp_path / "w.cache", 64, log=lambda m: None)
    assert len(cache.load_cache(tmp_path / "w.cache")["names"]) == len(data["names"])
