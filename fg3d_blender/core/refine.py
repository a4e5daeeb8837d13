"""Stage 3b — FGNet refinement: the coarse 3DMM shape plus the network's UV shape-difference map.

``FGNetRefiner.load`` reads the bundled weights named in ``models/assets.json`` (role ``fgnet``: file,
sha256, width, UV size), after checking their sha256; with none installed it returns None and the
pipeline keeps the coarse shape.

The network is trained on exactly the fits this pipeline makes (the coarse stage with its landmark
refit, ``training``), with exactly these inputs (``fgnet_inputs``).  The product applies
``REFINE_GAIN`` of its difference, and only where the photo sees the surface (the visibility input,
blurred by ``VISIBLE_BLUR_TEXELS``): hidden texels keep the 3DMM.  Both were chosen on the 3D
benchmarks (README, "FGNet refinement"): the whole difference everywhere made the real scan worse than
the coarse fit (0.789 vs 0.775 mm), mostly at 60–75° of yaw where half the face is hidden; the applied
one is better than the coarse fit on the scan, FRGC consistency and AFLW2000-3D.  ``applied=False``
gives the network's whole difference (what training taught it, and what its own teacher draws).

The network runs on onnxruntime (``onnx_models.FGNetModel``); training builds a refiner around the torch
``FGNet`` instead (its teacher), which has the same ``predict``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

from .assets import bundled
from .fgnet_inputs import fgnet_inputs, load_shape_range
from .morphable import BACKENDS, FaceModel, Fit
from .onnx_models import FGNetModel

REFINE_GAIN = 0.5  # share of the network's difference the product applies
VISIBLE_BLUR_TEXELS = 4.0  # Gaussian sigma (texels of the 128² UV map) of the seen-surface mask


class FGNetRefiner:
    """A network, the face model it works on and the FGNet input settings (UV size, shape range).  ``net``
    is an ``FGNetModel`` (onnxruntime) or a torch ``FGNet`` in eval mode: anything with ``predict``."""

    def __init__(
        self,
        net,
        fm: FaceModel,
        uv_size: int,
        info: Optional[dict] = None,
        shape_range: Optional[Tuple[float, float]] = None,
    ):
        self.net, self.fm, self.uv_size, self.info = net, fm, int(uv_size), info or {}
        self.shape_range = shape_range or load_shape_range()

    @classmethod
    def load(cls, fm: FaceModel, threads: int = 1, backend: str = "onnxruntime") -> Optional[FGNetRefiner]:
        """The bundled weights (sha256-checked) on onnxruntime with ``threads`` threads (``backend="torch"``:
        the torch network, for the comparisons), or None when none are installed."""
        entry = bundled("fgnet")
        if entry is None:
            return None
        if backend == "torch":
            from .fgnet import load_checkpoint  # why: torch, only for the comparisons and training

            net = load_checkpoint(entry["file"])
        elif backend == "onnxruntime":
            net = FGNetModel.load(entry, threads)
        else:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        return cls(net, fm, entry["meta"]["uv_size"], entry)

    def difference(self, image: np.ndarray, fit: Fit, applied: bool = True) -> np.ndarray:
        """The UV shape-difference map (S,S,3) in mm for a photo and its fit: the applied one (``REFINE_GAIN``
        of it where the photo sees the surface), or with ``applied=False`` the network's whole output."""
        inp = fgnet_inputs(image, fit, self.fm, self.uv_size, self.shape_range)
        d = self.net.predict(*inp.arrays())[0].transpose(1, 2, 0)
        if applied:
            sigma = VISIBLE_BLUR_TEXELS * self.uv_size / 128.0
            seen = cv2.GaussianBlur((inp.visibility > 0).astype(np.float32), (0, 0), sigma)
            d = d * (np.float32(REFINE_GAIN) * seen)[:, :, None]
        return np.ascontiguousarray(d, dtype=np.float32)

    def refine(self, image: np.ndarray, fit: Fit, applied: bool = True) -> np.ndarray:
        """Refined vertices (N,3) mm for a 3DMM fit (``applied``: as ``difference``)."""
        return (fit.vertices + self.fm.from_uv(self.difference(image, fit, applied))).astype(np.float32)
