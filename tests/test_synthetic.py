"""Our own FG3D (``training.synthetic``): ICT-FaceKit's light-stage identities carried onto the BFM mesh,
rendered with real photos' textures and lighting, and run through the pipeline's own detection and coarse
fit; and ``train-fgnet --synthetic`` end to end on real photos and the real ICT data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fg3d_blender.cli import main
from fg3d_blender.core.geometry import similarity_align
from fg3d_blender.core.image_io import list_photos
from fg3d_blender.core.pipeline import default_reconstructor
from training import cache, synthetic
from training.batches import Batcher
from training.expressions import load_ict
from training.losses import Losses, similarity_onto
from training.views import render_record

pytestmark = pytest.mark.slow  # real photos through the pipeline, ICT's registration, training (~2.5 min)

REC = default_reconstructor()
SHARED = Path(__file__).resolve().parents[2] / "shared"
ICT = SHARED / "ict_facekit"
UV = 64


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A training cache of 12 real UTKFace photos (3 held out; UV 64) with the ICT identity modes."""
    root = tmp_path_factory.mktemp("synthetic")
    photos = root / "photos"
    photos.mkdir()
    every = sorted((SHARED / "training" / "utkface").iterdir())
    held = [p for p in every if cache.is_holdout(p.name)][:3]  # held-out photos for the held-out draws
    for p in every[:9] + held:
        shutil.copyfile(p, photos / p.name)
    cache.build_cache(REC, list_photos(photos), root / "w.cache", UV, log=lambda m: None)
    modes = synthetic.identity_modes(ICT, REC.face_model, root / "w.cache", log=lambda m: None)
    return {"root": root, "photos": photos, "cache": root / "w.cache", "modes": modes}


def test_identity_modes_carry_ict_identities_onto_the_bfm(work):
    fm, modes = REC.face_model, work["modes"]
    assert modes.shape == (100, len(fm.mean_mm), 3) and np.isfinite(modes).all()
    # the first (largest) identity mode moves the face by millimetres, the last ones by much less, as in ICT
    rms = np.sqrt((modes[:, fm.face_region] ** 2).sum(-1).mean(-1))
    assert 1.0 < rms[0] < 10.0 and rms[-10:].max() < rms[0] / 3
    # the same displacement as ICT's own at the nose tip, scaled from cm to mm (the similarity's scale)
    ict = load_ict(ICT, kind="identity")
    assert ict.modes.shape[0] == 100 and ict.names[0] == "identity000"
    ict_tip = np.linalg.norm(ict.modes[:3, ict.landmarks[30]], axis=-1) * 10.0
    bfm_tip = np.linalg.norm(modes[:3, fm.keypoints[30]], axis=-1)
    assert np.allclose(bfm_tip, ict_tip, rtol=0.35, atol=0.3)
    # made once: the second call reads the file
    again = synthetic.identity_modes(ICT, fm, work["cache"], log=lambda m: pytest.fail("rebuilt"))
    assert np.array_equal(again, modes)


def test_a_draw_renders_deterministically_and_its_truth_is_the_drawn_shape(work):
    fm, modes = REC.face_model, work["modes"]
    data = cache.load_cache(work["cache"])
    pool = np.arange(len(data["names"]))
    d = synthetic.draw(np.random.default_rng(5), pool, len(modes))
    d.yaw, d.pitch, d.roll, d.blur = 10.0, 5.0, 0.0, 0.0
    img, drawn = synthetic.render_draw(fm, modes, data, d)
    img2, _ = synthetic.render_draw(fm, modes, data, d)
    assert img.shape == data["images"].shape[1:] and img.dtype == np.uint8 and np.array_equal(img, img2)
    # the drawn vertices are the true shape (identity beyond the 3DMM + a real expression) under a
    # similarity (and the image's y flip): nothing else changes the shape
    truth = synthetic.true_shape(fm, modes, data, d)
    flipped = truth.astype(np.float64) * [1.0, -1.0, 1.0]
    assert np.abs(similarity_align(flipped, drawn) - drawn).max() < 1e-2
    beyond = truth - fm.with_expression(
        fm.shape_mm(data["alpha"][d.shape_of]), data["expression"][d.expression_of]
    )
    assert np.sqrt((beyond[fm.face_region] ** 2).sum(-1).mean()) > 0.5  # mm beyond the 3DMM space
    rec = render_record(REC, img, drawn, UV, REC.refiner.shape_range)
    assert rec is not None  # a near-frontal render: the pipeline finds the face
    assert np.abs(rec["head_landmarks"] - drawn[fm.keypoints, :2]).max() < 1e-3
    # held-out draws take their photos only from the pool they are given
    held = np.array([1, 3])
    for k in range(5):
        h = synthetic.held_draw(k, held, len(modes))
        used = {h.shape_of, h.expression_of, h.texture_of, h.light_of, h.background_of, h.frame_of}
        assert used <= {1, 3}


