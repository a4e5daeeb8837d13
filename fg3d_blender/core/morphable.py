"""Stage 3 — 3DMM fit: crop the face, regress pose + shape, decode the dense BFM mesh.

The regressor predicts 12 pose + 40 shape + 10 expression parameters in the Basel Face Model space of
the 4096-point PAF grid (``Model_PAF.pkl``).  The grid's identity basis is carried onto the full BFM
mean (53,215 vertices, ``tri_full``, ``BFM_UV``) by a Laplacian-regularised fit: the dense basis that
matches the grid at each grid point's place on the mesh and is smooth in between (the 4-nearest
inverse-distance weights used before drew fine ridges across cheeks and neck and crumpled the lip
seam).  The regressor's 10 expression parameters are kept in ``params`` but not applied: the only
expression basis in its assets (``w_exp_filter``) is an exact copy of the first 10 shape components.
Expression comes from ``ExpressionModes`` instead (ICT-FaceKit's blendshapes carried onto this mesh),
fitted with the identity to the landmarks by ``refit_to_landmarks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from . import render
from .assets import asset_path, bundled, load_derived, load_mat_arrays, load_pickled_arrays
from .geometry import closest_points_on_mesh, nnls, uniform_laplacian
from .onnx_models import REGRESSOR_WEIGHTS, Regressor

CROP_SIZE = 120
GRID_OFF_SURFACE_UM = 2000.0  # grid points farther than this from the BFM surface are padding
GRID_K = 4
BASIS_SMOOTHING = 0.1  # λ of the dense basis fit (grid residual ~1e-8 of the basis; ridges gone)
BASIS_IDW_PULL = 1e-4  # ε: the far ears and neck follow the nearest grid points
FOREHEAD_BORDER_Y_MM = 30.0
FOREHEAD_BORDER_PASSES = 8
# iBUG-68 index of each landmark's left-right mirror partner
MIRROR_68 = np.array(
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
)
# Priors of the landmark refit, chosen on the real scan, FRGC consistency and AFLW2000-3D together (README:
# "Choosing the refit priors").  Every looser identity prior bent the identity and measured worse in 3D,
# so the identity stays the regressor's; the expression weights are strongly sparse.
REFIT_PRIOR = 1e4
EXPRESSION_PRIOR = 1.0
EXPRESSION_L1 = 100.0
# At large yaw the landmark head's errors change with the pose and the expression modes absorb them (a
# neutral face in profile got jawOpen and mouthRollUpper): the L1 weight grows with the regressed yaw,
# × (1 + PROFILE_L1 · (|yaw| / 45°)^4): ×1.1 at 30°, ×1.5 at 45°, ×2.6 at 60°, ×4.9 at 75°.
PROFILE_L1 = 0.5
JAW_WEIGHT = 1.0
# The refit's landmark target is the landmark head averaged over the crop and two copies shifted
# diagonally by ±6 % of its side (last pass): the head's errors move with the crop, the face does not.
# Chosen on the 3D benchmarks (README, "Averaged landmark head"): scan 0.775 → 0.765 mm, FRGC 0.437 → 0.421
# mm, AFLW2000-3D 3D NME 5.114 → 5.067 % (coarse, first 300); the identity stays the first crop's (the
# shifted crops' identities, averaged in, took FRGC lower still but the scan to 0.79 mm).
HEAD_SHIFTS = ((0.0, 0.0), (0.06, 0.06), (-0.06, -0.06))
FACE_RADIUS_MM = 95.0  # the face region: vertices this close to the nose tip (NoW's crop)
EXPRESSION_STEP_MM = 0.005  # quantisation step of the shipped expression modes (int16)


@dataclass(frozen=True)
class ExpressionModes:
    """The expression blendshapes carried onto the BFM mesh (``models/bfm_expressions_ict.npz``, built by
    ``build-expressions`` from ICT-FaceKit): a face is ``identity + Σ w_k · modes[k]``, w_k in [0, 1]."""

    names: List[str]  # ARKit-style names, as ICT-FaceKit spells them
    modes: np.ndarray  # (K,N,3) float32, mm
    _sparse: Dict[float, list] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls) -> Optional[ExpressionModes]:
        """The bundled modes (sha256-verified), or None when the file is absent."""
        entry = bundled("expressions")
        if entry is None:
            return None
        with np.load(entry["file"], allow_pickle=False) as z:
            modes = z["modes"].astype(np.float32) * np.float32(z["step_mm"])
            return cls(names=[str(n) for n in z["names"]], modes=modes)

    def apply(self, weights: np.ndarray) -> np.ndarray:
        """The (N,3) displacement of the weights (K,).  The fitted weights are sparse (a handful of 53):
        only the modes with a weight are summed (~0.5 ms instead of ~4 ms for all 53)."""
        nz = np.flatnonzero(weights)
        return np.tensordot(weights[nz].astype(np.float32), self.modes[nz], axes=1)

    def sparse(self, min_mm: float) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Per mode, (the vertices it moves by more than ``min_mm``, as uint32; their (n,3) displacements
        in mm), computed once per threshold: the modes are the same for every photo."""
        if min_mm not in self._sparse:
            rows = [np.flatnonzero(np.abs(m).max(1) > min_mm).astype(np.uint32) for m in self.modes]
            self._sparse[min_mm] = [(r, m[r]) for r, m in zip(rows, self.modes)]
        return self._sparse[min_mm]


