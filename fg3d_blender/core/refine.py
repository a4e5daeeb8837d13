"""Stage 3b — FGNet refinement: the coarse 3DMM shape plus the network's UV shape-difference map.

``FGNetRefiner.load`` reads the bundled weights named in ``models/assets.json`` (role ``fgnet``: file,
sha256, width, UV size), after checking their sha256; with none installed it returns None and the
pipeline keeps the coarse shape.

The network is trained on exactly the fits this pipeline makes (the coarse stage with its landmark
refit, ``training``), with exactly these inputs (``fgnet_inputs``), so its whole difference is added,
at every pose.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .assets import bundled
from .fgnet import FGNet, load_checkpoint
from .fgnet_inputs import fgnet_inputs, load_shape_range
from .morphable import FaceModel, Fit


class FGNetRefiner:
    """A network, the face model it works on and the FGNet input settings (UV size, shape range)."""

    def __init__(
        self,
        net: FGNet,
        fm: FaceModel,
        uv_size: int,
        info: Optional[dict] = None,
        shape_range: Optional[Tuple[float, float]] = None,
    ):
        self.net, self.fm, self.uv_size, self.info = net.eval(), fm, int(uv_size), info or {}
        self.shape_range = shape_range or load_shape_range()

    @classmethod
    def load(cls, fm: FaceModel) -> Optional[FGNetRefiner]:
        """The bundled weights (sha256-checked), or None when none are installed."""
        entry = bundled("fgnet")
        if entry is None:
            return None
        return cls(load_checkpoint(entry["file"]), fm, entry["meta"]["uv_size"], entry)

    def difference(self, image: np.ndarray, fit: Fit) -> np.ndarray:
        """The UV shape-difference map (S,S,3) in mm for a photo and its fit."""
        inp = fgnet_inputs(image, fit, self.fm, self.uv_size, self.shape_range)
        with torch.inference_mode():
            d = self.net(*inp.tensors())[0]
        return np.ascontiguousarray(d.permute(1, 2, 0).numpy(), dtype=np.float32)

    def refine(self, image: np.ndarray, fit: Fit) -> np.ndarray:
        """Refined vertices (N,3) mm for a 3DMM fit."""
        return (fit.vertices + self.fm.from_uv(self.difference(image, fit))).astype(np.float32)
