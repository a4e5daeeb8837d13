"""Stage 3 — 3DMM fit: crop the face, regress pose + shape, decode the dense BFM mesh.

The regressor predicts 12 pose + 40 shape + 10 expression parameters in the Basel Face Model space of
the 4096-point PAF grid (``Model_PAF.pkl``).  The grid's identity displacement is carried onto the full
BFM mean (53,215 vertices, ``tri_full``, ``BFM_UV``) by fixed inverse-distance weights from each full
vertex to its 4 nearest on-surface grid points.  The 10 expression parameters are kept in ``params``
but not applied: the only expression basis that ships with the assets (``w_exp_filter``) is an exact
copy of the first 10 shape components, so it cannot represent expressions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Optional

import cv2
import numpy as np
import scipy.io as sio
import torch
from scipy.spatial import cKDTree

from . import render
from .assets import asset_path, derived_path, load_pickled_arrays
from .mobilenet import MobileNetV1, load_regressor

CROP_SIZE = 120
GRID_OFF_SURFACE_UM = 2000.0  # grid points farther than this from the BFM surface are padding
GRID_K = 4
# iBUG-68 index of each landmark's left-right mirror partner
MIRROR_68 = np.array(
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
)
REFIT_PRIOR = 1.0  # weight of the regressed shape in the landmark refit (measured on AFLW2000-3D)


class FaceModel:
    """The Basel Face Model data the pipeline needs, in millimetres (BFM files are in micrometres), and
    its UV layout's rasters (one per size, made on first use)."""

    def __init__(self):
        self._uv_rasters: Dict[int, render.Raster] = {}
        paf = load_pickled_arrays("beyond3dmm/Model_PAF.pkl")
        self.grid_mean = paf["mu_filter"].reshape(3, -1, order="F").T.astype(np.float64)  # (4096,3) µm
        w = paf["w_filter"].astype(np.float64)  # (12288, 40)
        self.grid_basis = w.reshape(3, -1, w.shape[1], order="F").transpose(1, 0, 2)  # (4096,3,40) µm
        u = np.load(asset_path("beyond3dmm/u_shp.npy"), allow_pickle=False) + np.load(
            asset_path("beyond3dmm/u_exp.npy"), allow_pickle=False
        )
        self.mean_um = u.reshape(3, -1, order="F").T.astype(np.float64)  # (53215,3)
        self.triangles = np.ascontiguousarray(
            sio.loadmat(asset_path("beyond3dmm/tri_full.mat"))["tri_full"].T.astype(np.int32)
        )
        self._orient_outward()
        self.uvs = sio.loadmat(asset_path("beyond3dmm/BFM_UV.mat"))["UV"].astype(np.float32)
        self.keypoints = (
            sio.loadmat(asset_path("beyond3dmm/keypoints68.mat"))["keypoints"].ravel().astype(np.int64) - 1
        )
        stats = load_pickled_arrays("3ddfa_v2/param_mean_std_62d_120x120.pkl")
        self.param_mean = stats["mean"].astype(np.float32)
        self.param_std = stats["std"].astype(np.float32)
        idx, wts = self._grid_weights()
        # dense identity basis on the full mesh, µm per unit parameter: (N, 3, 40)
        self.basis_um = np.einsum("nk,nkcj->ncj", wts, self.grid_basis[idx]).astype(np.float32)
        self.grid_index, self.grid_weights = idx, wts

    def _orient_outward(self):
        """Make triangle winding counter-clockwise seen from outside, so normals point outward."""
        n = render.vertex_normals(self.mean_um, self.triangles)
        centred = self.mean_um - self.mean_um.mean(0)
        if float(np.sum(n * centred)) < 0:
            self.triangles = np.ascontiguousarray(self.triangles[:, ::-1])

    def _grid_weights(self):
        cache = derived_path("bfm_grid_to_full_v1.npz")
        if cache.is_file():
            with np.load(cache) as z:
                return z["idx"], z["w"]
        dist, _ = cKDTree(self.mean_um).query(self.grid_mean)
        on = np.flatnonzero(dist < GRID_OFF_SURFACE_UM)
        d, j = cKDTree(self.grid_mean[on]).query(self.mean_um, k=GRID_K)
        wts = 1.0 / np.maximum(d, 1.0) ** 2
        wts /= wts.sum(1, keepdims=True)
        idx = on[j].astype(np.int32)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.npz")
        np.savez(tmp, idx=idx, w=wts.astype(np.float64))
        os.replace(tmp, cache)
        return idx, wts

    @cached_property
    def mean_mm(self) -> np.ndarray:
        return (self.mean_um / 1000.0).astype(np.float32)

    def shape_mm(self, alpha_shp: np.ndarray) -> np.ndarray:
        """Identity shape (N,3) in mm for 40 shape parameters."""
        flat = self._basis_flat @ alpha_shp.astype(np.float32)  # one BLAS matrix-vector product
        return (self._mean_um32 + flat.reshape(-1, 3)) * np.float32(1e-3)

    @cached_property
    def _basis_flat(self) -> np.ndarray:
        return self.basis_um.reshape(-1, self.basis_um.shape[2])

    @cached_property
    def _mean_um32(self) -> np.ndarray:
        return self.mean_um.astype(np.float32)

    @cached_property
    def pncc_colors(self) -> np.ndarray:
        """The PNCC code of each vertex (normalised mean-shape coordinates)."""
        return render.pncc_colors(self.mean_mm)

    def uv_raster(self, size: int) -> render.Raster:
        """The UV layout rasterized at size×size (made once per size; callers share it, read-only)."""
        if size not in self._uv_rasters:
            self._uv_rasters[size] = render.uv_raster(self.uvs, self.triangles, size)
        return self._uv_rasters[size]

    def to_uv(self, attrs: np.ndarray, size: int) -> np.ndarray:
        """Per-vertex attributes (N[,C]) → (size,size[,C]) UV map (0 outside the layout)."""
        return render.interpolate(self.uv_raster(size), self.triangles, attrs)

    def from_uv(self, uv_map: np.ndarray) -> np.ndarray:
        """(S,S[,C]) UV map → per-vertex values at each vertex's UV."""
        return render.from_uv(uv_map, self.uvs)