def boundary_neighbours(triangles: np.ndarray) -> Dict[int, List[int]]:
    """Each border vertex of a triangle mesh → its neighbours along the border (edges of one triangle)."""
    e = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), 1)
    n = int(triangles.max()) + 1
    keys, count = np.unique(e[:, 0].astype(np.int64) * n + e[:, 1], return_counts=True)  # 1-D: 15× faster
    out: Dict[int, List[int]] = {}
    for a, b in zip(*np.divmod(keys[count == 1], n)):
        out.setdefault(int(a), []).append(int(b))
        out.setdefault(int(b), []).append(int(a))
    return out


def smooth_forehead_border(vertices_um: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """The BFM's upper border (forehead, temples: above FOREHEAD_BORDER_Y_MM) is a staircase of the
    scan grid, a sawtooth of up to ~1 mm in every render.  Each border vertex there moves toward the
    middle of its two border neighbours (FOREHEAD_BORDER_PASSES passes of weight ½): the saw drops to
    ~0.05 mm, no vertex moves more than ~0.9 mm and no triangle flips (tests/test_expressions.py)."""
    nb = boundary_neighbours(triangles)
    top = np.array(
        [k for k, n in nb.items() if len(n) == 2 and vertices_um[k, 1] > FOREHEAD_BORDER_Y_MM * 1000]
    )
    left = np.array([nb[k][0] for k in top])
    right = np.array([nb[k][1] for k in top])
    v = vertices_um.copy()
    for _ in range(FOREHEAD_BORDER_PASSES):
        v[top] = 0.5 * v[top] + 0.25 * (v[left] + v[right])
    return v


class FaceModel:
    """The Basel Face Model data the pipeline needs, in millimetres (BFM files are in micrometres), and
    its UV layout's rasters (one per size, made on first use)."""

    def __init__(self):
        self._uv_rasters: Dict[int, render.Raster] = {}
        paf = load_pickled_arrays("beyond3dmm/Model_PAF.pkl")
        self.grid_mean = paf["mu_filter"].reshape(3, -1, order="F").T.astype(np.float64)  # (4096,3) µm
        w = paf["w_filter"].astype(np.float64)  # (12288, 40)
        self.grid_basis = w.reshape(3, -1, w.shape[1], order="F").transpose(1, 0, 2)  # (4096,3,40) µm
        u = np.load(asset_path("beyond3dmm/u_shp.npy"), allow_pickle=False) + np.load(
            asset_path("beyond3dmm/u_exp.npy"), allow_pickle=False
        )
        self.mean_um = u.reshape(3, -1, order="F").T.astype(np.float64)  # (53215,3)
        self.triangles = np.ascontiguousarray(
            load_mat_arrays("beyond3dmm/tri_full.mat")["tri_full"].T.astype(np.int32)
        )
        self._orient_outward()
        self.uvs = load_mat_arrays("beyond3dmm/BFM_UV.mat")["UV"].astype(np.float32)
        self.keypoints = (
            load_mat_arrays("beyond3dmm/keypoints68.mat")["keypoints"].ravel().astype(np.int64) - 1
        )
        stats = load_pickled_arrays("3ddfa_v2/param_mean_std_62d_120x120.pkl")
        self.param_mean = stats["mean"].astype(np.float32)
        self.param_std = stats["std"].astype(np.float32)
        # dense identity basis on the full mesh, µm per unit parameter: (N, 3, 40)
        self.basis_um = self._dense_basis()
        self.mean_um = smooth_forehead_border(self.mean_um, self.triangles)

    def _orient_outward(self):
        """Make triangle winding counter-clockwise seen from outside, so normals point outward."""
        n = render.vertex_normals(self.mean_um, self.triangles)
        centred = self.mean_um - self.mean_um.mean(0)
        if float(np.sum(n * centred)) < 0:
            self.triangles = np.ascontiguousarray(self.triangles[:, ::-1])

    def _dense_basis(self) -> np.ndarray:
        """The grid basis carried onto the full mesh (made once, ~10 s, cached as a derived file):
        minimise |P d − grid|² + λ |L d|² + ε |d − d_idw|², with P the barycentric weights of each
        on-surface grid point's closest mesh point, L the mesh Laplacian and d_idw the old 4-nearest
        inverse-distance transfer, which only steers the far ears and neck the grid does not reach."""
        arrays = load_derived("bfm_dense_basis_v2.npz", lambda: {"basis_um": self._solve_dense_basis()})
        return arrays["basis_um"]

    def _solve_dense_basis(self) -> np.ndarray:
        import scipy.sparse as sp  # only to make the derived file (~10 s, once)
        from scipy.sparse.linalg import factorized  # as above: the derived file only
        from scipy.spatial import cKDTree  # as above: the derived file only

        n, k = len(self.mean_um), self.grid_basis.shape[2]
        dist, tri, bary = closest_points_on_mesh(self.grid_mean, self.mean_um, self.triangles)
        on = np.flatnonzero(dist < GRID_OFF_SURFACE_UM)
        rows = np.repeat(np.arange(len(on)), 3)
        p = sp.csr_matrix((bary[on].ravel(), (rows, self.triangles[tri[on]].ravel())), shape=(len(on), n))
        lap = uniform_laplacian(n, self.triangles)
        d, j = cKDTree(self.grid_mean[on]).query(self.mean_um, k=GRID_K)
        w = 1.0 / np.maximum(d, 1.0) ** 2
        idw = np.einsum("nk,nkcj->ncj", w / w.sum(1, keepdims=True), self.grid_basis[on][j]).reshape(n, -1)
        solve = factorized(
            (p.T @ p + BASIS_SMOOTHING * (lap.T @ lap) + BASIS_IDW_PULL * sp.identity(n)).tocsc()
        )
        rhs = p.T @ self.grid_basis[on].reshape(len(on), -1) + BASIS_IDW_PULL * idw
        basis = np.column_stack([solve(rhs[:, c]) for c in range(rhs.shape[1])])
        return basis.reshape(n, 3, k).astype(np.float32)

    @cached_property
    def mean_mm(self) -> np.ndarray:
        return (self.mean_um / 1000.0).astype(np.float32)

    def shape_mm(self, alpha_shp: np.ndarray) -> np.ndarray:
        """Identity shape (N,3) in mm for 40 shape parameters."""
        flat = self._basis_flat @ alpha_shp.astype(np.float32)  # one BLAS matrix-vector product
        return (self._mean_um32 + flat.reshape(-1, 3)) * np.float32(1e-3)

    def face_vertices(self, alpha_shp: np.ndarray, expression: Optional[np.ndarray] = None) -> np.ndarray:
        """The identity shape plus the expression (N,3) in mm (identity alone without expression)."""
        return self.with_expression(self.shape_mm(alpha_shp), expression)

    def with_expression(self, identity: np.ndarray, expression: Optional[np.ndarray]) -> np.ndarray:
        """An identity shape (N,3, mm) with the expression weights applied (unchanged without them)."""
        if expression is not None and self.expressions is not None:
            return identity + self.expressions.apply(expression)
        return identity

    @cached_property
    def _basis_flat(self) -> np.ndarray:
        return self.basis_um.reshape(-1, self.basis_um.shape[2])

    @cached_property
    def _mean_um32(self) -> np.ndarray:
        return self.mean_um.astype(np.float32)

    @cached_property
    def expressions(self) -> Optional[ExpressionModes]:
        """The bundled expression modes, loaded on first use (None when not installed)."""
        return ExpressionModes.load()

    @cached_property
    def keypoint_basis(self) -> np.ndarray:
        """(68,3,40+K) float64 mm per unit coefficient at the 68 landmarks: identity, then expression."""
        basis = self.basis_um[self.keypoints].astype(np.float64) / 1000.0
        if self.expressions is not None:
            modes = self.expressions.modes[:, self.keypoints].transpose(1, 2, 0).astype(np.float64)
            basis = np.concatenate([basis, modes], 2)
        return basis

    def keypoint_vertices(self, alpha_shp: np.ndarray, expression: Optional[np.ndarray] = None) -> np.ndarray:
        """``face_vertices(…)[keypoints]`` from the 68 keypoint rows alone (no dense decode)."""
        coef = alpha_shp.astype(np.float64)
        if expression is not None and self.expressions is not None:
            coef = np.concatenate([coef, expression.astype(np.float64)])
        kp = self.mean_um[self.keypoints] / 1000.0 + self.keypoint_basis[:, :, : len(coef)] @ coef
        return kp.astype(np.float32)

    @cached_property
    def face_region(self) -> np.ndarray:
        """Boolean mask of the mean's vertices within FACE_RADIUS_MM of the nose tip (landmark 30)."""
        tip = self.mean_mm[self.keypoints[30]]
        return np.linalg.norm(self.mean_mm - tip, axis=1) < FACE_RADIUS_MM

    @cached_property
    def pncc_colors(self) -> np.ndarray:
        """The PNCC code of each vertex (normalised mean-shape coordinates)."""
        return render.pncc_colors(self.mean_mm)

    def uv_raster(self, size: int) -> render.Raster:
        """The UV layout rasterized at size×size (made once per size; callers share it, read-only)."""
        if size not in self._uv_rasters:
            self._uv_rasters[size] = render.uv_raster(self.uvs, self.triangles, size)
        return self._uv_rasters[size]

    def to_uv(self, attrs: np.ndarray, size: int) -> np.ndarray:
        """Per-vertex attributes (N[,C]) → (size,size[,C]) UV map (0 outside the layout)."""
        return render.interpolate(self.uv_raster(size), self.triangles, attrs)

    def from_uv(self, uv_map: np.ndarray) -> np.ndarray:
        """(S,S[,C]) UV map → per-vertex values at each vertex's UV."""
        return render.from_uv(uv_map, self.uvs)


BACKENDS = ("onnxruntime", "torch")


def load_face_regressor(threads: int = 1, backend: str = "onnxruntime"):
    """3DDFA_V2's MobileNet (``mb05_120x120.pth``, verified): on onnxruntime with ``threads`` threads, or
    with ``backend="torch"`` the torch module in eval mode (the comparisons; it imports torch).  Either
    has ``predict(crops) -> (params, landmarks)``."""
    if backend == "torch":
        from .mobilenet import load_regressor  # why: torch, only for the comparisons and training

        return load_regressor(asset_path(REGRESSOR_WEIGHTS))
    if backend != "onnxruntime":
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    return Regressor.load(threads)


@dataclass
class Fit:
    params: np.ndarray  # (62,) de-whitened: 12 pose (3×4 matrix), 40 shape, 10 expression (unused)
    roi_box: np.ndarray  # (4,) crop box in image pixels of the final pass
    vertices: Optional[np.ndarray]  # (N,3) float32 shape, mm, BFM frame (x right, y up, z to the viewer);
    # None only inside fit_3dmm, for passes whose mesh is not kept (decode/refit with dense=False)
    A: np.ndarray  # (3,3) image_vertices = vertices @ A.T + b  (x col, y row, z toward camera, px)
    b: np.ndarray  # (3,)
    head_landmarks: Optional[np.ndarray] = None  # (68,2) the landmark head's prediction (last pass), image px
    expression: Optional[np.ndarray] = None  # (K,) weights of FaceModel.expressions, in [0, 1]
    vertices_neutral: Optional[np.ndarray] = None  # (N,3) the identity alone (decoded once, with vertices)

    def project(self, vertices: np.ndarray) -> np.ndarray:
        return (vertices @ self.A.T + self.b).astype(np.float32)

    def expression_named(self, fm: FaceModel) -> Dict[str, float]:
        """The expression weights by blendshape name (empty without expression)."""
        if self.expression is None or fm.expressions is None:
            return {}
        return {n: float(w) for n, w in zip(fm.expressions.names, self.expression)}

    @property
    def rotation(self) -> np.ndarray:
        """Orthonormal head rotation in the BFM frame (y up)."""
        m = np.diag([1.0, -1.0, 1.0]) @ self.A
        u, _, vt = np.linalg.svd(m)
        r = u @ vt
        return r if np.linalg.det(r) > 0 else -r

    @property
    def scale(self) -> float:
        """Pixels per millimetre."""
        return float(np.abs(np.linalg.det(self.A)) ** (1.0 / 3.0))

    @property
    def pose_degrees(self) -> dict:
        """Degrees: yaw (+ = face turned toward the photo's right side), pitch (+ = head tilted down),
        roll (in-plane)."""
        r = self.rotation
        yaw = np.arcsin(np.clip(r[0, 2], -1, 1))
        pitch = np.arctan2(-r[1, 2], r[2, 2])
        roll = np.arctan2(-r[0, 1], r[0, 0])
        return {
            "yaw": float(np.degrees(yaw)),
            "pitch": float(np.degrees(pitch)),
            "roll": float(np.degrees(roll)),
        }


def roi_from_landmarks(pts: np.ndarray) -> np.ndarray:
    """Square crop around 2D points, side = the diagonal of their bounding square (3DDFA_V2's rule)."""
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * np.sqrt(2.0)
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float64)


