"""A tiny pure-numpy reference of the compiled renderer, used only by tests (slow: one triangle at a time).

Conventions (the same as ``fg3d_blender/render_ext/_raster.pyx``):
* vertices are in pixel coordinates, x = column, y = row, z = depth with larger z nearer the camera;
* pixel (r, c) is sampled at its centre, the point (x=c, y=r);
* a pixel is covered by a triangle when all three barycentric weights are >= 0 (either winding);
  weights (w0, w1, w2) belong to the triangle's vertices in their listed order;
* the nearest triangle wins; on an exact depth tie the earlier triangle is kept;
* degenerate (zero-area) triangles and triangles with out-of-range indices draw nothing.
"""

from __future__ import annotations

import numpy as np

EDGE_EPS = 1e-4  # pixels this close to an edge or to a depth tie are "ambiguous" in float32


def rasterize(verts, tris, height, width):
    """Return depth (-inf empty), tri_id (-1 empty), bary (h,w,3) and an ``ambiguous`` mask (h,w) bool.

    ``ambiguous`` marks pixels where float32 rounding may legitimately change the answer: a pixel
    centre lying on (or within EDGE_EPS of) an edge of a triangle that could cover it, or two
    triangles within EDGE_EPS of the same depth there.
    """
    v = np.asarray(verts, dtype=np.float64)
    depth = np.full((height, width), -np.inf)
    tri_id = np.full((height, width), -1, dtype=np.int64)
    bary = np.zeros((height, width, 3))
    ambiguous = np.zeros((height, width), dtype=bool)
    n = len(v)
    for t, (a, b, c) in enumerate(np.asarray(tris, dtype=np.int64)):
        if min(a, b, c) < 0 or max(a, b, c) >= n:
            continue
        (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = v[a, :3], v[b, :3], v[c, :3]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if area == 0:
            continue
        xs = np.arange(
            max(0, int(np.ceil(min(x0, x1, x2))) - 1), min(width, int(np.floor(max(x0, x1, x2))) + 2)
        )
        ys = np.arange(
            max(0, int(np.ceil(min(y0, y1, y2))) - 1), min(height, int(np.floor(max(y0, y1, y2))) + 2)
        )
        if not len(xs) or not len(ys):
            continue
        px, py = np.meshgrid(xs.astype(np.float64), ys.astype(np.float64))
        w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / area
        w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / area
        w2 = 1.0 - w0 - w1
        wmin = np.minimum(np.minimum(w0, w1), w2)
        inside = wmin >= 0
        near_edge = np.abs(wmin) < EDGE_EPS
        z = w0 * z0 + w1 * z1 + w2 * z2
        sub = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        d = depth[sub]
        ambiguous[sub] |= near_edge | (inside & np.isfinite(d) & (np.abs(z - d) < EDGE_EPS))
        win = inside & (z > d)
        d[win] = z[win]
        tri_id[sub][win] = t
        for k, w in enumerate((w0, w1, w2)):
            bary[sub][..., k][win] = w[win]
    return depth, tri_id, bary, ambiguous


def interpolate(tri_id, bary, tris, attrs):
    """Per-pixel sum of bary-weighted vertex attributes (h,w,C); 0 where tri_id < 0."""
    attrs = np.asarray(attrs, dtype=np.float64)
    out = np.zeros(tri_id.shape + (attrs.shape[1],))
    hit = tri_id >= 0
    corners = np.asarray(tris)[tri_id[hit]]  # (K,3)
    out[hit] = np.einsum("kj,kjc->kc", bary[hit], attrs[corners])
    return out


def vertex_normals(verts, tris):
    """Area-weighted vertex normals: the normalised sum of the (unnormalised) face cross products."""
    v = np.asarray(verts, dtype=np.float64)
    out = np.zeros_like(v)
    for a, b, c in np.asarray(tris):
        n = np.cross(v[b] - v[a], v[c] - v[a])
        out[a] += n
        out[b] += n
        out[c] += n
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.where(norm > 0, norm, 1), 0)


def sample_bilinear(image, points):
    """Bilinear value of an (h,w,C) map at (N,2) points (x=column, y=row), clamped to the edge pixels."""
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape[:2]
    out = np.zeros((len(points), img.shape[2]))
    for i, (x, y) in enumerate(np.asarray(points, dtype=np.float64)):
        x = min(max(x, 0.0), w - 1.0)
        y = min(max(y, 0.0), h - 1.0)
        xa, ya = int(np.floor(x)), int(np.floor(y))
        xb, yb = min(xa + 1, w - 1), min(ya + 1, h - 1)
        fx, fy = x - xa, y - ya
        out[i] = (1 - fy) * ((1 - fx) * img[ya, xa] + fx * img[ya, xb]) + fy * (
            (1 - fx) * img[yb, xa] + fx * img[yb, xb]
        )
    return out