def test_train_fgnet_with_synthetic_faces(work):
    root = work["root"]
    out = root / "s.pt"
    args = [
        "train-fgnet",
        "--photos",
        str(work["photos"]),
        "--out",
        str(out),
        "--cache",
        str(work["cache"]),
        "--steps",
        "1",
        "--batch",
        "2",
        "--width",
        "4",
        "--uv-size",
        str(UV),
        "--eval-every",
        "0",
        "--synthetic",
        "8",
        "--synthetic-per-batch",
        "2",
        "--ict",
        str(ICT),
    ]
    assert main(args) == 0
    folder = work["cache"] / "synthetic"
    shards = sorted(folder.glob("synth_*.npz"))
    data = cache.load_cache(folder, "synth_*.npz")
    names = [str(n) for n in data["names"]]
    counts = synthetic.miss_counts(folder)
    assert (
        counts["draws"] == 9 and counts["draws"] - counts["missed"] == len(names) >= 6
    )  # 8 + max(1, 8 // 20) held
    assert all(n.startswith("synth_") for n in names) and any(synthetic.is_held(n) for n in names)
    assert data["target"].shape[1:] == (UV, UV, 3)
    # the coarse fit misses the drawn face by a plausible amount (mm, after similarity alignment)
    fm = REC.face_model
    batcher = Batcher(fm, data, UV, torch.device("cpu"))
    losses = Losses(fm, batcher.uvm, torch.device("cpu"))
    b = batcher.batch(np.arange(len(names)))
    zero = torch.zeros_like(b["shape"])
    err = losses.shape_error_mm(zero, b).numpy()
    assert np.isfinite(err).all() and 0.5 < err.mean() < 10.0
    # the training loss (face region, across the surface, after the best similarity): plausible, 0 for
    # a refinement that lands on the truth, and a smaller (or larger) face gains nothing
    surface = losses.surface_error_mm(zero, b).numpy()
    assert np.isfinite(surface).all() and 0.1 < surface.mean() < 10.0
    exact = torch.einsum("bhwj,bij->bhwi", b["target"] - b["b"].view(-1, 1, 1, 3), torch.linalg.inv(b["A"]))
    assert losses.surface_error_mm((exact - b["p0"]).permute(0, 3, 1, 2), b).max() < 0.01
    centre = b["p0"].mean((1, 2), keepdim=True)
    for factor in (0.8, 1.25):
        resized = ((b["p0"] - centre) * (factor - 1)).permute(0, 3, 1, 2)
        assert np.allclose(losses.surface_error_mm(resized, b).numpy(), surface, rtol=1e-3, atol=1e-4)
    # the similarity is Umeyama's: numpy's similarity_align on the points repeated by their (integer)
    # weights, for a random turn, scale and shift of a noisy copy
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.linalg.det(q))
    truth = b["target"][:1].numpy().astype(np.float64)
    src = 1.3 * truth @ q.T + [5.0, -3.0, 2.0]
    dst = truth + rng.normal(0, 0.5, truth.shape)
    sel = losses.face.numpy() > 0
    reps = rng.integers(1, 4, int(sel.sum()))
    w = np.zeros(sel.shape, np.float32)
    w[sel] = reps
    ours = similarity_onto(torch.from_numpy(src).float(), torch.from_numpy(dst).float(), torch.from_numpy(w))
    ref = similarity_align(np.repeat(src[0][sel], reps, 0), np.repeat(dst[0][sel], reps, 0))
    first = np.concatenate([[0], np.cumsum(reps)[:-1]])
    assert np.abs(ours[0].numpy()[sel] - ref[first]).max() < 1e-2
    ck = torch.load(out, weights_only=True)
    assert ck["synthetic"] == 8 and "synthetic_shape_mm_refined" in json.loads(ck["heldout"])
    # resumed: the finished shards are kept, not rebuilt
    stamp = [s.stat().st_mtime_ns for s in shards]
    assert main(args) == 0
    assert [s.stat().st_mtime_ns for s in shards] == stamp
    # without ICT's folder: one line, nothing trained
    assert main(args[:-2]) == 1
    assert main(args[:-1] + [str(root / "nowhere")]) == 1


def test_bench_synthetic_reconstructs_held_out_draws(work, capsys):
    """``bench synthetic`` on held-out draws through the product (detection, fit, FGNet): the numbers it
    prints and the figure rows it writes."""
    fig = work["root"] / "fig.png"
    args = ["bench", "synthetic", "--cache", str(work["cache"]), "--n", "3", "--lighting-pairs", "1"]
    assert main(args + ["--figure", str(fig), "--figure-rows", "1", "--ict", str(ICT), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] + out["n_missed"] == 3 and out["n"] >= 1
    assert 0.3 < out["coarse_mm"] < 10.0 and 0.3 < out["refined_mm"] < 10.0
    assert out["detail_mm"] > 0 and (
        out["detail_lighting_corr"] is None or -1 <= out["detail_lighting_corr"] <= 1
    )
    img = cv2.imread(str(fig))
    assert img is not None and img.shape[1] == 6 * img.shape[0]  # one row of six panels