def load_face_regressor() -> MobileNetV1:
    """3DDFA_V2's MobileNet (``mb05_120x120.pth``), verified, in eval mode."""
    return load_regressor(asset_path("3ddfa_v2/mb05_120x120.pth"))


@dataclass
class Fit:
    params: np.ndarray  # (62,) de-whitened: 12 pose (3×4 matrix), 40 shape, 10 expression (unused)
    roi_box: np.ndarray  # (4,) crop box in image pixels of the final pass
    vertices: np.ndarray  # (N,3) float32 identity shape, mm, BFM frame (x right, y up, z to the viewer)
    A: np.ndarray  # (3,3) image_vertices = vertices @ A.T + b  (x col, y row, z toward camera, px)
    b: np.ndarray  # (3,)
    head_landmarks: Optional[np.ndarray] = None  # (68,2) the landmark head's prediction (last pass), image px

    def project(self, vertices: np.ndarray) -> np.ndarray:
        return (vertices @ self.A.T + self.b).astype(np.float32)

    @property
    def rotation(self) -> np.ndarray:
        """Orthonormal head rotation in the BFM frame (y up)."""
        m = np.diag([1.0, -1.0, 1.0]) @ self.A
        u, _, vt = np.linalg.svd(m)
        r = u @ vt
        return r if np.linalg.det(r) > 0 else -r

    @property
    def scale(self) -> float:
        """Pixels per millimetre."""
        return float(np.abs(np.linalg.det(self.A)) ** (1.0 / 3.0))

    @property
    def pose_degrees(self) -> dict:
        """Degrees: yaw (+ = face turned toward the photo's right side), pitch (+ = head tilted down),
        roll (in-plane)."""
        r = self.rotation
        yaw = np.arcsin(np.clip(r[0, 2], -1, 1))
        pitch = np.arctan2(-r[1, 2], r[2, 2])
        roll = np.arctan2(-r[0, 1], r[0, 0])
        return {
            "yaw": float(np.degrees(yaw)),
            "pitch": float(np.degrees(pitch)),
            "roll": float(np.degrees(roll)),
        }


def roi_from_landmarks(pts: np.ndarray) -> np.ndarray:
    """Square crop around 2D points, side = the diagonal of their bounding square (3DDFA_V2's rule)."""
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * np.sqrt(2.0)
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float64)


