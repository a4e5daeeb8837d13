"""Compiled landmark predictor (Cython): dlib's 68-point model read from its file and run as dlib runs it.

Build it with the renderer (``make build``, ``python setup.py build_ext --inplace``).  Public functions:
``read_shape_predictor`` and ``predict``; see ``_ert.pyx``.  ``fg3d_blender.core.landmarks`` is the one
user (it caches the arrays and checks them once).
"""

try:
    from ._ert import predict, read_shape_predictor
except ImportError as exc:  # pragma: no cover - exercised only on an unbuilt checkout
    raise ImportError(
        "fg3d_blender.landmark_ext is not compiled: run `make build` (or "
        "`python setup.py build_ext --inplace`) in the project folder"
    ) from exc

__all__ = ["predict", "read_shape_predictor"]
