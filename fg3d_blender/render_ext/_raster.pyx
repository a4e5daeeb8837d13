# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled z-buffer rasterizer: the one primitive every render in the pipeline is built from.

``rasterize`` scan-converts a triangle mesh whose vertices are already in pixel coordinates
(x = column, y = row, z = depth, larger z = nearer the camera) and returns, per pixel, the depth,
the id of the nearest triangle and its barycentric weights.  Depth maps, PNCC images, visibility,
UV-space maps and texture look-ups are all interpolations over that buffer (``interpolate``).
Pixel (r, c) is sampled at its centre, the point (c, r).
"""
import numpy as np
cimport numpy as cnp
from libc.math cimport floor, ceil, sqrt, INFINITY

cnp.import_array()


def rasterize(const float[:, ::1] verts, const int[:, ::1] tris, int height, int width):
    """Return (depth (h,w) float32, -inf outside; tri_id (h,w) int32, -1 outside; bary (h,w,3) float32)."""
    depth_np = np.full((height, width), -np.inf, dtype=np.float32)
    tri_np = np.full((height, width), -1, dtype=np.int32)
    bary_np = np.zeros((height, width, 3), dtype=np.float32)
    cdef float[:, ::1] depth = depth_np
    cdef int[:, ::1] tri_id = tri_np
    cdef float[:, :, ::1] bary = bary_np
    cdef Py_ssize_t t, n_tri = tris.shape[0], n_vert = verts.shape[0]
    cdef int i0, i1, i2, x, y, xmin, xmax, ymin, ymax
    cdef float x0, y0, z0, x1, y1, z1, x2, y2, z2, area, inv, w0, w1, w2, z, px, py
    if tris.shape[1] != 3 or verts.shape[1] < 3:
        raise ValueError("verts must be (N,3) and tris (M,3)")
    with nogil:
        for t in range(n_tri):
            i0 = tris[t, 0]; i1 = tris[t, 1]; i2 = tris[t, 2]
            if i0 < 0 or i1 < 0 or i2 < 0 or i0 >= n_vert or i1 >= n_vert or i2 >= n_vert:
                continue
            x0 = verts[i0, 0]; y0 = verts[i0, 1]; z0 = verts[i0, 2]
            x1 = verts[i1, 0]; y1 = verts[i1, 1]; z1 = verts[i1, 2]
            x2 = verts[i2, 0]; y2 = verts[i2, 1]; z2 = verts[i2, 2]
            area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
            if area > -1e-12 and area < 1e-12:
                continue
            inv = 1.0 / area
            xmin = <int>ceil(min(x0, min(x1, x2))); xmax = <int>floor(max(x0, max(x1, x2)))
            ymin = <int>ceil(min(y0, min(y1, y2))); ymax = <int>floor(max(y0, max(y1, y2)))
            if xmin < 0: xmin = 0
            if ymin < 0: ymin = 0
            if xmax > width - 1: xmax = width - 1
            if ymax > height - 1: ymax = height - 1
            for y in range(ymin, ymax + 1):
                py = y
                for x in range(xmin, xmax + 1):
                    px = x
                    w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) * inv
                    w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) * inv
                    w2 = 1.0 - w0 - w1
                    if w0 < -1e-6 or w1 < -1e-6 or w2 < -1e-6:
                        continue
                    z = w0 * z0 + w1 * z1 + w2 * z2
                    if z > depth[y, x]:
                        depth[y, x] = z
                        tri_id[y, x] = <int>t
                        bary[y, x, 0] = w0
                        bary[y, x, 1] = w1
                        bary[y, x, 2] = w2
    return depth_np, tri_np, bary_np


def interpolate(const int[:, ::1] tri_id, const float[:, :, ::1] bary, const int[:, ::1] tris,
                const float[:, ::1] attrs):
    """Per-pixel barycentric interpolation of per-vertex attributes (N,C) → (h,w,C); 0 where empty."""
    cdef Py_ssize_t h = tri_id.shape[0], w = tri_id.shape[1], c_n = attrs.shape[1]
    out_np = np.zeros((h, w, c_n), dtype=np.float32)
    cdef float[:, :, ::1] out = out_np
    cdef Py_ssize_t y, x, c
    cdef int t, a, b, d
    with nogil:
        for y in range(h):
            for x in range(w):
                t = tri_id[y, x]
                if t < 0:
                    continue
                a = tris[t, 0]; b = tris[t, 1]; d = tris[t, 2]
                for c in range(c_n):
                    out[y, x, c] = (bary[y, x, 0] * attrs[a, c] + bary[y, x, 1] * attrs[b, c]
                                    + bary[y, x, 2] * attrs[d, c])
    return out_np


def vertex_normals(const float[:, ::1] verts, const int[:, ::1] tris):
    """Area-weighted unit vertex normals (N,3) of a triangle mesh."""
    cdef Py_ssize_t n = verts.shape[0], m = tris.shape[0], t, i
    out_np = np.zeros((n, 3), dtype=np.float32)
    cdef float[:, ::1] out = out_np
    cdef int a, b, c
    cdef float ux, uy, uz, vx, vy, vz, nx, ny, nz, norm
    with nogil:
        for t in range(m):
            a = tris[t, 0]; b = tris[t, 1]; c = tris[t, 2]
            ux = verts[b, 0] - verts[a, 0]; uy = verts[b, 1] - verts[a, 1]; uz = verts[b, 2] - verts[a, 2]
            vx = verts[c, 0] - verts[a, 0]; vy = verts[c, 1] - verts[a, 1]; vz = verts[c, 2] - verts[a, 2]
            nx = uy * vz - uz * vy; ny = uz * vx - ux * vz; nz = ux * vy - uy * vx
            out[a, 0] += nx; out[a, 1] += ny; out[a, 2] += nz
            out[b, 0] += nx; out[b, 1] += ny; out[b, 2] += nz
            out[c, 0] += nx; out[c, 1] += ny; out[c, 2] += nz
        for i in range(n):
            norm = sqrt(out[i, 0] * out[i, 0] + out[i, 1] * out[i, 1] + out[i, 2] * out[i, 2])
            if norm > 0:
                out[i, 0] /= norm; out[i, 1] /= norm; out[i, 2] /= norm
    return out_np


def sample_bilinear(const float[:, :, ::1] image, const float[:, ::1] points):
    """Bilinear look-up of an (h,w,C) map at (N,2) points given as (x=column, y=row); clamped at edges."""
    cdef Py_ssize_t h = image.shape[0], w = image.shape[1], c_n = image.shape[2]
    cdef Py_ssize_t n = points.shape[0], i, c
    out_np = np.zeros((n, c_n), dtype=np.float32)
    cdef float[:, ::1] out = out_np
    cdef float x, y, fx, fy
    cdef int x0, y0, x1, y1
    with nogil:
        for i in range(n):
            x = min(max(points[i, 0], 0.0), w - 1.0)
            y = min(max(points[i, 1], 0.0), h - 1.0)
            x0 = <int>floor(x); y0 = <int>floor(y)
            x1 = x0 + 1 if x0 + 1 < w else x0
            y1 = y0 + 1 if y0 + 1 < h else y0
            fx = x - x0; fy = y - y0
            for c in range(c_n):
                out[i, c] = ((1 - fy) * ((1 - fx) * image[y0, x0, c] + fx * image[y0, x1, c])
                             + fy * ((1 - fx) * image[y1, x0, c] + fx * image[y1, x1, c]))
    return out_np



def compose_texture(const unsigned char[:, :, ::1] photo, const unsigned char[:, ::1] weight,
                    const unsigned char[:, :, ::1] fill):
    """The texture's last pass, one read of each (S,S) map: ``photo`` (S,S,3) blended by ``weight``
    (S,S; 255 = the photo alone, 0 = the fill alone) with the fill, which is the left–right mirror texel
    (column S−1−c) where that one has weight 255, else ``fill`` (S,S,3).  Returns (S,S,3) uint8."""
    cdef Py_ssize_t s = photo.shape[0], r, c, k, m
    if (photo.shape[1] != s or weight.shape[0] != s or weight.shape[1] != s or fill.shape[0] != s
            or fill.shape[1] != s):
        raise ValueError("photo, weight and fill must all be S×S")
    out_np = np.empty((s, s, 3), dtype=np.uint8)
    cdef unsigned char[:, :, ::1] out = out_np
    if s == 0:
        return out_np
    cdef const unsigned char* ph = &photo[0, 0, 0]
    cdef const unsigned char* wt = &weight[0, 0]
    cdef const unsigned char* fl = &fill[0, 0, 0]
    cdef unsigned char* o = &out[0, 0, 0]
    cdef const unsigned char* src
    cdef unsigned int w, v
    cdef Py_ssize_t i, j
    with nogil:
        for r in range(s):
            for c in range(s):
                i = r * s + c
                w = wt[i]
                if w == 255:
                    o[3 * i] = ph[3 * i]; o[3 * i + 1] = ph[3 * i + 1]; o[3 * i + 2] = ph[3 * i + 2]
                    continue
                m = r * s + s - 1 - c
                src = ph + 3 * m if wt[m] == 255 else fl + 3 * i
                for k in range(3):
                    v = ph[3 * i + k] * w + src[k] * (255 - w) + 127
                    o[3 * i + k] = <unsigned char>(v // 255)
    return out_np
