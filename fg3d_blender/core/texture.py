"""Stage 5 — the UV texture: the photo sampled at each texel's projected position.

Texels whose surface point is hidden (z-buffer test) take the colour of their left–right mirror texel
(the BFM UV layout is symmetric, u ↔ 1 − u, and covers the whole square) when that one is fully
visible; texels seen at a grazing angle blend the photo into that fill; what is still empty is filled by
push–pull (masked pyramid averaging), which leaves no seams.  The geometry (where each texel lands in
the photo, whether it is seen there, its weight) and the push–pull fill are computed on a smaller UV
raster (``geometry_size``) and upsampled; the photo is read once per texel at full size.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .. import render_ext as rx
from .render import Raster, interpolate, texel_visibility

MIN_FACING = 0.2  # cosine between surface normal and view direction below which a texel is not trusted
FACING_RAMP = 0.25  # above MIN_FACING + this, the photo alone gives the texel's colour


def push_pull_fill(img: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill pixels where ``known`` is False with a smooth continuation of the known ones.

    Pull: a pyramid of weight-premultiplied colours and coverage; a coarse pixel's weight is the sum of
    its children's, capped at 1 (Gortler et al. 1996), so one known child is enough to define it.  Push:
    from the coarsest level up, each level keeps its own (premultiplied) colour and takes the upsampled
    estimate for the rest.
    """
    if known.all() or min(known.shape) < 2:
        return img.copy()
    w = known.astype(np.float32)
    levels = [(img.astype(np.float32) * w[..., None], w)]
    while min(levels[-1][1].shape) > 1:
        li, lw = levels[-1]
        size = (max(1, li.shape[1] // 2), max(1, li.shape[0] // 2))
        ci = cv2.resize(li, size, interpolation=cv2.INTER_AREA)
        cw = cv2.resize(lw, size, interpolation=cv2.INTER_AREA)
        nw = np.minimum(1.0, 4.0 * cw)
        levels.append((ci * (nw / np.maximum(cw, 1e-8))[..., None], nw))
    li, lw = levels[-1]
    est = li / np.maximum(lw, 1e-8)[..., None]
    for li, lw in reversed(levels[1:-1]):
        up = cv2.resize(est, (li.shape[1], li.shape[0]), interpolation=cv2.INTER_LINEAR)
        est = li + up * (1.0 - lw)[..., None]
    # full resolution: coverage is exactly 0 or 1 there, so keep the known pixels, take the estimate elsewhere
    out = cv2.resize(est, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    if img.dtype == np.uint8:
        out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    else:
        out = out.astype(img.dtype)
    return cv2.copyTo(img, known.astype(np.uint8), out)


def geometry_size(size: int) -> int:
    """The UV raster size at which the texture's geometry (texel positions in the photo, visibility,
    weights and the smooth fill) is computed for a size×size texture: a quarter of it, at least 256 (or
    the texture's own size when smaller).  Those maps are smooth (linear over each triangle, or a fill),
    so they are upsampled; only the photo's colours are read at full resolution."""
    return min(int(size), max(256, int(size) // 4))


def make_texture(
    image: np.ndarray,
    image_vertices: np.ndarray,
    view_normal_z: np.ndarray,
    uv_raster: Raster,
    triangles: np.ndarray,
    zbuffer: np.ndarray,
    tolerance: float = 2.0,
    size: Optional[int] = None,
):
    """UV texture (S,S,3) uint8 BGR and the photo's weight per texel (S,S) uint8, 255 = the photo alone.

    ``uv_raster`` is the face model's UV layout rasterized at ``geometry_size(S)`` (G); ``size`` is S
    (default G).  ``view_normal_z``: per-vertex cosine between the posed normal and the direction to the
    camera.  A visible texel's weight ramps from 0 at ``MIN_FACING`` to 1 at ``MIN_FACING + FACING_RAMP``;
    where it is below 1 the photo is blended with the fill (mirror texel, else push–pull), so grazing
    surfaces fade into the filled side instead of ending at a seam.

    Everything at G is float and small.  At S there are only upsamplings (texel positions, weight, fill),
    one ``cv2.remap`` of the photo (the stage's floor) and one compiled uint8 compose
    (``render_ext.compose_texture``).  With ``uv_raster`` at S itself, every map is computed at full size
    (the reference the tests compare the fast path with).
    """
    r = uv_raster
    g = r.tri_id.shape[0]
    s = g if size is None else int(size)
    attrs = np.column_stack([image_vertices, view_normal_z])
    interp = interpolate(r, triangles, attrs)
    pos, facing = interp[:, :, :3], interp[:, :, 3]
    vis = texel_visibility(pos, r.mask, zbuffer, tolerance, facing, MIN_FACING)
    weight = np.where(vis, np.clip((facing - MIN_FACING) / FACING_RAMP, 0.0, 1.0), 0.0)
    weight8 = (weight * 255.0 + 0.5).astype(np.uint8)
    xy = np.ascontiguousarray(pos[:, :, :2])
    photo_g = cv2.remap(image, xy, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    solid = weight8 == 255
    use_mirror = ~solid & solid[:, ::-1]
    fill = push_pull_fill(
        cv2.copyTo(cv2.flip(photo_g, 1), use_mirror.astype(np.uint8), photo_g), solid | use_mirror
    )
    if s != g:
        xy, weight8, fill = (
            cv2.resize(a, (s, s), interpolation=cv2.INTER_LINEAR) for a in (xy, weight8, fill)
        )
    photo = cv2.remap(image, xy, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    tex = rx.compose_texture(photo, weight8, np.ascontiguousarray(fill))
    return tex, weight8
