"""FGNet's training losses, all in UV space and weighted by visibility.

* photometric: the photo sampled at each texel's refined projected position against albedo × SH
  shading of the refined normals (lighting: the photo's SH estimate from the coarse shape, cached;
  albedo: the low-pass ratio of the sampled texture to the shading, recomputed for the refined shape,
  so the network must explain the fine shading with geometry);
* landmarks: the 68 refined keypoint vertices, projected, against the target landmarks (the
  regressor's landmark head by default), normalised by the face size;
* Laplacian smoothness of D and a magnitude prior on D;
* ``shape_error_mm``: the synthetic views' 3D error against their known shape;
* ``surface_error_mm``: the synthetic faces' (``synthetic``) 3D error over the face region, across the
  surface, after the best similarity.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fg3d_blender.core import render
from fg3d_blender.core.geometry import sh_basis
from fg3d_blender.core.morphable import FaceModel

from .batches import LANDMARK_TARGETS, UVModel
from .cache import ALBEDO_SIGMA_FRAC

TANGENTIAL_WEIGHT = 0.25  # of the synthetic faces' error along the surface, against 1 across it


def similarity_params(src, dst, w):
    """Per batch element, the similarity (scale (B,), rotation (B,3,3), src centroid, dst centroid
    (B,1,3)) taking ``src`` (B,S,S,3) onto ``dst`` with the least ``w``-weighted (S,S) squared distance
    (Umeyama)."""
    ww = (w / w.sum()).reshape(1, -1, 1)
    x = src.reshape(src.shape[0], -1, 3)
    y = dst.reshape(dst.shape[0], -1, 3)
    mx, my = (x * ww).sum(1, keepdim=True), (y * ww).sum(1, keepdim=True)
    xc, yc = x - mx, y - my
    cov = torch.einsum("bni,bnj->bij", yc * ww, xc)
    u, sv, vt = torch.linalg.svd(cov)
    sign = torch.ones_like(sv)
    sign[:, 2] = torch.sign(torch.linalg.det(u @ vt))
    r = u @ torch.diag_embed(sign) @ vt
    var = (xc.square().sum(-1, keepdim=True) * ww).sum((1, 2))
    return (sv * sign).sum(1) / var.clamp_min(1e-9), r, mx, my


def apply_similarity(points, params):
    """(B,S,S,3) points moved by ``similarity_params``' transform."""
    s, r, mx, my = params
    x = points.reshape(points.shape[0], -1, 3) - mx
    return (s.view(-1, 1, 1) * torch.einsum("bij,bnj->bni", r, x) + my).reshape(points.shape)


def similarity_onto(src, dst, w):
    """``src`` moved onto ``dst`` by the best ``w``-weighted similarity."""
    return apply_similarity(src, similarity_params(src, dst, w))


