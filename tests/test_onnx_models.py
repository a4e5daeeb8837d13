"""Inference on onnxruntime: the committed weight-less graphs are what ``export-onnx`` writes, the
torch-free weight reader reads what torch reads, onnxruntime's outputs equal torch's on real photos, and a
whole reconstruction runs without importing torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fg3d_blender.core import assets, detect, onnx_models, pth_reader
from fg3d_blender.core.checkpoint import read_checkpoint
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.fgnet import FGNet
from fg3d_blender.core.fgnet_inputs import fgnet_inputs
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.mobilenet import MobileNetV1
from fg3d_blender.core.morphable import crop_resize, regress, roi_from_landmarks
from fg3d_blender.core.pipeline import Options, Reconstructor
from fg3d_blender.core.refine import FGNetRefiner
from training.onnx_export import fgnet_graph, graph_bytes, regressor_graph

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PHOTOS = [
    SHARED / "photos" / "fg3d_examples" / name
    for name in ("AFW_1814664578_2_0.jpg", "HELEN_1238081332_1_0.jpg", "02463d453_-3_13.jpg")
]
REGRESSOR_PTH = "3ddfa_v2/mb05_120x120.pth"
NET_TOL = 1e-5  # onnxruntime vs torch, raw network outputs (whitened params, landmark head, mm)
MESH_TOL_MM = 1e-3  # the whole pipeline's vertices, onnxruntime vs torch (measured: 4e-5 mm)


def _graph_file(role: str) -> Path:
    return Path(assets.bundled(role)["file"])


# ---- the graphs ----------------------------------------------------------------------------------


def test_committed_graphs_are_what_the_export_writes():
    """``models/*.onnx`` are reproduced byte for byte by ``export-onnx``'s code (and the manifest's sha256
    is checked by ``assets.bundled``)."""
    fg = assets.bundled("fgnet")
    width, paf_k = fg["meta"]["width"], fg["meta"]["paf_k"]
    reg = _graph_file(onnx_models.REGRESSOR_GRAPH_ROLE)
    assert reg.read_bytes() == graph_bytes(regressor_graph(MobileNetV1()))
    fgn = _graph_file(onnx_models.FGNET_GRAPH_ROLE)
    assert fgn.read_bytes() == graph_bytes(fgnet_graph(FGNet(width=width, paf_k=paf_k), f"fgnet_w{width}.pt"))


@pytest.mark.parametrize("role", [onnx_models.REGRESSOR_GRAPH_ROLE, onnx_models.FGNET_GRAPH_ROLE])
def test_graphs_hold_no_weights(role):
    """Every float tensor of a committed graph is external data (supplied at load from the weight file):
    no number of the BFM-bound regressor weights, nor of ours, is in the repository's .onnx files."""
    path = _graph_file(role)
    model = onnx.load(str(path), load_external_data=False)
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert floats and all(t.data_location == onnx.TensorProto.EXTERNAL for t in floats)
    assert not any(t.raw_data or t.float_data for t in floats)
    inline = [t for t in model.graph.initializer if t.data_type != onnx.TensorProto.FLOAT]
    assert all(t.data_type == onnx.TensorProto.INT64 and np.prod(t.dims) <= 8 for t in inline)  # pads
    assert path.stat().st_size < 100_000


def test_exported_graph_of_another_fgnet_equals_torch(tmp_path):
    """The export follows the modules: a width-4 FGNet with non-trivial BatchNorm statistics."""
    torch.manual_seed(3)
    net = FGNet(width=4)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    weights = {k: v.numpy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    graph = tmp_path / "g.onnx"
    graph.write_bytes(graph_bytes(fgnet_graph(net, "w.pt")))
    model = onnx_models.FGNetModel(graph, weights, width=4)
    rng = np.random.default_rng(0)
    x = (rng.random((1, 3, 192, 192)), rng.random((1, 1, 64, 64)), rng.random((1, 3, 64, 64)))
    x = [a.astype(np.float32) for a in x]
    np.testing.assert_allclose(model.predict(*x), net.predict(*x), rtol=0, atol=NET_TOL)


def test_importing_the_pipeline_and_the_cli_imports_no_torch(cli_env):
    """Static half of the no-torch check (fast): the shipped modules import neither torch nor onnx."""
    code = (
        "import sys, fg3d_blender.core.pipeline, fg3d_blender.cli, fg3d_blender.core.onnx_models;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'training', 'benchmarks'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---- the weight files, read without torch --------------------------------------------------------


@pytest.mark.parametrize("which", ["regressor (legacy format)", "fgnet (zip format, fp16)"])
def test_weight_reader_reads_what_torch_reads(which):
    path = (
        assets.asset_path(REGRESSOR_PTH) if which.startswith("regressor") else assets.bundled("fgnet")["file"]
    )
    ours, theirs = pth_reader.read_weights(path), read_checkpoint(path)
    assert {k: v for k, v in ours.items() if k != "state_dict"} == {
        k: v for k, v in theirs.items() if k != "state_dict"
    }
    assert list(ours["state_dict"]) == list(theirs["state_dict"])
    for k, t in theirs["state_dict"].items():
        a = ours["state_dict"][k]
        assert a.dtype == t.numpy().dtype and a.shape == tuple(t.shape) and np.array_equal(a, t.numpy()), k


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_weight_reader_refuses_code_and_damage_in_one_line(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": {"x": torch.zeros(2)}, "hook": _Evil(marker)},
        evil,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(FG3DError, match="could run code") as err:
        pth_reader.read_weights(evil, "test weights")
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    good = tmp_path / "good.pth"
    torch.save(
        {"state_dict": {"x": torch.arange(6.0).reshape(2, 3).t()}},
        good,
        _use_new_zipfile_serialization=zip_format,
    )
    np.testing.assert_array_equal(
        pth_reader.read_weights(good)["state_dict"]["x"], np.arange(6.0).reshape(2, 3).T
    )
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 9):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(FG3DError, match="not a PyTorch test weights") as err:
            pth_reader.read_weights(tmp_path / "cut.pth", "test weights")
        assert "\n" not in str(err.value)
    with pytest.raises(FG3DError, match="no such"):
        pth_reader.read_weights(tmp_path / "missing.pth", "test weights")


# ---- damaged or mismatched files at load -----------------------------------------------------------


def test_a_damaged_graph_or_mismatched_weights_is_one_line(tmp_path, monkeypatch):
    models = tmp_path / "fg3d_blender" / "models"
    shutil.copytree(REPO / "models", models)
    monkeypatch.setattr(assets, "_PACKAGE_DIR", models.parent)
    graph = models / assets.bundled(onnx_models.FGNET_GRAPH_ROLE)["path"]
    original = graph.read_bytes()
    graph.write_bytes(original[:-100] + b"\0" * 100)
    with pytest.raises(FG3DError, match="corrupt"):
        onnx_models.FGNetModel.load(assets.bundled("fgnet"))
    graph.write_bytes(original)
    # weights that do not fit the graph (a tensor missing): one line naming the graph
    weights = pth_reader.state_arrays(pth_reader.read_weights(assets.bundled("fgnet")["file"]), "", "FGNet")
    weights.pop("output_conv.0.bias")
    with pytest.raises(FG3DError, match="could not be built") as err:
        onnx_models.FGNetModel(graph, weights, width=8)
    assert str(graph) in str(err.value) and "\n" not in str(err.value)
    # an FGNet of another width than the graph's
    entry = dict(assets.bundled("fgnet"))
    entry["meta"] = dict(entry["meta"], width=16)
    with pytest.raises(FG3DError, match="export-onnx"):
        onnx_models.FGNetModel.load(entry)


# ---- onnxruntime == torch on real photos -----------------------------------------------------------


@pytest.fixture(scope="module")
def backends():
    return Reconstructor(), Reconstructor(backend="torch")


@pytest.mark.slow
@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.stem)
def test_networks_on_onnxruntime_equal_torch_on_real_photos(backends, photo):
    ort_rec, torch_rec = backends
    image = load_image(photo)
    face = detect.select_face(ort_rec.faces(image), None)
    crops = crop_resize(image, roi_from_landmarks(face.landmarks))[None]
    crops = np.concatenate([crops, crops[:, :, ::-1]])
    x = (crops.transpose(0, 3, 1, 2).astype(np.float32) - np.float32(127.5)) / np.float32(128.0)
    for a, b in zip(ort_rec.regressor.predict(x), torch_rec.regressor.predict(x)):
        np.testing.assert_allclose(a, b, rtol=0, atol=NET_TOL)
    fm = ort_rec.face_model
    (p_ort, lm_ort), (p_torch, lm_torch) = (regress(crops[:1], fm, r.regressor) for r in backends)
    np.testing.assert_allclose((p_ort - p_torch) / fm.param_std, 0, atol=NET_TOL)  # in whitened units
    np.testing.assert_allclose(lm_ort, lm_torch, rtol=0, atol=60 * NET_TOL)  # crop px: 60 per head unit
    fit = ort_rec.fit(image, face.landmarks)
    inp = fgnet_inputs(image, fit, ort_rec.face_model, ort_rec.refiner.uv_size, ort_rec.refiner.shape_range)
    d_ort = ort_rec.refiner.net.predict(*inp.arrays())
    d_torch = torch_rec.refiner.net.predict(*inp.arrays())
    assert np.abs(d_torch).max() > 0.1  # a real difference map, mm
    np.testing.assert_allclose(d_ort, d_torch, rtol=0, atol=NET_TOL)
    assert isinstance(ort_rec.refiner, FGNetRefiner) and isinstance(
        ort_rec.refiner.net, onnx_models.FGNetModel
    )


_NO_TORCH = """
import json, sys
import numpy as np
from fg3d_blender.core.pipeline import Options, Reconstructor
assert "torch" not in sys.modules, "importing the pipeline imported torch"
rec = Reconstructor()
out = {}
for refine in (True, False):
    r = rec.reconstruct(sys.argv[1], Options(refine=refine))
    out[f"v{int(refine)}"] = r.vertices
    out[f"t{int(refine)}"] = r.texture
    assert r.refined == refine
np.savez(sys.argv[2], **out)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "scipy"))))
"""


@pytest.mark.slow
def test_reconstruct_runs_without_torch_and_equals_the_torch_pipeline(tmp_path, cli_env, backends):
    """A fresh process reconstructs (refined and coarse) with torch never imported, nor scipy once the
    derived files exist (the ``backends`` fixture made them); its meshes equal the torch pipeline's
    within ``MESH_TOL_MM`` and its textures differ on < 0.1 % of the texels, by one level (two on a few
    texel channels: the texture's quarter-size weights are upsampled and rounded to uint8, measured 1 of
    3.1 M)."""
    photo = PHOTOS[0]
    out = tmp_path / "mesh.npz"
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(photo), str(out)],
        cwd=REPO,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    got = np.load(out)
    torch_rec = backends[1]
    for refine in (True, False):
        ref = torch_rec.reconstruct(photo, Options(refine=refine))
        assert np.abs(got[f"v{int(refine)}"] - ref.vertices).max() < MESH_TOL_MM
        tex = np.abs(got[f"t{int(refine)}"].astype(int) - ref.texture.astype(int))
        assert tex.max() <= 2 and (tex > 1).mean() < 1e-5 and (tex > 0).mean() < 1e-3
