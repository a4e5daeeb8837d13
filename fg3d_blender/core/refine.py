"""Stage 3b — FGNet refinement: the coarse 3DMM shape plus the network's UV shape-difference map.

The shipped weights (``models/fgnet.json`` names the file, its sha256, width and UV size) are loaded
lazily, once, under a lock; their sha256 is checked.  With no weights file installed ``refine``
returns None and the pipeline keeps the coarse shape.

The network is trained on exactly the fits this pipeline makes (the coarse stage with its landmark
refit, ``train_fgnet``), so its whole difference is added, at every pose.  (Earlier weights, trained
before the refit existed, needed a pose fade and a high-pass filter; measured on AFLW2000-3D, both
only cost accuracy with the current weights: see the model card.)
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


def network_difference(net, image: np.ndarray, fit, uv_size: int) -> np.ndarray:
    """A given network's UV shape-difference map (S,S,3) in mm for a photo and its fit."""
    import torch
    from .uv_inputs import uv_inputs
    inp = uv_inputs(image, fit, uv_size)
    with torch.inference_mode():
        d = net(*inp.tensors())[0]
    return np.ascontiguousarray(d.permute(1, 2, 0).numpy(), dtype=np.float32)


def shape_difference(image: np.ndarray, fit) -> Optional[np.ndarray]:
    """The shipped network's UV shape-difference map (S,S,3) in mm, or None without weights."""
    net, info = _model()
    if net is None:
        return None
    return network_difference(net, image, fit, int(info["uv_size"]))


def refine(image: np.ndarray, fit) -> Optional[np.ndarray]:
    """Refined vertices (N,3) mm for a 3DMM fit, or None when no FGNet weights are installed."""
    from . import morphable, render
    d = shape_difference(image, fit)
    if d is None:
        return None
    return (fit.vertices + render.from_uv(d, morphable.face_model().uvs)).astype(np.float32)