def crop_resize(image: np.ndarray, roi: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The roi box resampled to size×size (zero outside the photo), in one affine warp."""
    sx = (roi[2] - roi[0]) / size
    sy = (roi[3] - roi[1]) / size
    m = np.array([[1 / sx, 0, -roi[0] / sx], [0, 1 / sy, -roi[1] / sy]], dtype=np.float64)
    flags = cv2.INTER_AREA if sx > 2 else cv2.INTER_LINEAR
    return cv2.warpAffine(image, m, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def regress(crops: np.ndarray, fm: FaceModel, net: MobileNetV1, flip: bool = True):
    """Batch of BGR uint8 crops (B,120,120,3) → (de-whitened parameters (B,62), landmarks (B,68,2)).

    The landmarks come from the regressor's second head (``fc_lm``), in crop pixels: it predicts
    x (68) then y (68), each as c / 60 − 1.  With ``flip`` the mirrored crops run in the same batch
    and their landmarks, mirrored back, are averaged in (lower error on AFLW2000-3D, see README).
    """
    b = len(crops)
    if flip:
        crops = np.concatenate([crops, crops[:, :, ::-1]])
    x = torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2))).float()
    x = (x - 127.5) / 128.0
    with torch.inference_mode():
        feat = net.features(x)
        out = net.fc_param(feat).numpy()
        lm = net.fc_lm(feat).numpy()
    lm = (lm.reshape(-1, 2, 68).transpose(0, 2, 1) + 1.0) * (CROP_SIZE / 2.0)
    if flip:
        mirrored = lm[b:, MIRROR_68].copy()
        mirrored[:, :, 0] = CROP_SIZE - 1 - mirrored[:, :, 0]
        lm = 0.5 * (lm[:b] + mirrored)
    return out[:b] * fm.param_std + fm.param_mean, lm


def decode(params: np.ndarray, roi: np.ndarray, fm: FaceModel) -> Fit:
    p = params[:12].reshape(3, 4).astype(np.float64)
    verts = fm.shape_mm(params[12:52])
    sx = (roi[2] - roi[0]) / CROP_SIZE
    sy = (roi[3] - roi[1]) / CROP_SIZE
    s = (sx + sy) / 2
    A = np.diag([sx, -sy, s]) @ p[:, :3] * 1000.0
    b = np.array([(p[0, 3] - 1) * sx + roi[0], (CROP_SIZE - p[1, 3]) * sy + roi[1], (p[2, 3] - 1) * s])
    return Fit(params=params.astype(np.float32), roi_box=roi.astype(np.float32), vertices=verts, A=A, b=b)


def refit_to_landmarks(
    fit: Fit, landmarks: np.ndarray, fm: FaceModel, prior: float = REFIT_PRIOR, iters: int = 3
) -> Fit:
    """Regularised least-squares refit of the camera and the 40 shape parameters to 68 2D landmarks.

    Alternates (1) a scaled-orthographic camera fitted to the landmarks and (2) the shape parameters
    solved linearly, pulled toward the regressed ones with weight ``prior`` / std² (the regressor's own
    parameter statistics).  On AFLW2000-3D this brings the mesh's landmarks to the regressor's
    landmark-head accuracy (see README).
    """
    basis = fm.basis_um[fm.keypoints].astype(np.float64) / 1000.0  # (68,3,40) mm
    mean = fm.mean_um[fm.keypoints] / 1000.0  # (68,3) mm
    alpha0 = fit.params[12:52].astype(np.float64)
    alpha = alpha0.copy()
    w = prior / fm.param_std[12:52].astype(np.float64) ** 2
    lm = landmarks.astype(np.float64)
    a2 = fit.A[:2]
    b2 = fit.b[:2]
    for _ in range(iters):
        v = mean + basis @ alpha
        sol, *_ = np.linalg.lstsq(np.column_stack([v, np.ones(len(v))]), lm, rcond=None)
        u, sv, vt = np.linalg.svd(sol[:3].T, full_matrices=False)
        a2, b2 = sv.mean() * (u @ vt), sol[3]
        jac = np.einsum("ij,kjl->kil", a2, basis).reshape(-1, basis.shape[2])
        rhs = (lm - b2 - mean @ a2.T).reshape(-1)
        alpha = np.linalg.solve(jac.T @ jac + np.diag(w), jac.T @ rhs + w * alpha0)
    scale = float(np.linalg.norm(a2[0]))
    row3 = np.cross(a2[0], a2[1]) / scale
    if np.dot(row3, fit.A[2]) < 0:
        row3 = -row3
    A = np.vstack([a2, row3])
    params = fit.params.copy()
    params[12:52] = alpha
    return Fit(
        params=params,
        roi_box=fit.roi_box,
        vertices=fm.shape_mm(alpha.astype(np.float32)),
        A=A,
        b=np.array([b2[0], b2[1], fit.b[2]]),
        head_landmarks=fit.head_landmarks,
    )


def fit_3dmm(
    image: np.ndarray,
    landmarks: np.ndarray,
    fm: FaceModel,
    net: MobileNetV1,
    passes: int = 2,
    refit: bool = True,
) -> Fit:
    """Regress the 3DMM from a crop around ``landmarks``; later passes re-crop from the fit's own 68.

    With ``refit`` the camera and shape are then refitted to the regressor's landmark head, whose
    last-pass prediction is kept in ``Fit.head_landmarks`` (FGNet's landmark target in training).
    """
    roi = roi_from_landmarks(landmarks)
    fit = None
    for _ in range(max(1, passes)):
        params, lm = regress(crop_resize(image, roi)[None], fm, net)
        fit = decode(params[0], roi, fm)
        fit.head_landmarks = (lm[0] * ((roi[2] - roi[0]) / CROP_SIZE) + roi[:2]).astype(np.float32)
        if refit:
            fit = refit_to_landmarks(fit, fit.head_landmarks, fm)
        roi = roi_from_landmarks(fit.project(fit.vertices[fm.keypoints])[:, :2])
    return fit
