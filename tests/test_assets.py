"""Model assets: manifest vs ../shared/README.md, verification, clear errors, safe loading, known facts."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from fg3d_blender.core import assets
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.pipeline import default_reconstructor  # noqa: E402

REC = default_reconstructor()

REPO = Path(__file__).resolve().parent.parent


def readme_table(shared_dir):
    rows = {}
    for line in (shared_dir / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*models/(\S+)\s*\|\s*(\d+)\s*\|\s*`([0-9a-f]{64})`\s*\|\s*(\S+)\s*\|", line)
        if m:
            rows[m.group(1)] = {"size": int(m.group(2)), "sha256": m.group(3), "url": m.group(4)}
    return rows


def test_manifest_matches_shared_readme(shared_dir):
    table = readme_table(shared_dir)
    man = assets.manifest()
    assert len(table) >= 15
    assert set(man) == set(table)
    for rel, entry in man.items():
        assert entry["size"] == table[rel]["size"], rel
        assert entry["sha256"] == table[rel]["sha256"], rel
        assert entry["url"] == table[rel]["url"], rel
        assert re.search(r"/[0-9a-f]{40}/", entry["url"]), f"{rel}: URL not pinned to a commit"
        assert entry.get("licence"), rel


def test_mirror_files_match_manifest(shared_dir):
    for rel, entry in assets.manifest().items():
        p = shared_dir / "models" / rel
        assert p.stat().st_size == entry["size"], rel
        assert assets.sha256_of(p) == entry["sha256"], rel


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A fresh, empty FG3D_CACHE_DIR and a cleared verification memo (restored afterwards)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FG3D_CACHE_DIR", str(cache))
    monkeypatch.setattr(assets, "_verified", {})
    return cache


def test_missing_asset_gives_one_line_naming_file_and_fix(empty_cache, monkeypatch):
    monkeypatch.delenv("FG3D_ASSET_MIRROR", raising=False)
    with pytest.raises(FG3DError) as e:
        assets.asset_path("beyond3dmm/tri_full.mat")
    msg = str(e.value)
    assert "\n" not in msg
    assert "beyond3dmm/tri_full.mat" in msg and "missing" in msg
    assert "fetch-assets" in msg and "FG3D_ASSET_MIRROR" in msg


def test_asset_is_copied_from_the_mirror_on_first_use(empty_cache, shared_dir):
    p = assets.asset_path("beyond3dmm/keypoints68.mat")
    assert p == empty_cache / "beyond3dmm" / "keypoints68.mat"
    assert assets.sha256_of(p) == assets.manifest()["beyond3dmm/keypoints68.mat"]["sha256"]
    assert not [q for q in p.parent.iterdir() if q.name.endswith(".part")]


def test_corrupt_asset_gives_one_line_naming_file_and_fix(empty_cache, shared_dir):
    rel = "3ddfa_v2/param_mean_std_62d_120x120.pkl"
    dest = empty_cache / rel
    dest.parent.mkdir(parents=True)
    data = bytearray((shared_dir / "models" / rel).read_bytes())
    data[100] ^= 0xFF  # same size, different content
    dest.write_bytes(bytes(data))
    with pytest.raises(FG3DError) as e:
        assets.asset_path(rel)
    msg = str(e.value)
    assert "\n" not in msg and rel in msg and str(dest) in msg
    assert "corrupt" in msg and "delete it" in msg and "fetch-assets" in msg
    dest.write_bytes(b"short")  # a truncated file too
    with pytest.raises(FG3DError, match="corrupt"):
        assets.asset_path(rel)


def test_fetch_assets_from_mirror_installs_every_required_file(empty_cache):
    msgs = []
    n = assets.fetch_assets(progress=msgs.append)
    required = [r for r, e in assets.manifest().items() if e.get("required", True)]
    assert n == len(required) == len(msgs)
    for rel in required:
        assert assets.sha256_of(empty_cache / rel) == assets.manifest()[rel]["sha256"]
    assert not (empty_cache / "eos").exists()  # optional files only on request
    assert assets.fetch_assets() == 0  # idempotent
    leftovers = [p for p in empty_cache.rglob("*") if p.name.endswith(".part")]
    assert not leftovers


def test_corrupt_mirror_is_refused_and_leaves_nothing(empty_cache, tmp_path, shared_dir, monkeypatch):
    rel = "beyond3dmm/keypoints68.mat"
    bad_mirror = tmp_path / "mirror"
    (bad_mirror / "beyond3dmm").mkdir(parents=True)
    data = bytearray((shared_dir / "models" / rel).read_bytes())
    data[-1] ^= 0x55
    (bad_mirror / rel).write_bytes(bytes(data))
    monkeypatch.setenv("FG3D_ASSET_MIRROR", str(bad_mirror))
    with pytest.raises(FG3DError) as e:
        assets.fetch_assets(only=[rel])
    assert rel in str(e.value) and "sha256" in str(e.value)
    assert not list((empty_cache / "beyond3dmm").iterdir())


def test_cli_reports_a_corrupt_asset_in_one_line(tmp_path, shared_dir, cli_env, example_photo):
    """End to end: a corrupt weights file in a temporary cache → exit 1, one stderr line, no output."""
    cache = tmp_path / "cache"
    shutil.copytree(shared_dir / "models", cache, ignore=shutil.ignore_patterns("eos"))
    w = cache / "3ddfa_v2" / "mb05_120x120.pth"
    w.write_bytes(w.read_bytes()[: 1 << 20])
    env = dict(cli_env, FG3D_CACHE_DIR=str(cache))
    env.pop("FG3D_ASSET_MIRROR", None)
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "fg3d_blender", "reconstruct", str(example_photo), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "3ddfa_v2/mb05_120x120.pth" in lines[0] and "corrupt" in lines[0] and "fetch-assets" in lines[0]
    assert "Traceback" not in p.stderr
    assert not out.exists() or not list(out.iterdir())


# ---- safe loading ---------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"a": np.zeros(3), "b": _Evil(marker)}, protocol=4)
    import io

    with pytest.raises(pickle.UnpicklingError, match="system"):
        assets._ArrayOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()
    assert not marker.exists()
    # plain dicts of arrays are admitted
    ok = pickle.dumps({"a": np.arange(4, dtype=np.float32)}, protocol=4)
    got = assets._ArrayOnlyUnpickler(io.BytesIO(ok), encoding="latin1").load()
    np.testing.assert_array_equal(got["a"], np.arange(4))


def test_torch_checkpoint_loading_refuses_code(tmp_path):
    import torch

    from fg3d_blender.core.mobilenet import load_regressor

    marker = tmp_path / "pwned"
    ck = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Evil(marker)}, ck)
    with pytest.raises(FG3DError, match="only plain weight files") as err:
        load_regressor(ck)
    assert "weights_only" not in str(err.value)  # never suggest loading it unsafely
    assert not marker.exists()


def test_every_torch_load_uses_weights_only():
    calls = []
    for py in [p for d in ("fg3d_blender", "training", "benchmarks") for p in (REPO / d).rglob("*.py")]:
        text = py.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth and end < len(text):  # the whole call, over several lines if need be
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((py.name, text[m.start() : end]))
    assert calls, "no torch.load found: the test must be updated"
    for name, call in calls:
        assert re.search(r"weights_only\s*=\s*True", call), f"{name}: {call}"
    assert {name for name, _ in calls} == {"checkpoint.py"}, "every torch.load goes through read_checkpoint"


def test_pickled_assets_load_as_plain_arrays():
    paf = assets.load_pickled_arrays("beyond3dmm/Model_PAF.pkl")
    assert {k: v.shape for k, v in paf.items()} == {
        "mu_filter": (12288, 1),
        "w_filter": (12288, 40),
        "w_exp_filter": (12288, 10),
    }
    stats = assets.load_pickled_arrays("3ddfa_v2/param_mean_std_62d_120x120.pkl")
    assert stats["mean"].shape == (62,) and stats["std"].shape == (62,)
    assert (stats["std"] > 0).all()


# ---- verified facts from ../shared/README.md --------------------------------------------------------


def test_paf_expression_basis_is_a_copy_of_the_first_shape_components():
    paf = assets.load_pickled_arrays("beyond3dmm/Model_PAF.pkl")
    np.testing.assert_array_equal(paf["w_exp_filter"], paf["w_filter"][:, :10])


def test_mean_shape_is_u_shp_plus_u_exp():
    u = np.load(assets.asset_path("beyond3dmm/u_shp.npy")) + np.load(
        assets.asset_path("beyond3dmm/u_exp.npy")
    )
    assert u.shape == (159645, 1)
    vert = sio.loadmat(assets.asset_path("beyond3dmm/mean_shape.mat"))["vertex"]
    assert vert.shape == (3, 53215)
    np.testing.assert_allclose(vert, u.reshape(3, -1, order="F"), rtol=1e-5, atol=1e-2)


def test_topology_uv_and_keypoint_files():
    tri = sio.loadmat(assets.asset_path("beyond3dmm/tri_full.mat"))["tri_full"]
    assert tri.shape == (3, 105954) and tri.min() == 0 and tri.max() == 53214
    uv = sio.loadmat(assets.asset_path("beyond3dmm/BFM_UV.mat"))["UV"]
    assert uv.shape == (53215, 2) and uv.min() >= 0 and uv.max() <= 1
    kp = sio.loadmat(assets.asset_path("beyond3dmm/keypoints68.mat"))["keypoints"].ravel()
    assert kp.size == 68 and kp.min() >= 1 and kp.max() <= 53215 and len(set(kp.tolist())) == 68


def test_face_model_is_in_millimetres_with_outward_normals(shared_dir):
    fm = REC.face_model
    assert fm.mean_mm.shape == (53215, 3) and fm.triangles.shape == (105954, 3)
    width = np.linalg.norm(fm.mean_mm[fm.keypoints[0]] - fm.mean_mm[fm.keypoints[16]])
    assert 120 < width < 170  # jaw-to-jaw, mm
    nose = fm.mean_mm[fm.keypoints[30]]
    assert nose[2] > fm.mean_mm[fm.keypoints[0], 2] + 30  # nose toward +z (the viewer)
    assert fm.mean_mm[fm.keypoints[27], 1] > fm.mean_mm[fm.keypoints[8], 1]  # y up: nose bridge above chin
    from fg3d_blender.core.render import vertex_normals

    n = vertex_normals(fm.mean_mm, fm.triangles)
    assert n[fm.keypoints[30], 2] > 0.7  # nose tip normal faces the viewer
    # the grid→full interpolation carries the basis: decoding the grid mean offset stays close
    assert fm.basis_um.shape == (53215, 3, 40)
