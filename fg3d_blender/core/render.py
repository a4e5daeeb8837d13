"""Stage 4 — renders built on the compiled rasterizer: depth, PNCC, visibility, normals, UV maps.

Image-space renders take vertices in pixel coordinates (x col, y row, z toward camera).  UV-space
renders interpolate per-vertex attributes into a raster of the UV layout (``uv_raster``; the face model
keeps one per size); ``from_uv`` reads a UV map back at each vertex.  ``render_face`` rasterizes a
posed face only in the window it covers, so a small face in a huge photo costs what a small photo
does; the pipeline, the FGNet inputs and the previews all render through it.  Texel (r, c) of a size-S
map covers u = (c + 0.5) / S, v = 1 − (r + 0.5) / S, the OpenGL/OBJ convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np

from .. import render_ext as rx


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


@dataclass
class Raster:
    depth: np.ndarray  # (h,w) float32, -inf where empty
    tri_id: np.ndarray  # (h,w) int32, -1 where empty
    bary: np.ndarray  # (h,w,3) float32

    @property
    def mask(self) -> np.ndarray:
        return self.tri_id >= 0


def rasterize(image_vertices: np.ndarray, triangles: np.ndarray, height: int, width: int) -> Raster:
    return Raster(*rx.rasterize(_f32(image_vertices), _i32(triangles), int(height), int(width)))


def interpolate(r: Raster, triangles: np.ndarray, attrs: np.ndarray) -> np.ndarray:
    attrs = _f32(attrs)
    squeeze = attrs.ndim == 1
    out = rx.interpolate(r.tri_id, r.bary, _i32(triangles), attrs[:, None] if squeeze else attrs)
    return out[:, :, 0] if squeeze else out


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    return rx.vertex_normals(_f32(vertices), _i32(triangles))


def sample(image: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """Bilinear values of an (h,w[,C]) map at (N,2) pixel positions (x, y)."""
    img = _f32(image)
    squeeze = img.ndim == 2
    out = rx.sample_bilinear(img[:, :, None] if squeeze else img, _f32(points_xy))
    return out[:, 0] if squeeze else out


def pncc_colors(mean_vertices: np.ndarray) -> np.ndarray:
    """Normalised mean-shape coordinates in [0,1] — the PNCC code of each vertex."""
    lo, hi = mean_vertices.min(0), mean_vertices.max(0)
    return ((mean_vertices - lo) / (hi - lo)).astype(np.float32)


OCCLUSION_TOLERANCE_MM = 6.0  # a surface point this close behind the z-buffer still counts as visible


def occlusion_tolerance(px_per_mm: float) -> float:
    """The z-buffer tolerance in pixels for a face drawn at ``px_per_mm`` (at least 1 px)."""
    return max(1.0, OCCLUSION_TOLERANCE_MM * px_per_mm)


def visible_vertices(r: Raster, image_vertices: np.ndarray, tolerance: float) -> np.ndarray:
    """Vertices inside the photo whose depth is within ``tolerance`` px of the z-buffer."""
    h, w = r.depth.shape
    xy = np.rint(image_vertices[:, :2]).astype(np.int64)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    vis = np.zeros(len(image_vertices), dtype=bool)
    zb = r.depth[xy[inside, 1], xy[inside, 0]]
    vis[inside] = image_vertices[inside, 2] >= zb - tolerance
    return vis


def bounding_window(image_vertices: np.ndarray, height: int, width: int, margin: int = 2):
    """Integer window (x0, y0, x1, y1) holding every projected vertex plus ``margin`` px, clipped to the
    image and at least 1×1.  Rendering only there keeps a face in a huge photo cheap.  x0 and y0 are
    even, so rounding half to even (np.rint, OpenCV's remap) gives the same pixels in window and photo
    coordinates: a windowed render is bit-identical to a whole-photo one."""
    x, y = image_vertices[:, 0], image_vertices[:, 1]  # per-column reductions: 25× faster than .min(0)
    lo = np.floor(np.array([x.min(), y.min()])).astype(np.int64) - margin
    lo -= lo % 2
    hi = np.ceil(np.array([x.max(), y.max()])).astype(np.int64) + margin + 1
    x0, y0 = int(np.clip(lo[0], 0, width - 1)), int(np.clip(lo[1], 0, height - 1))
    x1, y1 = int(np.clip(hi[0], x0 + 1, width)), int(np.clip(hi[1], y0 + 1, height))
    return x0, y0, x1, y1


@dataclass
class FaceRender:
    """A posed face rasterized in the window it covers: ``raster`` is in window pixels, whose origin is
    ``(x0, y0)`` of the photo; ``vertices`` are the posed vertices in window coordinates."""

    raster: Raster
    window: Tuple[int, int, int, int]  # x0, y0, x1, y1 in photo pixels
    shape: Tuple[int, int]  # the photo's (height, width)
    vertices: np.ndarray

    @property
    def offset(self) -> np.ndarray:
        return np.array([self.window[0], self.window[1], 0], dtype=np.float32)

    @property
    def slices(self) -> Tuple[slice, slice]:
        x0, y0, x1, y1 = self.window
        return slice(y0, y1), slice(x0, x1)

    def in_photo(self, window_map: np.ndarray, fill) -> np.ndarray:
        """A window-sized map placed into a photo-sized one, ``fill`` elsewhere."""
        out = np.full(self.shape + window_map.shape[2:], fill, dtype=window_map.dtype)
        out[self.slices] = window_map
        return out


def render_face(image_vertices: np.ndarray, triangles: np.ndarray, height: int, width: int) -> FaceRender:
    """Rasterize posed vertices (photo pixels) over a ``height``×``width`` photo, only in their window."""
    x0, y0, x1, y1 = bounding_window(image_vertices, height, width)
    local = (image_vertices - np.array([x0, y0, 0], dtype=np.float32)).astype(np.float32, copy=False)
    ras = rasterize(local, triangles, y1 - y0, x1 - x0)
    return FaceRender(raster=ras, window=(x0, y0, x1, y1), shape=(int(height), int(width)), vertices=local)


def remap_at(
    image: np.ndarray,
    pos: np.ndarray,
    interpolation: int = cv2.INTER_LINEAR,
    border: int = cv2.BORDER_REPLICATE,
    border_value: float = 0.0,
) -> np.ndarray:
    """``image`` sampled at the (S,S,≥2) pixel positions ``pos`` (x, y): an (S,S[,C]) map."""
    return cv2.remap(
        image,
        np.ascontiguousarray(pos[:, :, 0]),
        np.ascontiguousarray(pos[:, :, 1]),
        interpolation,
        borderMode=border,
        borderValue=border_value,
    )


def texel_visibility(
    pos: np.ndarray,
    layout: np.ndarray,
    zbuffer: np.ndarray,
    tolerance: float,
    facing: np.ndarray,
    min_facing: float,
) -> np.ndarray:
    """Texels inside ``layout`` whose position ``pos`` (S,S,3; zbuffer pixels) passes the z-buffer test
    within ``tolerance`` px and whose facing cosine exceeds ``min_facing``."""
    zb = remap_at(zbuffer, pos, cv2.INTER_NEAREST, cv2.BORDER_CONSTANT, np.inf)
    return layout & (facing > min_facing) & (pos[:, :, 2] >= zb - tolerance)


# ---- UV space -------------------------------------------------------------------------------------


def uv_pixel_coords(uvs: np.ndarray, size: int) -> np.ndarray:
    """UV (N,2) in [0,1] → (N,3) texel coordinates (x, y, 0) of a size×size map."""
    out = np.zeros((len(uvs), 3), dtype=np.float32)
    out[:, 0] = uvs[:, 0] * size - 0.5
    out[:, 1] = (1.0 - uvs[:, 1]) * size - 0.5
    return out


def uv_raster(uvs: np.ndarray, triangles: np.ndarray, size: int) -> Raster:
    """Rasterization of a UV layout at size×size (``FaceModel.uv_raster`` keeps one per size)."""
    return rasterize(uv_pixel_coords(uvs, size), triangles, size, size)


def from_uv(uv_map: np.ndarray, uvs: np.ndarray) -> np.ndarray:
    """(S,S[,C]) UV map → per-vertex values at each vertex's UV."""
    return sample(uv_map, uv_pixel_coords(uvs, uv_map.shape[0])[:, :2])
