"""Batches for training: the network's inputs, built by ``fgnet_inputs`` exactly as the pipeline builds
them (the one FGNet input contract), and the loss targets, as torch tensors."""

from __future__ import annotations

import numpy as np
import torch

from fg3d_blender.core.fgnet_inputs import FGNetInputs, fgnet_inputs, load_shape_range
from fg3d_blender.core.morphable import FaceModel

from .cache import cached_fit

# landmark target → (cache key, weight of the 17 jaw points).  The regressor's landmark head was trained
# on 3DMM-fitted landmarks, whose jaw points are fixed vertices; dlib's jaw points lie on the silhouette.
# On AFLW2000-3D the head is far more accurate (239 photos with a HOG face: 3.25 % vs dlib's 8.1 %).
LANDMARK_TARGETS = {"head": ("head_landmarks", 1.0), "dlib": ("landmarks", 0.5)}


def shape_basis(fm: FaceModel) -> np.ndarray:
    """(N,3,40+K) mm per unit coefficient: the identity basis, then the expression modes (if any)."""
    basis = fm.basis_um / 1000.0
    if fm.expressions is not None:
        basis = np.concatenate([basis, fm.expressions.modes.transpose(1, 2, 0)], 2)
    return basis.astype(np.float32)


def coefficients(data: dict, i: int) -> np.ndarray:
    """Record ``i``'s shape coefficients in ``shape_basis`` order: identity, then expression."""
    return np.concatenate([data["alpha"][i], data["expression"][i]]).astype(np.float32)


class UVModel:
    """Mean and shape basis (identity, expression) of the BFM as UV maps at ``size`` (mm), keypoint UVs,
    layout mask."""

    def __init__(self, fm: FaceModel, size: int):
        self.size = size
        n = len(fm.mean_mm)
        attrs = np.concatenate([fm.mean_mm, shape_basis(fm).reshape(n, -1)], 1).astype(np.float32)
        m = fm.to_uv(attrs, size)
        self.mean = m[:, :, :3].copy()  # (S,S,3)
        self.basis = m[:, :, 3:].reshape(size, size, 3, -1).copy()  # (S,S,3,40+K)
        self.layout = fm.uv_raster(size).mask
        self.kp_uv = fm.uvs[fm.keypoints].astype(np.float32)  # (68,2)
        self.keypoints = fm.keypoints

    def positions(self, coef: np.ndarray) -> np.ndarray:
        return self.mean + self.basis[:, :, :, : len(coef)] @ coef.astype(np.float32)


def _tensor(arrays, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).to(device)


class Batcher:
    """Cached photos → the network's inputs and the loss targets (a dict of tensors per batch)."""

    def __init__(self, fm: FaceModel, data: dict, size: int, device, target: str = "head"):
        self.fm, self.d, self.size, self.device = fm, data, size, device
        self.target = target
        self.lm_key = LANDMARK_TARGETS[target][0]
        self.uvm = UVModel(fm, size)
        self.shape_range = load_shape_range()
        self.kp_mean = fm.mean_mm[fm.keypoints].astype(np.float32)  # (68,3)
        self.kp_basis = fm.keypoint_basis.astype(np.float32)  # (68,3,40+K)

    def keypoint_positions(self, coef: np.ndarray) -> np.ndarray:
        return self.kp_mean + self.kp_basis[:, :, : len(coef)] @ coef

    def inputs(self, i: int) -> FGNetInputs:
        """Record ``i``'s FGNet inputs: ``fgnet_inputs`` of its photo and cached fit."""
        return fgnet_inputs(
            self.d["images"][i], cached_fit(self.fm, self.d, i), self.fm, self.size, self.shape_range
        )

    def batch(self, idx):
        d, dev = self.d, self.device
        parts = [self.inputs(i) for i in idx]
        b = {
            "paf": _tensor([p.paf.transpose(2, 0, 1) for p in parts], dev),
            "vis": _tensor([p.visibility[None] for p in parts], dev),
            "shape": _tensor([p.shape.transpose(2, 0, 1) for p in parts], dev),
            "p0": _tensor([self.uvm.positions(coefficients(d, i)) for i in idx], dev),
            "image": _tensor(
                [d["images"][i][:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255 for i in idx], dev
            ),
            "A": _tensor([d["A"][i] for i in idx], dev),
            "b": _tensor([d["b"][i] for i in idx], dev),
            "rot": _tensor([d["rot"][i] for i in idx], dev),
            "lm": _tensor([d[self.lm_key][i] for i in idx], dev),
            "albedo": _tensor([d["albedo"][i].astype(np.float32) for i in idx], dev),
            "light": _tensor([d["light"][i] for i in idx], dev),
            "kp0": _tensor([self.keypoint_positions(coefficients(d, i)) for i in idx], dev),
        }
        if "target" in d:
            b["target"] = _tensor([d["target"][i] for i in idx], dev)
        return b
