"""The expression model carried from ICT-FaceKit onto the BFM mesh, and the fit that uses it.

Real data throughout: the shipped ``models/bfm_expressions_ict.npz``, ICT-FaceKit's light-stage modes in
``../shared/ict_facekit``, and London Set portraits of the same people neutral and smiling.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from fg3d_blender.core.export import write_glb, write_npz
from fg3d_blender.core.geometry import closest_points_on_mesh, similarity_align, uniform_laplacian
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import default_reconstructor
from training import expressions as build

REC = default_reconstructor()


@pytest.fixture(scope="module")
def fm():
    return REC.face_model


@pytest.fixture(scope="module")
def ict_dir(shared_dir):
    return shared_dir / "ict_facekit"


def mode(fm, name):
    ex = fm.expressions
    return ex.modes[ex.names.index(name)]


def test_shipped_modes_are_the_53_arkit_blendshapes(fm, ict_dir):
    ex = fm.expressions
    assert ex is not None, "models/bfm_expressions_ict.npz is not installed"
    names = json.loads((ict_dir / "vertex_indices.json").read_text())["expressions"]
    assert ex.names == names and len(names) == 53
    assert ex.modes.shape == (53, len(fm.mean_mm), 3) and np.isfinite(ex.modes).all()
    peak = np.abs(ex.modes).max(axis=(1, 2))
    assert (peak > 1.0).all() and (peak < 60.0).all()  # every mode moves something, none explodes


def test_registered_ict_neutral_lies_on_the_bfm_mean(fm, ict_dir):
    ict = build.load_ict(ict_dir)
    reg = build.register(ict, fm)
    region = fm.face_region
    d, _, _ = closest_points_on_mesh(fm.mean_mm[region], reg["registered"], ict.triangles)
    before, _, _ = closest_points_on_mesh(fm.mean_mm[region], reg["aligned"], ict.triangles)
    assert np.median(d) < 0.1 and np.percentile(d, 95) < 0.5  # card: median 0.03, p95 0.2
    assert np.median(before) > 5 * np.median(d)  # the similarity alone is far off: the ICP did the work


def _kp(fm, name, i):
    return mode(fm, name)[fm.keypoints[i]]


def test_jaw_open_moves_the_chin_and_lower_lip_down(fm):
    chin, upper, lower = (_kp(fm, "jawOpen", i) for i in (8, 51, 57))
    assert chin[1] < -10 and lower[1] < -10
    assert abs(upper[1]) < 0.25 * abs(lower[1])
    forehead = mode(fm, "jawOpen")[fm.keypoints[27]]
    assert np.linalg.norm(forehead) < 0.5


def test_smile_lifts_its_own_mouth_corner(fm):
    # BFM x points to the subject's left: landmark 54 is the left corner, 48 the right
    assert fm.mean_mm[fm.keypoints[54], 0] > 0 > fm.mean_mm[fm.keypoints[48], 0]
    for name, own, other in (("mouthSmile_L", 54, 48), ("mouthSmile_R", 48, 54)):
        assert _kp(fm, name, own)[1] > 4.0
        assert np.linalg.norm(_kp(fm, name, other)) < 0.5


def test_blink_closes_its_own_upper_lid(fm):
    for name, own, other in (("eyeBlink_L", (43, 44), (37, 38)), ("eyeBlink_R", (37, 38), (43, 44))):
        for i in own:
            assert _kp(fm, name, i)[1] < -4.0
        for i in other:
            assert np.linalg.norm(_kp(fm, name, i)) < 0.5
        lower = (47, 46) if own[0] == 43 else (41, 40)
        for i in lower:
            assert abs(_kp(fm, name, i)[1]) < 0.5 * abs(_kp(fm, name, own[0])[1])


def test_brow_inner_up_raises_its_own_inner_brow(fm):
    for name, own, other in (("browInnerUp_L", 22, 21), ("browInnerUp_R", 21, 22)):
        assert _kp(fm, name, own)[1] > 3.0
        assert abs(_kp(fm, name, other)[1]) < 0.5


def _edge_jumps(fm, m):
    e = np.concatenate([fm.triangles[:, [0, 1]], fm.triangles[:, [1, 2]]])
    return np.linalg.norm(m[e[:, 0]] - m[e[:, 1]], axis=1)


def test_carried_modes_are_smooth_on_the_mesh(fm, ict_dir):
    """The smooth fit removes the folds of the closest-point transfer (at the lip corners and lids)."""
    ict = build.load_ict(ict_dir)
    reg = build.register(ict, fm)
    tr = build.transfer(ict, reg, fm)
    k = fm.expressions.names.index("jawOpen")
    raw = _edge_jumps(fm, tr["raw"][k])
    smooth = _edge_jumps(fm, tr["modes"][k])
    assert np.percentile(smooth, 99.9) < 0.6 * np.percentile(raw, 99.9)
    assert smooth.max() < 0.5 * raw.max()
    # the lip seam: the open mouth's edge is smooth, not torn into teeth
    lap = uniform_laplacian(len(fm.mean_mm), fm.triangles)
    lips = build.seam_band(fm.mean_mm, fm.mean_mm[fm.keypoints]) & (
        fm.mean_mm[:, 1] < fm.mean_mm[fm.keypoints[33], 1]
    )
    teeth_raw = np.percentile(np.linalg.norm(lap @ tr["raw"][k], axis=1)[lips], 95)
    teeth = np.percentile(np.linalg.norm(lap @ tr["modes"][k], axis=1)[lips], 95)
    assert teeth < 0.5 * teeth_raw, (teeth, teeth_raw)
    shipped = fm.expressions.modes
    assert np.abs(shipped - tr["modes"]).max() < 0.01  # the shipped file is this build (int16 steps)


@pytest.fixture(scope="module")
def london_pairs(photos_dir):
    root = photos_dir / "london_faces"
    out = []
    for person in ("001", "002", "004", "005", "007", "008"):
        pair = []
        for kind in ("03_neutral", "08_smiling"):
            image = load_image(root / f"{person}_{kind}.jpg")
            pair.append((image, REC.faces(image)[0].landmarks))
        out.append(pair)
    return out


@pytest.mark.slow
def test_a_smile_is_explained_by_expression_not_identity(fm, london_pairs):
    """Same person, neutral and smiling: the smile weights rise, the identity stays put."""
    smile = [fm.expressions.names.index(n) for n in ("mouthSmile_L", "mouthSmile_R")]
    gains, ident = [], []
    for (a, la), (b, lb) in london_pairs:
        fa, fb = REC.fit(a, la), REC.fit(b, lb)
        gains.append(fb.expression[smile].sum() - fa.expression[smile].sum())
        va = fm.shape_mm(fa.params[12:52])[fm.face_region]
        vb = fm.shape_mm(fb.params[12:52])[fm.face_region]
        ident.append(np.linalg.norm(similarity_align(vb, va) - va, axis=1).mean())
        np.testing.assert_allclose(fa.vertices, fm.face_vertices(fa.params[12:52], fa.expression), atol=1e-4)
    assert (
        np.mean(gains) > 0.1 and np.mean(np.array(gains) > 0) >= 2 / 3
    )  # the sparse fit leaves faint smiles
    assert np.mean(ident) < 1.2  # identity-only refit: 2.1 mm on these London pairs


@pytest.mark.slow
def test_a_neutral_face_in_profile_gets_less_expression_than_without_the_profile_sparsity(fm, photos_dir):
    """FRGC 02463d453 is neutral at every pose.  In profile the landmark head's pose-dependent errors
    were explained by jawOpen and mouthRollUpper; the yaw-grown L1 weight removes most of that, and
    leaves frontal fits as they were (its factor is ~1 there)."""
    from dataclasses import replace

    from fg3d_blender.core import morphable

    flat = replace(morphable.DEFAULT_PRIORS, profile=0.0)
    profile, flat_profile = [], []
    for p in sorted((photos_dir / "frgc_multipose").glob("*.jpg")):
        image = load_image(p)
        lm = REC.faces(image)[0].landmarks
        fit = REC.fit(image, lm)
        before = morphable.fit_3dmm(image, lm, fm, REC.regressor, priors=flat)
        if abs(fit.pose_degrees["yaw"]) > 60:
            profile.append(fit.expression.sum())
            flat_profile.append(before.expression.sum())
        elif abs(fit.pose_degrees["yaw"]) < 5:
            np.testing.assert_allclose(fit.expression, before.expression, atol=0.01)
    assert len(profile) >= 4
    print("profile expression sums", np.round(profile, 3), "without", np.round(flat_profile, 3))
    assert np.mean(profile) < 0.6 * np.mean(flat_profile)
    assert morphable.DEFAULT_PRIORS.sparsity_at(0) == morphable.DEFAULT_PRIORS.sparsity
    assert morphable.DEFAULT_PRIORS.sparsity_at(-75) > 4 * morphable.DEFAULT_PRIORS.sparsity


def _glb_json(path):
    data = path.read_bytes()
    n = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20 : 20 + n]), data[20 + n + 8 :]


def _accessor(js, binary, i, comps):
    a = js["accessors"][i]
    out = np.zeros((a["count"], comps), np.float32)
    if "bufferView" in a:
        v = js["bufferViews"][a["bufferView"]]
        out[:] = np.frombuffer(binary, "<f4", a["count"] * comps, v["byteOffset"]).reshape(-1, comps)
    if "sparse" in a:
        s = a["sparse"]
        iv, vv = js["bufferViews"][s["indices"]["bufferView"]], js["bufferViews"][s["values"]["bufferView"]]
        rows = np.frombuffer(binary, "<u4", s["count"], iv["byteOffset"])
        out[rows] = np.frombuffer(binary, "<f4", s["count"] * comps, vv["byteOffset"]).reshape(-1, comps)
    return out


@pytest.mark.slow
def test_glb_carries_the_blendshapes_as_named_morph_targets(tmp_path, photos_dir, fm):
    result = REC.reconstruct(photos_dir / "london_faces" / "002_08_smiling.jpg")
    write_glb(str(tmp_path / "f.glb"), result)
    js, binary = _glb_json(tmp_path / "f.glb")
    mesh = js["meshes"][0]
    assert mesh["extras"]["targetNames"] == fm.expressions.names
    prim = mesh["primitives"][0]
    assert len(prim["targets"]) == 53 and len(mesh["weights"]) == 53
    shown = _accessor(js, binary, prim["attributes"]["POSITION"], 3)
    for w, t in zip(mesh["weights"], prim["targets"]):
        shown = shown + w * _accessor(js, binary, t["POSITION"], 3)
    # what a glTF viewer shows (base + Σ weight·target) is the reconstructed, expressive face
    assert np.abs(shown * 1000.0 - result.vertices).max() < 0.05
    assert sum(mesh["weights"]) > 0.1
    write_npz(str(tmp_path / "f.npz"), result)
    with np.load(tmp_path / "f.npz") as z:
        assert list(z["expression_names"]) == fm.expressions.names
        np.testing.assert_allclose(z["expression_weights"], result.expression_weights)
        np.testing.assert_allclose(
            z["vertices_neutral"] + fm.expressions.apply(z["expression_weights"]),
            result.vertices_coarse,
            atol=1e-3,
        )
