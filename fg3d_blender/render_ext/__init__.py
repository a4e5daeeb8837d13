"""Compiled renderer (Cython).  Build it with ``make build`` (``python setup.py build_ext --inplace``).

Public functions: ``rasterize``, ``interpolate``, ``vertex_normals``, ``sample_bilinear``,
``compose_texture``; see
``_raster.pyx``.  The arrays must be C-contiguous float32 / int32; the thin wrappers in
``fg3d_blender.core.render`` take care of that.
"""

try:
    from ._raster import compose_texture, interpolate, rasterize, sample_bilinear, vertex_normals
except ImportError as exc:  # pragma: no cover - exercised only on an unbuilt checkout
    raise ImportError(
        "fg3d_blender.render_ext is not compiled: run `make build` (or "
        "`python setup.py build_ext --inplace`) in the project folder"
    ) from exc

__all__ = ["rasterize", "interpolate", "vertex_normals", "sample_bilinear", "compose_texture"]