class Losses:
    """The four UV-space losses; ``__call__`` returns (total, parts dict)."""

    WEIGHTS = {"photo": 1.0, "landmark": 2.0, "laplacian": 2.0, "magnitude": 1e-3}

    def __init__(
        self, fm: FaceModel, uvm: UVModel, device, weights: Optional[dict] = None, target: str = "head"
    ):
        self.w = dict(self.WEIGHTS, **(weights or {}))
        lay = uvm.layout.astype(np.float32)
        inner = cv2.erode(lay, np.ones((3, 3), np.uint8)) > 0
        inner[[0, -1], :] = False  # no central differences (normals) on the map's border
        inner[:, [0, -1]] = False
        self.inner = torch.from_numpy(inner.astype(np.float32)).to(device)
        face = fm.to_uv(fm.face_region.astype(np.float32), uvm.size) > 0.99
        self.face = self.inner * torch.from_numpy(face.astype(np.float32)).to(device)
        kg = uvm.kp_uv * 2 - 1
        kg[:, 1] = -kg[:, 1]  # v up → row down
        self.kp_grid = torch.from_numpy(kg).to(device).view(1, 1, -1, 2)
        lw = np.ones(68, np.float32)
        lw[:17] = LANDMARK_TARGETS[target][1]
        self.lm_w = torch.from_numpy(lw / lw.sum()).to(device)
        self.sign = self._normal_sign(fm, uvm)
        sig = max(1.0, uvm.size * ALBEDO_SIGMA_FRAC)
        x = np.arange(-int(3 * sig), int(3 * sig) + 1, dtype=np.float32)
        g = np.exp(-x * x / (2 * sig * sig))
        self.gauss = torch.from_numpy(g / g.sum()).to(device)
        self.lap_k = (
            torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32, device=device)
            .view(1, 1, 3, 3)
            .repeat(3, 1, 1, 1)
        )

    @staticmethod
    def _normal_sign(fm: FaceModel, uvm: UVModel) -> float:
        n = fm.to_uv(render.vertex_normals(fm.mean_mm, fm.triangles), uvm.size)
        fd = np.cross(np.gradient(uvm.mean, axis=1), np.gradient(uvm.mean, axis=0))
        return 1.0 if float(np.sum(fd * n * uvm.layout[..., None])) > 0 else -1.0

    def normals(self, p):
        """Unit normals (B,S,S,3) of a UV position map (B,S,S,3) by central differences."""
        dx = torch.zeros_like(p)
        dy = torch.zeros_like(p)
        dx[:, :, 1:-1] = (p[:, :, 2:] - p[:, :, :-2]) / 2
        dy[:, 1:-1] = (p[:, 2:] - p[:, :-2]) / 2
        n = torch.cross(dx, dy, dim=-1) * self.sign
        return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def project(self, p, b):
        return torch.einsum("b...j,bij->b...i", p, b["A"]) + b["b"].view(-1, *([1] * (p.dim() - 2)), 3)

    def blur(self, x):
        """Separable Gaussian low-pass (sigma = ``ALBEDO_SIGMA_FRAC`` of the map size) of (B,C,S,S)."""
        c = x.shape[1]
        k = self.gauss.to(x.dtype)
        r = k.shape[-1] // 2
        x = F.conv2d(
            F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
        )
        return F.conv2d(
            F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
        )

    def photometric_residual(self, p, b):
        """Per-texel (B,S,S) residual |photo(q) − albedo·shading(n)| and its weight (B,S,S).

        The photo is sampled at the texels' projected positions (no gradient through the position: the
        landmark term aligns, this term only judges the shading of the refined normals).  The albedo is
        the low-pass ratio of that texture to the shading, so only shading detail finer than the
        low-pass has to be explained by geometry; the SH lighting is the photo's (cached) estimate."""
        q = self.project(p, b).detach()
        h, w = b["image"].shape[2:]
        grid = torch.stack([q[..., 0] / (w - 1) * 2 - 1, q[..., 1] / (h - 1) * 2 - 1], -1)
        photo = F.grid_sample(b["image"], grid, mode="bilinear", padding_mode="border", align_corners=True)
        n = self.normals(p) @ b["rot"].transpose(1, 2).unsqueeze(1)
        shade = (sh_basis(n, torch.stack) * b["light"].view(-1, 1, 1, 9)).sum(-1).clamp_min(0.05).unsqueeze(1)
        wt = (b["vis"][:, 0] * self.inner).unsqueeze(1)
        albedo = self.blur(photo * wt) / self.blur(shade * wt).clamp_min(1e-3)
        r = (photo - albedo * shade).abs().mean(1)
        return r, wt[:, 0]

    def landmark_nme(self, d, b):
        """(B,68) landmark errors normalised by sqrt(w·h) of the target landmarks' box."""
        dk = F.grid_sample(
            d, self.kp_grid.expand(d.shape[0], -1, -1, -1), mode="bilinear", align_corners=False
        )[:, :, 0].transpose(1, 2)  # (B,68,3)
        q = self.project(b["kp0"] + dk, b)[..., :2]
        wh = b["lm"].amax(1) - b["lm"].amin(1)
        return (q - b["lm"]).norm(dim=-1) / (wh[:, 0] * wh[:, 1]).sqrt().unsqueeze(1)

    def shape_error_mm(self, d, b):
        """(B,) mean distance (mm) of the refined face to a synthetic view's true shape (``target``)."""
        q = self.project(b["p0"] + d.permute(0, 2, 3, 1), b)
        scale = torch.linalg.det(b["A"]).abs().pow(1.0 / 3.0)
        e = (q - b["target"]).norm(dim=-1) * self.inner
        return e.sum((1, 2)) / self.inner.sum() / scale

    def surface_error_mm(self, d, b, tangential: float = TANGENTIAL_WEIGHT):
        """(B,) the synthetic faces' 3D error (mm) over the face region only (within 95 mm of the nose
        tip): the refined face moved onto the true shape by the similarity that fits them best there
        (Umeyama, found without gradient, applied with it: a smaller or larger face gains nothing), its
        error along the true surface's normal counted fully and the part along the surface (which a
        photo says little about) by ``tangential``."""
        q = self.project(b["p0"] + d.permute(0, 2, 3, 1), b)
        t = b["target"]
        moved = apply_similarity(q, similarity_params(q.detach(), t, self.face))
        n = self.normals(t)
        diff = moved - t
        along = (diff * n).sum(-1)
        tang = (diff - along.unsqueeze(-1) * n).square().sum(-1)
        e = torch.sqrt(along.square() + tangential**2 * tang + 1e-6) * self.face
        scale = torch.linalg.det(b["A"]).abs().pow(1.0 / 3.0)
        return e.sum((1, 2)) / self.face.sum() / scale

    def __call__(self, d, b):
        p = b["p0"] + d.permute(0, 2, 3, 1)
        r, wt = self.photometric_residual(p, b)
        photo = (torch.sqrt(r * r + 1e-4) * wt).sum() / wt.sum().clamp_min(1.0)
        lm = (self.landmark_nme(d, b) * self.lm_w).sum(1).mean()
        lap = F.conv2d(d, self.lap_k, padding=1, groups=3)
        lap = (lap.square().sum(1) * self.inner).mean()
        mag = (d.square().sum(1) * self.inner).mean()
        parts = {"photo": photo, "landmark": lm, "laplacian": lap, "magnitude": mag}
        total = sum(self.w[k] * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}
