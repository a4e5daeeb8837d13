"""Stage 3b — FGNet refinement: the coarse 3DMM shape plus the network's UV shape-difference map.

The shipped weights (``models/fgnet.json`` names the file, its sha256, width and UV size) are loaded
lazily, once, under a lock; their sha256 is checked.  With no weights file installed ``refine``
returns None and the pipeline keeps the coarse shape.

The network only saw the poses of its training photos (UTKFace: 99.9 % within 30° of yaw).  The
manifest records that support (``yaw_support_deg``: full strength up to the first angle, fading
linearly to none at the second); beyond it the shape difference is scaled down rather than
extrapolated (measured on AFLW2000-3D: unrestricted, the [60°, 90°] bin got worse).  The manifest's
``detail_highpass_sigma`` keeps only the fine-grained part of the difference (see ``detail_part``).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import FG3DError

MANIFEST = "fgnet.json"

_lock = threading.Lock()
_state: dict = {}


def model_info() -> Optional[dict]:
    """The shipped model's manifest entry with its resolved ``path``, or None if nothing is installed."""
    from .assets import models_dir
    try:
        man = models_dir() / MANIFEST
    except FG3DError:
        return None
    if not man.is_file():
        return None
    info = json.loads(man.read_text(encoding="utf-8"))
    info["path"] = str(man.parent / info["file"])
    return info if Path(info["path"]).is_file() else None


def load_verified(info: dict):
    """The network of a manifest entry, after checking the file's sha256 (FG3DError if it differs)."""
    from .assets import sha256_of
    from .fgnet import load_checkpoint
    digest = sha256_of(Path(info["path"]))
    if digest != info["sha256"]:
        raise FG3DError(f"FGNet weights {info['path']} are corrupt (sha256 {digest[:12]}…, expected "
                        f"{info['sha256'][:12]}…); restore the file or run with --no-refine")
    return load_checkpoint(info["path"])


def _model() -> Tuple[Optional[object], Optional[dict]]:
    with _lock:
        if "net" not in _state:
            info = model_info()
            _state["net"] = load_verified(info) if info is not None else None
            _state["info"] = info
        return _state["net"], _state["info"]


def shape_difference(image: np.ndarray, fit, flip: Optional[bool] = None) -> Optional[np.ndarray]:
    """The network's UV shape-difference map (S,S,3) in mm, or None without weights.

    With ``flip`` (default: the manifest's ``flip_average``) the network also runs on the mirrored
    inputs, in the same batch, and the two predictions are averaged (see ``mirror_inputs``)."""
    import torch
    from .uv_inputs import uv_inputs
    net, info = _model()
    if net is None:
        return None
    if flip is None:
        flip = bool(info.get("flip_average", False))
    x = uv_inputs(image, fit, int(info["uv_size"])).tensors()
    if flip:
        x = [torch.cat([a, m]) for a, m in zip(x, mirror_inputs(*x))]
    with torch.inference_mode():
        d = net(*x)
    if flip:
        d = 0.5 * (d[:1] + mirror_difference(d[1:]))
    return np.ascontiguousarray(d[0].permute(1, 2, 0).numpy(), dtype=np.float32)


def mirror_inputs(paf, vis, shape):
    """FGNet's inputs (B,C,H,W tensors) for the same face mirrored left-right.

    The BFM UV layout is symmetric (each vertex's mirror partner sits at (1 − u, v)), so mirroring the
    face flips the maps' columns; the PAF image's k×k blocks flip with them (the mirrored photo's
    neighbourhoods).  The shape offset (from the BFM mean) changes the sign of its x component, and
    takes up the mean's own small asymmetry (``mean_asymmetry_um``)."""
    import torch
    from .uv_inputs import shape_range_um
    lo, hi = shape_range_um()
    off = shape.flip(-1) * (hi - lo) + lo
    off[:, 0] = -off[:, 0]
    off = off + torch.from_numpy(mean_asymmetry_um(shape.shape[-1])).permute(2, 0, 1)
    return paf.flip(-1), vis.flip(-1), ((off - lo) / (hi - lo)).clamp(0.0, 1.0)


def mean_asymmetry_um(size: int) -> np.ndarray:
    """(S,S,3) µm: the BFM mean mirrored (x negated, columns flipped) minus the mean, in UV space."""
    with _lock:
        key = ("asym", size)
        if key not in _state:
            from . import morphable, render
            fm = morphable.face_model()
            m = render.to_uv(fm.mean_um.astype(np.float32), fm.uvs, fm.triangles, size)
            mirrored = m[:, ::-1] * np.array([-1.0, 1.0, 1.0], np.float32)
            _state[key] = np.ascontiguousarray(mirrored - m, dtype=np.float32)
        return _state[key]


def mirror_difference(d):
    """A predicted shape-difference map (B,3,S,S) of a mirrored face, mirrored back."""
    d = d.flip(-1).clone()
    d[:, 0] = -d[:, 0]
    return d


def refine(image: np.ndarray, fit) -> Optional[np.ndarray]:
    """Refined vertices (N,3) mm for a 3DMM fit, or None when no FGNet weights are installed."""
    from . import morphable, render
    d = shape_difference(image, fit)
    if d is None:
        return None
    fm = morphable.face_model()
    info = _state["info"]
    d = detail_part(d, info.get("detail_highpass_sigma"), int(info["uv_size"]))
    weight = pose_weight(fit.pose_degrees["yaw"], info.get("yaw_support_deg"))
    return (fit.vertices + weight * render.from_uv(d, fm.uvs)).astype(np.float32)


def detail_part(d: np.ndarray, sigma, uv_size: int) -> np.ndarray:
    """The shape difference minus its Gaussian low-pass (``sigma`` texels of a 128² map), or ``d``.

    The coarse stage's landmark refit already makes the large-scale corrections the network learned
    from its landmark loss; applied on top, they overshoot (AFLW2000-3D, GT crop, first 300 photos:
    3.575 % coarse, 3.741 % with the whole difference, 3.563 % with its detail part at sigma 4).
    """
    if not sigma:
        return d
    import cv2
    s = float(sigma) * uv_size / 128.0
    return d - cv2.GaussianBlur(d, (0, 0), s)


def pose_weight(yaw_deg: float, support) -> float:
    """1 inside the training poses' yaw range, fading linearly to 0 at its outer limit."""
    if not support:
        return 1.0
    full, zero = float(support[0]), float(support[1])
    return float(np.clip((zero - abs(yaw_deg)) / max(zero - full, 1e-6), 0.0, 1.0))
