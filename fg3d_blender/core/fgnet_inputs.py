"""FGNet's inputs — the one definition, used by inference (``refine``) and by training alike.

From a photo and its 3DMM ``Fit``, at UV size S:

* PAF (Pose Adaptive Feature) image: each texel of the S×S UV layout is projected into the photo; the
  photo (RGB, [0,1]) is sampled in a k×k pixel neighbourhood around that position and the samples are
  laid out as a k×k block, giving a (k·S)² image (k=3, S=256 → 768², as in the paper).  Photos whose
  face is larger than ``PAF_PX_PER_MM`` are first downscaled (area filter) to that scale, so the
  neighbourhood covers the same amount of face whatever the photo's resolution.
* visibility: 1 where a texel's surface point passes the photo's z-buffer test and faces the camera
  (cosine above ``MIN_FACING``), weighted by that cosine (0 elsewhere).  (The paper's map is the cosine
  alone.)  The z-buffer is rendered only in the face's window (``render.render_face``).
* shape offset: the 3DMM's displacement from the BFM mean, µm, scaled into [0,1] with the paper's
  range (``shape_distribute.mat``, ±3.9 mm) and clipped.

These thresholds are FGNet's own (the network was trained with them): tuning the texture stage does
not change them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np

from . import render
from .assets import load_mat_arrays
from .morphable import FaceModel, Fit

PAF_K = 3
PAF_PX_PER_MM = 1.2  # photos with a finer face scale are downscaled to this (UTKFace crops: ≈1.2)
MIN_FACING = 0.2  # texels facing the camera less than this are not visible to FGNet


def load_shape_range() -> Tuple[float, float]:
    """(min, max) of the paper's shape-offset normalisation, µm (``shape_distribute.mat``)."""
    d = load_mat_arrays("beyond3dmm/shape_distribute.mat")
    return float(d["shape_min"].ravel()[0]), float(d["shape_max"].ravel()[0])


@dataclass
class FGNetInputs:
    paf: np.ndarray  # (k·S, k·S, 3) float32 RGB in [0,1]
    visibility: np.ndarray  # (S, S) float32 in [0,1]
    shape: np.ndarray  # (S, S, 3) float32 in [0,1]
    positions: np.ndarray  # (S, S, 3) texel positions in the (possibly downscaled) photo, px
    scale: float  # photo downscale factor applied before sampling (1 = none)

    def arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(paf, visibility, shape) as float32 arrays with a batch axis, channels first: the network's
        inputs (``FGNetModel.predict`` and ``FGNet.predict``)."""
        return (
            np.ascontiguousarray(self.paf.transpose(2, 0, 1), dtype=np.float32)[None],
            np.ascontiguousarray(self.visibility, dtype=np.float32)[None, None],
            np.ascontiguousarray(self.shape.transpose(2, 0, 1), dtype=np.float32)[None],
        )

    def tensors(self):
        """``arrays()`` as torch tensors (training and the torch network)."""
        import torch  # why: training only; inference feeds ``arrays()`` to onnxruntime without torch

        return tuple(torch.from_numpy(a) for a in self.arrays())


def photo_at_scale(image: np.ndarray, px_per_mm: float) -> Tuple[np.ndarray, float]:
    """The photo downscaled so the face is at most ``PAF_PX_PER_MM`` px/mm, and the factor used."""
    s = PAF_PX_PER_MM / px_per_mm
    if s >= 0.8:
        return image, 1.0
    h, w = image.shape[:2]
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), s


def paf_image(image: np.ndarray, positions_xy: np.ndarray, k: int = PAF_K) -> np.ndarray:
    """Photo sampled at each texel's position ± (k−1)/2 px, as k×k blocks: (k·S, k·S, C) float32, its
    channels in the photo's order (uint8 photos scaled to [0, 1])."""
    s = positions_xy.shape[0]
    d = np.arange(k, dtype=np.float32) - (k - 1) / 2.0
    mx = (positions_xy[:, None, :, None, 0] + d[None, None, None, :]) + np.zeros((1, k, 1, 1), np.float32)
    my = (positions_xy[:, None, :, None, 1] + d[None, :, None, None]) + np.zeros((1, 1, 1, k), np.float32)
    mx = np.ascontiguousarray(mx.reshape(s * k, s * k), dtype=np.float32)
    my = np.ascontiguousarray(my.reshape(s * k, s * k), dtype=np.float32)
    out = cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.astype(np.float32) / 255.0 if out.dtype == np.uint8 else out.astype(np.float32)


def visibility_map(
    photo_shape,
    image_vertices: np.ndarray,
    facing: np.ndarray,
    positions: np.ndarray,
    fm: FaceModel,
    size: int,
    px_per_mm: float,
) -> np.ndarray:
    """(S,S) float32: z-buffer-visible, camera-facing texels weighted by their facing cosine."""
    face = render.render_face(image_vertices, fm.triangles, photo_shape[0], photo_shape[1])
    r = fm.uv_raster(size)
    face_uv = render.interpolate(r, fm.triangles, facing)
    tol = render.occlusion_tolerance(px_per_mm)
    vis = render.texel_visibility(
        positions - face.offset, r.mask, face.raster.depth, tol, face_uv, MIN_FACING
    )
    return np.where(vis, np.clip(face_uv, 0.0, 1.0), 0.0).astype(np.float32)


def shape_offset_map(
    vertices_mm: np.ndarray, fm: FaceModel, size: int, shape_range: Tuple[float, float]
) -> np.ndarray:
    """(S,S,3) the 3DMM displacement from the BFM mean, normalised to [0,1] with the paper's range."""
    lo, hi = shape_range
    off = vertices_mm.astype(np.float64) * 1000.0 - fm.mean_um
    m = fm.to_uv(off.astype(np.float32), size)
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def facing_cosines(fit: Fit, vertices: np.ndarray, fm: FaceModel) -> np.ndarray:
    """Per-vertex cosine between the posed normal and the direction to the camera."""
    n = render.vertex_normals(vertices, fm.triangles)
    return (n @ fit.rotation.T)[:, 2].astype(np.float32)


def fgnet_inputs(
    image: np.ndarray, fit: Fit, fm: FaceModel, size: int, shape_range: Tuple[float, float], k: int = PAF_K
) -> FGNetInputs:
    """All three FGNet inputs for a BGR uint8 photo and its 3DMM fit, at UV size ``size``."""
    verts = fit.vertices
    photo, s = photo_at_scale(image, fit.scale)
    iv = fit.project(verts) * np.float32(s)  # scaling x, y and z alike keeps the z-buffer test consistent
    pos = fm.to_uv(iv, size)
    vis = visibility_map(photo.shape, iv, facing_cosines(fit, verts, fm), pos, fm, size, fit.scale * s)
    paf = paf_image(photo, pos[:, :, :2], k)[:, :, ::-1]  # RGB: remap reads each channel alone
    shape = shape_offset_map(verts, fm, size, shape_range)
    return FGNetInputs(paf=paf, visibility=vis, shape=shape, positions=pos, scale=s)