def shifted(roi: np.ndarray, d) -> np.ndarray:
    """The crop box moved by ``d`` = (dx, dy) times its side."""
    side = roi[2] - roi[0]
    return roi + np.array([d[0], d[1], d[0], d[1]]) * side


def in_image(points: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """Points in the pixels of the ``CROP_SIZE`` crop of ``roi`` (``crop_resize``'s) in image pixels."""
    return points * ((roi[2] - roi[0]) / CROP_SIZE) + roi[:2]


def crop_resize(image: np.ndarray, roi: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The roi box resampled to size×size (zero outside the photo), in one affine warp."""
    sx = (roi[2] - roi[0]) / size
    sy = (roi[3] - roi[1]) / size
    m = np.array([[1 / sx, 0, -roi[0] / sx], [0, 1 / sy, -roi[1] / sy]], dtype=np.float64)
    flags = cv2.INTER_AREA if sx > 2 else cv2.INTER_LINEAR
    return cv2.warpAffine(image, m, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def regress(crops: np.ndarray, fm: FaceModel, net, flip: bool = True):
    """Batch of BGR uint8 crops (B,120,120,3) → (de-whitened parameters (B,62), landmarks (B,68,2)).

    The landmarks come from the regressor's second head (``fc_lm``), in crop pixels: it predicts
    x (68) then y (68), each as c / 60 − 1.  With ``flip`` the mirrored crops run in the same batch
    and their landmarks, mirrored back, are averaged in (lower error on AFLW2000-3D, see README).
    ``net`` is ``load_face_regressor``'s (onnxruntime, or the torch module): anything with ``predict``.
    """
    b = len(crops)
    if flip:
        crops = np.concatenate([crops, crops[:, :, ::-1]])
    x = crops.transpose(0, 3, 1, 2).astype(np.float32)
    x = (x - np.float32(127.5)) / np.float32(128.0)
    out, lm = net.predict(x)
    lm = (lm.reshape(-1, 2, 68).transpose(0, 2, 1) + 1.0) * (CROP_SIZE / 2.0)
    if flip:
        mirrored = lm[b:, MIRROR_68].copy()
        mirrored[:, :, 0] = CROP_SIZE - 1 - mirrored[:, :, 0]
        lm = 0.5 * (lm[:b] + mirrored)
    return out[:b] * fm.param_std + fm.param_mean, lm


def decode(params: np.ndarray, roi: np.ndarray, fm: FaceModel, dense: bool = True) -> Fit:
    """The regressor's parameters as a Fit; ``dense=False`` skips the mesh (``vertices`` None) for a fit
    whose mesh would be thrown away (the refit replaces it, or only the landmarks are needed)."""
    p = params[:12].reshape(3, 4).astype(np.float64)
    verts = fm.shape_mm(params[12:52]) if dense else None
    sx = (roi[2] - roi[0]) / CROP_SIZE
    sy = (roi[3] - roi[1]) / CROP_SIZE
    s = (sx + sy) / 2
    A = np.diag([sx, -sy, s]) @ p[:, :3] * 1000.0
    b = np.array([(p[0, 3] - 1) * sx + roi[0], (CROP_SIZE - p[1, 3]) * sy + roi[1], (p[2, 3] - 1) * s])
    return Fit(
        params=params.astype(np.float32),
        roi_box=roi.astype(np.float32),
        vertices=verts,
        A=A,
        b=b,
        vertices_neutral=verts,
    )


@dataclass(frozen=True)
class RefitPriors:
    """Weights of the landmark refit (chosen on the real-scan benchmark, see README).  Residuals are in
    millimetres (landmark pixels divided by the fit's pixels per mm), so the priors do not depend on
    the photo's resolution."""

    identity: float = REFIT_PRIOR  # × 1/std² of each identity parameter, pulling toward the regressor's
    expression: float = EXPRESSION_PRIOR  # L2 weight of the expression weights (mm² per unit weight²)
    sparsity: float = EXPRESSION_L1  # L1 weight of the (non-negative) expression weights, frontal
    profile: float = PROFILE_L1  # growth of that L1 weight with the yaw (``sparsity_at``)
    jaw: float = JAW_WEIGHT  # weight of the 17 jaw-line landmarks (silhouette points in profile)

    def sparsity_at(self, yaw_degrees: float) -> float:
        """The L1 weight of the expression at this yaw (degrees)."""
        return self.sparsity * (1.0 + self.profile * (abs(yaw_degrees) / 45.0) ** 4)


DEFAULT_PRIORS = RefitPriors()


def _bounded_solve(a: np.ndarray, b: np.ndarray, n_free: int) -> np.ndarray:
    """argmin |a x − b|² with x[:n_free] free and x[n_free:] in [0, 1].  The free block is eliminated by
    its QR (what is left is a projected least squares in the bounded block), that block is solved by
    NNLS, clipped at 1 (rarely reached), and the free block recovered: ~0.3 ms for 40 + 53 unknowns,
    against ~10 ms for a general bounded solver."""
    q, r = np.linalg.qr(a[:, :n_free])
    rest = a[:, n_free:]
    proj = rest - q @ (q.T @ rest)
    e = nnls(proj, b - q @ (q.T @ b))
    e = np.minimum(e, 1.0)
    free = np.linalg.solve(r, q.T @ (b - rest @ e))
    return np.concatenate([free, e])


def refit_to_landmarks(
    fit: Fit,
    landmarks: np.ndarray,
    fm: FaceModel,
    priors: RefitPriors = DEFAULT_PRIORS,
    iters: int = 3,
    dense: bool = True,
) -> Fit:
    """Regularised least-squares refit of the camera, the 40 identity parameters and (when the face
    model has them) the expression weights, each in [0, 1], to 68 2D landmarks.

    Alternates (1) a scaled-orthographic camera fitted to the landmarks and (2) identity and
    expression solved jointly, bounded, the identity pulled toward the regressor's estimate with
    weight ``priors.identity`` / std², the expression toward neutral (L2 + L1, so few are used; the L1
    weight grows with the regressed yaw, ``RefitPriors.sparsity_at``).  An open mouth or a smile is so
    explained by expression, not by bending the identity.
    """
    ex = fm.expressions
    basis = fm.keypoint_basis  # (68,3,40+K) mm
    n_id = fm.basis_um.shape[2]
    k = basis.shape[2]
    mean = fm.mean_um[fm.keypoints] / 1000.0  # (68,3) mm
    x0 = np.zeros(k)
    x0[:n_id] = fit.params[12:52]
    x = x0.copy()
    if fit.expression is not None and ex is not None:
        x[n_id:] = fit.expression
    prior = np.zeros(k)
    prior[:n_id] = priors.identity / fm.param_std[12:52].astype(np.float64) ** 2
    prior[n_id:] = priors.expression
    target = x0.copy()  # the L1 term of the non-negative weights folds into the L2 target: −l1 / l2
    target[n_id:] = -priors.sparsity_at(fit.pose_degrees["yaw"]) / max(priors.expression, 1e-9)
    lw = np.ones(68)
    lw[:17] = priors.jaw
    lm = landmarks.astype(np.float64)
    a2 = fit.A[:2]
    b2 = fit.b[:2]
    for _ in range(iters):
        v = mean + basis @ x
        sol, *_ = np.linalg.lstsq(
            np.column_stack([v, np.ones(len(v))]) * lw[:, None], lm * lw[:, None], rcond=None
        )
        u, sv, vt = np.linalg.svd(sol[:3].T, full_matrices=False)
        a2, b2 = sv.mean() * (u @ vt), sol[3]
        scale = sv.mean()
        # landmark residuals in mm: (a2 / scale) · (mean + basis x) + b2 / scale ≈ lm / scale
        jac = (np.einsum("ij,kjl->kil", a2, basis) * (lw / scale)[:, None, None]).reshape(-1, k)
        rhs = (((lm - b2 - mean @ a2.T) / scale) * lw[:, None]).reshape(-1)
        sq = np.sqrt(prior)
        a_mat = np.vstack([jac, np.diag(sq)])
        b_vec = np.concatenate([rhs, sq * target])
        x = (
            np.linalg.solve(a_mat.T @ a_mat, a_mat.T @ b_vec)
            if ex is None
            else _bounded_solve(a_mat, b_vec, n_id)
        )
    scale = float(np.linalg.norm(a2[0]))
    row3 = np.cross(a2[0], a2[1]) / scale
    if np.dot(row3, fit.A[2]) < 0:
        row3 = -row3
    A = np.vstack([a2, row3])
    params = fit.params.copy()
    params[12:52] = x[:n_id]
    expression = x[n_id:].astype(np.float32) if ex is not None else None
    neutral = fm.shape_mm(params[12:52]) if dense else None
    return Fit(
        params=params,
        roi_box=fit.roi_box,
        vertices=fm.with_expression(neutral, expression) if dense else None,
        A=A,
        b=np.array([b2[0], b2[1], fit.b[2]]),
        head_landmarks=fit.head_landmarks,
        expression=expression,
        vertices_neutral=neutral,
    )


def fit_3dmm(
    image: np.ndarray,
    landmarks: np.ndarray,
    fm: FaceModel,
    net,
    passes: int = 2,
    refit: bool = True,
    priors: RefitPriors = DEFAULT_PRIORS,
) -> Fit:
    """Regress the 3DMM from a crop around ``landmarks``; later passes re-crop from the fit's own 68.

    With ``refit`` the camera and shape are then refitted to the regressor's landmark head, whose
    last-pass prediction (averaged over the ``HEAD_SHIFTS`` crops) is kept in ``Fit.head_landmarks``
    (FGNet's landmark target in training).
    """
    roi = roi_from_landmarks(landmarks)
    fit = None
    passes = max(1, passes)
    for i in range(passes):
        last = i == passes - 1  # only the last pass's mesh is kept: earlier ones need the 68 points
        rois = [shifted(roi, d) for d in (HEAD_SHIFTS if last and refit else HEAD_SHIFTS[:1])]
        params, lm = regress(np.stack([crop_resize(image, r) for r in rois]), fm, net)
        fit = decode(params[0], roi, fm, dense=last and not refit)
        heads = [in_image(lm[k], r) for k, r in enumerate(rois)]
        fit.head_landmarks = np.mean(heads, axis=0).astype(np.float32)
        if refit:
            fit = refit_to_landmarks(fit, fit.head_landmarks, fm, priors, dense=last)
        if not last:
            roi = roi_from_landmarks(
                fit.project(fm.keypoint_vertices(fit.params[12:52], fit.expression))[:, :2]
            )
    return fit
