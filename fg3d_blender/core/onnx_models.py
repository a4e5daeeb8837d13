"""The networks at inference time: onnxruntime sessions over our own weight-less ONNX graphs.

The graphs (``models/mb05_120x120.onnx``, ``models/fgnet_w8.onnx``) are written by the dev command
``export-onnx`` (``training/onnx_export.py``) from the torch modules and committed; they hold no
numbers of any weight file.  Their initializers are named as in the torch state dicts and marked as
external data, and each session gets them from the weight file itself, read without torch by
``pth_reader`` and handed over in memory (``SessionOptions.add_external_initializers``): the third-party
``mb05_120x120.pth`` (sha256-checked asset) for the regressor, our bundled ``fgnet_w8_uv128.pt`` for FGNet.
No derived weight file is written; every file involved is sha256-checked by ``assets``.

Sessions run on the CPU with ``threads`` intra-op threads (1 by default: on 2 cores a second thread
made the regressor slower).  ``Regressor.predict`` and ``FGNetModel.predict`` take and return numpy
arrays, like the torch modules' ``predict`` (used by training and the comparisons), so the pipeline
code is the same for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import onnxruntime as ort

from .assets import asset_path, bundled
from .errors import FG3DError
from .pth_reader import read_weights, state_arrays
from .threads import resolve

REGRESSOR_WEIGHTS = "3ddfa_v2/mb05_120x120.pth"
REGRESSOR_GRAPH_ROLE = "regressor_graph"
FGNET_GRAPH_ROLE = "fgnet_graph"


def session(
    graph: Path, weights: Dict[str, np.ndarray], threads: int = 1
) -> Tuple[ort.InferenceSession, list]:
    """An onnxruntime CPU session of ``graph`` with its external initializers taken from ``weights``
    (name → float32 array); returns the session and the buffers it reads (keep them alive with it)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = resolve(threads)  # the project's policy (core.threads): 0 is one
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: warnings are noise for a user
    arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in weights.values()]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    opts.add_external_initializers(list(weights), values)
    try:
        sess = ort.InferenceSession(str(graph), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (Fail, InvalidGraph …)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FG3DError(
            f"{graph}: the network could not be built from it and its weights ({first[:200]}); "
            "restore the file from the repository, or run `python -m fg3d_blender export-onnx` in a checkout"
        ) from None
    return sess, arrays + values


def _graph(role: str) -> dict:
    entry = bundled(role)  # sha256-checked: a damaged or edited graph is one line
    if entry is None:
        raise FG3DError(f"models/assets.json names no {role} file, or it is missing: incomplete installation")
    return entry


class Regressor:
    """3DDFA_V2's MobileNet on onnxruntime: normalised crops (B,3,120,120) → (params (B,62) whitened,
    landmarks (B,136))."""

    def __init__(self, graph: Path, weights: Dict[str, np.ndarray], threads: int = 1):
        self.session, self._keep = session(graph, weights, threads)

    @classmethod
    def load(cls, threads: int = 1) -> Regressor:
        path = asset_path(REGRESSOR_WEIGHTS)
        weights = state_arrays(read_weights(path, "3DMM regressor weights file"), path, "MobileNet regressor")
        return cls(Path(_graph(REGRESSOR_GRAPH_ROLE)["file"]), weights, threads)

    def predict(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        params, landmarks = self.session.run(None, {"crops": np.ascontiguousarray(x, dtype=np.float32)})
        return params, landmarks


class FGNetModel:
    """FGNet on onnxruntime: (paf, visibility, shape), batch first, channels first → difference map."""

    def __init__(self, graph: Path, weights: Dict[str, np.ndarray], width: int, threads: int = 1):
        self.width = int(width)
        self.session, self._keep = session(graph, weights, threads)

    @classmethod
    def load(cls, entry: dict, threads: int = 1) -> FGNetModel:
        """The bundled weights of ``entry`` (``assets.bundled("fgnet")``) on the bundled FGNet graph."""
        graph = _graph(FGNET_GRAPH_ROLE)
        meta, gmeta = entry["meta"], graph["meta"]
        if (int(meta["width"]), int(meta.get("paf_k", 3))) != (int(gmeta["width"]), int(gmeta["paf_k"])):
            raise FG3DError(
                f"{graph['file']} is the graph of FGNet width {gmeta['width']}, but {entry['file']} has "
                f"width {meta['width']}; run `python -m fg3d_blender export-onnx` in a checkout"
            )
        weights = state_arrays(read_weights(entry["file"], "FGNet weights file"), entry["file"], "FGNet")
        return cls(Path(graph["file"]), weights, meta["width"], threads)

    def predict(self, paf: np.ndarray, visibility: np.ndarray, shape: np.ndarray) -> np.ndarray:
        feeds = {"paf": paf, "visibility": visibility, "shape": shape}
        (out,) = self.session.run(
            None, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        )
        return out
