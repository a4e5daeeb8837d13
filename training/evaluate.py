"""Held-out evaluation of FGNet during and after training, and BatchNorm recalibration."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from .batches import Batcher
from .losses import Losses


def detail_mm(d: np.ndarray, mask: np.ndarray, sigma: float) -> float:
    """Mean magnitude (mm) of the high-frequency part of a UV shape-difference map (S,S,3)."""
    hf = d - cv2.GaussianBlur(d.astype(np.float32), (0, 0), sigma)
    return float(np.linalg.norm(hf, axis=-1)[mask].mean()) if mask.any() else 0.0


def evaluate(net, batcher: Batcher, losses: Losses, idx: np.ndarray, batch: int = 16) -> dict:
    """Held-out photometric error and landmark NME (vs the batcher's target), coarse vs refined, and the
    detail measure."""
    if len(idx) == 0:
        return {"n": 0}
    acc = {"photo_coarse": [0.0, 0.0], "photo_refined": [0.0, 0.0]}
    nme_c, nme_r, det = [], [], []
    net.eval()
    with torch.inference_mode():
        for s in range(0, len(idx), batch):
            b = batcher.batch(idx[s : s + batch])
            d = net(b["paf"], b["vis"], b["shape"]).float()
            for tag, dd in (("coarse", torch.zeros_like(d)), ("refined", d)):
                p = b["p0"] + dd.permute(0, 2, 3, 1)
                r, wt = losses.photometric_residual(p, b)
                acc[f"photo_{tag}"][0] += float((r * wt).sum())
                acc[f"photo_{tag}"][1] += float(wt.sum())
                (nme_c if tag == "coarse" else nme_r).append(losses.landmark_nme(dd, b).mean(1).cpu().numpy())
            dn = d.permute(0, 2, 3, 1).cpu().numpy()
            m = (b["vis"][:, 0] * losses.inner).cpu().numpy() > 0
            det += [detail_mm(dn[j], m[j], batcher.size / 64) for j in range(len(dn))]
    return {
        "n": int(len(idx)),
        "landmark_target": batcher.target,
        "photometric_coarse": acc["photo_coarse"][0] / max(acc["photo_coarse"][1], 1e-9),
        "photometric_refined": acc["photo_refined"][0] / max(acc["photo_refined"][1], 1e-9),
        "landmark_nme_coarse": float(np.concatenate(nme_c).mean()),
        "landmark_nme_refined": float(np.concatenate(nme_r).mean()),
        "detail_mm": float(np.mean(det)),
    }


def evaluate_views(
    net, batcher: Batcher, losses: Losses, idx: np.ndarray, batch: int = 16, prefix: str = "view"
) -> dict:
    """Mean 3D shape error (mm) on renders of known shape (``prefix``: views or synthetic), coarse vs
    refined."""
    if len(idx) == 0:
        return {}
    errs = {k: [] for k in ("shape_mm_coarse", "shape_mm_refined", "surface_mm_coarse", "surface_mm_refined")}
    net.eval()
    with torch.inference_mode():
        for s in range(0, len(idx), batch):
            b = batcher.batch(idx[s : s + batch])
            d = net(b["paf"], b["vis"], b["shape"]).float()
            for stage, dd in (("coarse", torch.zeros_like(d)), ("refined", d)):
                errs[f"shape_mm_{stage}"].append(losses.shape_error_mm(dd, b).cpu().numpy())
                errs[f"surface_mm_{stage}"].append(losses.surface_error_mm(dd, b).cpu().numpy())
    out = {f"{prefix}_n": int(len(idx))}
    out.update({f"{prefix}_{k}": float(np.concatenate(v).mean()) for k, v in errs.items()})
    return out


def recalibrate_bn(
    net, batcher: Batcher, idx: np.ndarray, batches: int = 40, batch: int = 16, seed: int = 0
) -> None:
    """Replace the BatchNorm running statistics by exact averages over ``batches`` training batches.

    With small batches and a fast-moving network the exponential running averages lag behind the
    weights, and eval-mode outputs drift from what training optimised (measured: held-out landmark NME
    3.42 % → 3.25 % after recalibration).  Called before every evaluation and before the final save."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    rng = np.random.default_rng(seed)
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            b = batcher.batch(rng.choice(idx, min(batch, len(idx)), replace=False))
            net(b["paf"], b["vis"], b["shape"])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    net.eval()
