# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""dlib's 68-point shape predictor (a cascade of regression trees, Kazemi & Sullivan 2014), read from
dlib's own serialized file and run as dlib's ``shape_predictor`` runs it.

dlib spends ~0.9 s of every process reading that 100 MB file (each float is two variable-length
integers); ``read_shape_predictor`` reads it once into plain arrays (~0.7 s), which the caller caches, and
``predict`` then gives dlib's landmarks from them.  The same points as dlib's on every real face measured;
dlib maps the box through a least-squares affine fit (``find_affine_transform``) where this uses
w·x + left exactly, so a point that lands on a half-pixel tie to the last bit can round the other way
(seen only with crafted models).

The file (dlib's ``serialize``): an integer is one byte ``n | sign`` (n = 1..8 bytes follow, sign 0x80)
and n bytes little-endian; a float is two integers, mantissa and exponent (value = mantissa·2^exponent);
a matrix is −rows, −columns and its elements; a ``std::vector`` is its length and its elements.  A
shape predictor is version (1), the initial shape (2·P floats), the forests (per cascade: trees; per
tree: its splits (idx1, idx2, threshold) and its leaves, each a 2·P vector), the anchor point of each
feature pixel per cascade, and the pixel's offset from it.
"""

import numpy as np

from libc.math cimport floor, isfinite, ldexp

cdef enum:
    FLOAT_SPECIAL = 32000  # dlib's exponent codes for inf, -inf and nan start here


cdef struct Stream:
    const unsigned char* data
    Py_ssize_t size
    Py_ssize_t pos


cdef long long read_int(Stream* s) except? -1:
    cdef unsigned char head, n
    cdef unsigned long long v = 0
    cdef int i
    if s.pos >= s.size:
        raise ValueError("the file ends early")
    head = s.data[s.pos]
    n = head & 0x0F
    if n == 0 or n > 8 or (head & 0x70):
        raise ValueError(f"byte {s.pos} does not start a dlib integer")
    if s.pos + 1 + n > s.size:
        raise ValueError("the file ends early")
    for i in range(n):
        v |= (<unsigned long long>s.data[s.pos + 1 + i]) << (8 * i)
    s.pos += 1 + n
    if v > 0x7FFFFFFFFFFFFFFF:
        raise ValueError(f"an integer out of range before byte {s.pos}")
    if head & 0x80:
        return -<long long>v
    return <long long>v


cdef long long read_count(Stream* s, long long limit, str what) except -1:
    cdef long long v = read_int(s)
    if v < 0 or v > limit:
        raise ValueError(f"{what}: {v} is out of range")
    return v


cdef int check_room(Stream* s, double items, double min_bytes, str what) except -1:
    """The rest of the file can hold ``items`` of at least ``min_bytes`` each (before allocating; in
    double, so no count can overflow)."""
    if items * min_bytes > <double>(s.size - s.pos):
        raise ValueError(f"the file ends early ({what})")
    return 0


cdef float read_float(Stream* s) except? -1:
    cdef long long mantissa = read_int(s)
    cdef long long exponent = read_int(s)
    if exponent >= FLOAT_SPECIAL or exponent < -32768:
        raise ValueError("a non-finite number in the model")
    cdef float value = <float>ldexp(<double>mantissa, <int>exponent)
    if not isfinite(value):
        raise ValueError("a number out of range in the model")
    return value


cdef long long read_vector_length(Stream* s, long long expected, str what) except -1:
    """A matrix<float,0,1>'s length (its −rows, −columns header), checked against ``expected``."""
    cdef long long nr = read_int(s)
    cdef long long nc = read_int(s)
    if nr < 0:
        nr, nc = -nr, -nc
    if nc != 1 or (expected >= 0 and nr != expected):
        raise ValueError(f"{what}: a {nr}×{nc} matrix where a vector of {expected} was expected")
    return nr


def read_shape_predictor(const unsigned char[::1] data):
    """The arrays of a dlib shape predictor file's bytes: ``initial`` (2P,) float32, ``splits``
    (C, T, S, 2) int32 feature indices, ``thresholds`` (C, T, S) float32, ``leaves`` (C, T, S + 1, 2P)
    float32, ``anchors`` (C, F) int32, ``deltas`` (C, F, 2) float32.  Raises ValueError when the bytes
    are not such a file (or its cascades differ in size)."""
    cdef Stream s
    s.data = &data[0] if data.shape[0] else NULL
    s.size = data.shape[0]
    s.pos = 0
    cdef long long version = read_int(&s)
    if version != 1:
        raise ValueError(f"shape predictor version {version}, expected 1")
    cdef long long n2 = read_vector_length(&s, -1, "initial shape")
    if n2 < 2 or n2 % 2:
        raise ValueError("the initial shape has an odd length")
    check_room(&s, n2, 4, "initial shape")
    initial_arr = np.empty(n2, np.float32)
    cdef float[::1] initial = initial_arr
    cdef long long k
    for k in range(n2):
        initial[k] = read_float(&s)

    cdef long long n_casc = read_count(&s, 1000, "cascades")
    cdef long long n_trees = -1, n_splits = -1, n_feat = -1, c, t, j, f
    cdef int[:, :, :, ::1] splits
    cdef float[:, :, ::1] thresholds
    cdef float[:, :, :, ::1] leaves
    splits_arr = thresholds_arr = leaves_arr = None
    for c in range(n_casc):
        k = read_count(&s, 100000, "trees")
        if n_trees < 0:
            n_trees = k
        elif k != n_trees:
            raise ValueError("the cascades have different numbers of trees")
        for t in range(n_trees):
            k = read_count(&s, 1 << 16, "splits")
            if n_splits < 0:
                n_splits = k
                check_room(&s, <double>n_casc * n_trees * (n_splits + 1), 4.0 * n2, "leaves")
                splits_arr = np.empty((n_casc, n_trees, n_splits, 2), np.int32)
                thresholds_arr = np.empty((n_casc, n_trees, n_splits), np.float32)
                leaves_arr = np.empty((n_casc, n_trees, n_splits + 1, n2), np.float32)
                splits, thresholds, leaves = splits_arr, thresholds_arr, leaves_arr
            elif k != n_splits:
                raise ValueError("the trees have different numbers of splits")
            for j in range(n_splits):
                splits[c, t, j, 0] = read_count(&s, 1 << 30, "feature index")
                splits[c, t, j, 1] = read_count(&s, 1 << 30, "feature index")
                thresholds[c, t, j] = read_float(&s)
            if read_int(&s) != n_splits + 1:
                raise ValueError("a tree's leaves do not match its splits")
            for j in range(n_splits + 1):
                read_vector_length(&s, n2, "leaf")
                for k in range(n2):
                    leaves[c, t, j, k] = read_float(&s)
    if splits_arr is None:
        raise ValueError("the model has no trees")

    if read_int(&s) != n_casc:
        raise ValueError("anchors: not one list per cascade")
    cdef int[:, ::1] anchors
    anchors_arr = None
    for c in range(n_casc):
        k = read_count(&s, 1 << 20, "feature pixels")
        if n_feat < 0:
            n_feat = k
            check_room(&s, <double>n_casc * n_feat, 2.0, "anchors")
            anchors_arr = np.empty((n_casc, n_feat), np.int32)
            anchors = anchors_arr
        elif k != n_feat:
            raise ValueError("the cascades have different numbers of feature pixels")
        for f in range(n_feat):
            anchors[c, f] = read_count(&s, n2 // 2 - 1, "anchor")
    if read_int(&s) != n_casc:
        raise ValueError("deltas: not one list per cascade")
    deltas_arr = np.empty((n_casc, n_feat, 2), np.float32)
    cdef float[:, :, ::1] deltas = deltas_arr
    for c in range(n_casc):
        if read_int(&s) != n_feat:
            raise ValueError("deltas: not one per feature pixel")
        for f in range(n_feat):
            deltas[c, f, 0] = read_float(&s)
            deltas[c, f, 1] = read_float(&s)
    if s.pos != s.size:
        raise ValueError(f"{s.size - s.pos} bytes after the model")
    if splits_arr.max() >= n_feat:
        raise ValueError("a split refers to a feature pixel the cascade does not have")
    return {
        "initial": initial_arr,
        "splits": splits_arr,
        "thresholds": thresholds_arr,
        "leaves": leaves_arr,
        "anchors": anchors_arr,
        "deltas": deltas_arr,
    }


cdef inline long round_half_up(double v) nogil:
    return <long>floor(v + 0.5)  # dlib's conversion of a dpoint to a point


def predict(
    const unsigned char[:, ::1] gray,
    long left,
    long top,
    long right,
    long bottom,
    const float[::1] initial,
    const int[:, :, :, ::1] splits,
    const float[:, :, ::1] thresholds,
    const float[:, :, :, ::1] leaves,
    const int[:, ::1] anchors,
    const float[:, :, ::1] deltas,
):
    """(P, 2) int64 landmarks (x, y) in ``gray``'s pixels for the box (left, top, right, bottom), as
    dlib's ``shape_predictor(gray, rectangle(left, top, right, bottom))`` gives them.  The arrays are
    ``read_shape_predictor``'s; their shapes are checked here, the indices they hold (features, anchors)
    are the caller's to check once (``core.landmarks`` does).

    Per cascade: the similarity from the initial to the current shape (Umeyama's, in double; its linear
    part in float), each feature pixel at its anchor point plus that map of its offset (float), mapped
    into the box and rounded, then every tree's leaf added to the shape in order (float)."""
    cdef Py_ssize_t n2 = initial.shape[0], n_pts = n2 // 2
    cdef Py_ssize_t n_casc = splits.shape[0], n_trees = splits.shape[1], n_splits = splits.shape[2]
    cdef Py_ssize_t n_feat = anchors.shape[1]
    cdef long height = gray.shape[0], width = gray.shape[1]
    if (
        n2 < 2 or n2 % 2 or splits.shape[3] != 2
        or thresholds.shape[0] != n_casc or thresholds.shape[1] != n_trees
        or thresholds.shape[2] != n_splits
        or leaves.shape[0] != n_casc or leaves.shape[1] != n_trees
        or leaves.shape[2] != n_splits + 1 or leaves.shape[3] != n2
        or anchors.shape[0] != n_casc
        or deltas.shape[0] != n_casc or deltas.shape[1] != n_feat or deltas.shape[2] != 2
    ):
        raise ValueError("the predictor's arrays do not fit together")
    shape_arr = np.array(initial, np.float32)
    feat_arr = np.empty(n_feat, np.float32)
    out = np.empty((n_pts, 2), np.int64)
    cdef float[::1] cur = shape_arr
    cdef float[::1] feat = feat_arr
    cdef long long[:, ::1] parts = out
    cdef double w = right - left, h = bottom - top
    cdef double mfx, mfy, mtx, mty, sigma, a, b, cc, d, fx, fy, tx, ty
    cdef float t00, t01, t10, t11, px, py, dx, dy
    cdef long x, y
    cdef Py_ssize_t c, i, t, node, anchor, k
    cdef const float* leaf
    with nogil:
        for c in range(n_casc):
            mfx = mfy = mtx = mty = 0
            for i in range(n_pts):
                mfx += initial[2 * i]
                mfy += initial[2 * i + 1]
                mtx += cur[2 * i]
                mty += cur[2 * i + 1]
            mfx /= n_pts
            mfy /= n_pts
            mtx /= n_pts
            mty /= n_pts
            sigma = a = b = cc = d = 0
            for i in range(n_pts):
                fx = initial[2 * i] - mfx
                fy = initial[2 * i + 1] - mfy
                tx = cur[2 * i] - mtx
                ty = cur[2 * i + 1] - mty
                sigma += fx * fx + fy * fy
                a += tx * fx
                b += tx * fy
                cc += ty * fx
                d += ty * fy
            # For 2-D points Umeyama's scale·rotation is this closed form: cov = [[a, b], [c, d]] / n,
            # trace(D·S) = |(a + d, c − b)| / n, R = the rotation by the angle of (a + d, c − b).
            if sigma != 0:
                t00 = <float>((a + d) / sigma)
                t01 = <float>((b - cc) / sigma)
                t10 = <float>((cc - b) / sigma)
                t11 = <float>((a + d) / sigma)
            else:
                t00, t01, t10, t11 = 1, 0, 0, 1
            for i in range(n_feat):
                anchor = anchors[c, i]
                dx = deltas[c, i, 0]
                dy = deltas[c, i, 1]
                px = t00 * dx
                px = px + t01 * dy
                px = px + cur[2 * anchor]
                py = t10 * dx
                py = py + t11 * dy
                py = py + cur[2 * anchor + 1]
                x = round_half_up(w * <double>px + left)
                y = round_half_up(h * <double>py + top)
                if 0 <= x < width and 0 <= y < height:
                    feat[i] = gray[y, x]
                else:
                    feat[i] = 0
            for t in range(n_trees):
                node = 0
                while node < n_splits:
                    if feat[splits[c, t, node, 0]] - feat[splits[c, t, node, 1]] > thresholds[c, t, node]:
                        node = 2 * node + 1
                    else:
                        node = 2 * node + 2
                leaf = &leaves[c, t, node - n_splits, 0]
                for k in range(n2):
                    cur[k] = cur[k] + leaf[k]
        for i in range(n_pts):
            parts[i, 0] = round_half_up(w * <double>cur[2 * i] + left)
            parts[i, 1] = round_half_up(h * <double>cur[2 * i + 1] + top)
    return out
