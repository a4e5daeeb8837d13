"""``build-expressions``: ICT-FaceKit's light-stage expression modes carried onto the BFM mesh.

1. The ICT skin (neutral mesh, cm) is moved onto the BFM mean (mm) by the similarity of their inner 51
   landmarks (the jaw landmarks of the two models mark different lines: ICT's the jaw's edge, the
   3DMM's the cheek seen from the front).
2. A smooth non-rigid ICP then deforms the ICT skin onto the BFM surface: displacements regularised by
   the mesh Laplacian (stiff first, looser later), data term point-to-plane to the nearest BFM point
   where the normals agree, the inner landmarks as soft anchors.
3. Each BFM vertex takes the closest point of the registered ICT skin (triangle + barycentric
   weights); a mode's displacement there is the barycentric mix of the ICT displacements, scaled and
   rotated by the similarity and turned by the local rotation between the ICT normal before and after
   the registration (per-vertex displacement in a local frame).  BFM vertices far from the ICT skin
   (nowhere on the face) fade to zero.

The result is written as ``models/bfm_expressions_ict.npz`` (int16 at 0.005 mm steps, compressed) with
its entry in the one manifest (role ``"expressions"``); the card is ``models/EXPRESSIONS_MODEL_CARD.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import factorized
from scipy.spatial import cKDTree

from fg3d_blender.core import render
from fg3d_blender.core.assets import models_dir, sha256_of, write_bundled
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.geometry import closest_points_on_mesh, similarity_transform, uniform_laplacian
from fg3d_blender.core.morphable import EXPRESSION_STEP_MM, FaceModel

SKIN_VERTICES = 11248  # ICT's skin: face 0..9408, head and neck 9409..11247 (shared/README.md)
FACE_VERTICES = 9409
INNER = slice(17, 68)  # iBUG-68 without the jaw line
# (Laplacian weight, iterations): stiff first, then looser
NICP_SCHEDULE = ((100.0, 3), (30.0, 3), (10.0, 3), (3.0, 3), (1.0, 4))
LANDMARK_WEIGHT = 0.5  # soft: the two models' inner landmarks differ by 1–3 mm in definition
MATCH_MM = 10.0  # nearest-point matches farther than this are ignored
MATCH_COS = 0.5  # … and those whose normals differ by more than 60°
SMOOTH_LAMBDA = 1.0  # weight of the Laplacian in the smooth fit of each carried mode
OUTLIER_MM = 0.5  # a vertex this far from its smooth fit counts half
FADE_MM = (4.0, 12.0)  # a BFM vertex this far from the ICT skin keeps all / none of the displacement


@dataclass
class ICTModel:
    neutral: np.ndarray  # (V,3) cm, skin vertices
    triangles: np.ndarray  # (T,3) int32, skin only, quads split
    landmarks: np.ndarray  # (68,) vertex indices, iBUG order
    names: List[str]  # the 53 ARKit-style blendshapes (or the 100 identities)
    modes: np.ndarray  # (53,V,3) cm, expression − neutral (or identity − neutral)


def load_ict(folder: Path, kind: str = "expression") -> ICTModel:
    """ICT-FaceKit's neutral skin, its triangles (read from the OBJ's ``f`` lines, original vertex order)
    and the modes of ``shape_modes.npz``: the 53 ARKit expression modes (``kind="expression"``) or the
    100 light-stage identity modes (``kind="identity"``, weights ~ N(0, 1))."""
    folder = Path(folder)
    need = ["shape_modes.npz", "vertex_indices.json", "generic_neutral_mesh.obj"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise FG3DError(f"{folder} is not an ICT-FaceKit folder: {', '.join(missing)} missing")
    with np.load(folder / "shape_modes.npz", allow_pickle=False) as z:
        neutral = z["neutral"].astype(np.float64)
        all_names = [str(n) for n in z[f"{kind}_names"]]
        all_modes = z[f"{kind}_modes"]
    index = json.loads((folder / "vertex_indices.json").read_text(encoding="utf-8"))
    names = list(index["expressions"]) if kind == "expression" else all_names
    modes = np.stack([all_modes[all_names.index(n)] for n in names]).astype(np.float64)
    tris = []
    with open(folder / "generic_neutral_mesh.obj", encoding="utf-8") as f:
        for line in f:
            if line.startswith("f "):
                v = [int(t.split("/")[0]) - 1 for t in line.split()[1:]]
                if max(v) < SKIN_VERTICES:
                    tris.extend([v[0], v[i], v[i + 1]] for i in range(1, len(v) - 1))
    return ICTModel(
        neutral=neutral,
        triangles=np.asarray(tris, np.int32),
        landmarks=np.asarray(index["idx_to_landmark_verts"], np.int64),
        names=names,
        modes=modes,
    )


def _normals(v: np.ndarray, tris: np.ndarray) -> np.ndarray:
    n = render.vertex_normals(v, tris).astype(np.float64)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def register(ict: ICTModel, fm: FaceModel) -> Dict[str, np.ndarray]:
    """The ICT skin deformed onto the BFM mean (mm): ``aligned`` (similarity only), ``registered``,
    the similarity (``scale``, ``rotation``, ``shift``) and the final per-vertex distance to the BFM."""
    bfm = fm.mean_mm.astype(np.float64)
    s, r, t = similarity_transform(ict.neutral[ict.landmarks[INNER]], bfm[fm.keypoints[INNER]])
    aligned = s * ict.neutral @ r.T + t
    n = len(aligned)
    lap = uniform_laplacian(n, ict.triangles)
    ltl = (lap.T @ lap).tocsc()
    bfm_tree = cKDTree(bfm)
    bfm_normals = _normals(bfm, fm.triangles)
    lm_idx = ict.landmarks[INNER]
    lm_dst = bfm[fm.keypoints[INNER]]
    x = aligned.copy()
    for stiffness, iterations in NICP_SCHEDULE:
        for _ in range(iterations):
            nx = _normals(x, ict.triangles)
            dist, j = bfm_tree.query(x)
            ok = (dist < MATCH_MM) & (np.einsum("ij,ij->i", nx, bfm_normals[j]) > MATCH_COS)
            # point-to-plane target: x moved along the BFM normal onto the tangent plane at the match
            nb = bfm_normals[j]
            target = x + nb * np.einsum("ij,ij->i", bfm[j] - x, nb)[:, None]
            w = ok.astype(np.float64)
            w_lm = np.zeros(n)
            np.add.at(w_lm, lm_idx, LANDMARK_WEIGHT)
            goal = target * w[:, None]
            np.add.at(goal, lm_idx, LANDMARK_WEIGHT * lm_dst)
            # minimise stiffness·|L d|² + Σ w |x + d − goal|²  over the displacement d from ``aligned``
            wsum = w + w_lm
            solve = factorized((stiffness * ltl + sp.diags(wsum + 1e-6)).tocsc())
            rhs = goal - wsum[:, None] * aligned
            d = np.column_stack([solve(rhs[:, k]) for k in range(3)])
            x = aligned + d
    final_dist, _ = bfm_tree.query(x)
    return {
        "aligned": aligned,
        "registered": x,
        "scale": s,
        "rotation": r,
        "shift": t,
        "distance": final_dist,
    }


def _rotations_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row rotation matrices (N,3,3) taking unit vectors a onto b (Rodrigues)."""
    v = np.cross(a, b)
    c = np.einsum("ij,ij->i", a, b)
    k = np.zeros((len(a), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -v[:, 2], v[:, 1], -v[:, 0]
    k[:, 1, 0], k[:, 2, 0], k[:, 2, 1] = v[:, 2], -v[:, 1], v[:, 0]
    f = 1.0 / np.maximum(1.0 + c, 1e-6)
    return np.eye(3)[None] + k + np.einsum("nij,njk->nik", k, k) * f[:, None, None]


# The lips and the eyelids meet at a seam: a BFM vertex just above it must follow the upper lip (lid),
# one just below it the lower, whichever the nearer surface point is.  Each seam runs through the
# corners and the midpoints of the inner landmark pairs; (corners and pairs, half-width, half-height) mm.
SEAMS = {
    1: ((60, (61, 67), (62, 66), (63, 65), 64), 8.0, 12.0),  # the lips
    2: ((36, (37, 41), (38, 40), 39), 6.0, 9.0),  # the subject's right eye
    3: ((42, (43, 47), (44, 46), 45), 6.0, 9.0),  # the subject's left eye
}


SEAM_BAND_MM = 1.5  # vertices this close to a seam line …
SEAM_BAND_WEIGHT = 0.02  # … keep this much of their closest-point data term in the smooth fit


def _seam_line(vertices: np.ndarray, landmarks: np.ndarray, points, half_w: float, half_h: float):
    """(the seam's y at each vertex's x, whether the vertex is inside the seam's box) for one seam."""
    knots = np.array([landmarks[list(p)].mean(0) if isinstance(p, tuple) else landmarks[p] for p in points])
    knots = knots[np.argsort(knots[:, 0])]
    y_seam = np.interp(vertices[:, 0], knots[:, 0], knots[:, 1])
    inside = (
        (vertices[:, 0] > knots[0, 0] - half_w)
        & (vertices[:, 0] < knots[-1, 0] + half_w)
        & (np.abs(vertices[:, 1] - y_seam) < half_h)
        & (vertices[:, 2] > knots[:, 2].min() - 25.0)
    )
    return y_seam, inside


def seam_sides(vertices: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Per vertex: +k above / −k below seam k (lips 1, eyes 2 and 3) inside its box, 0 elsewhere."""
    side = np.zeros(len(vertices), np.int64)
    for k, (points, half_w, half_h) in SEAMS.items():
        y_seam, inside = _seam_line(vertices, landmarks, points, half_w, half_h)
        side[inside] = np.where(vertices[inside, 1] >= y_seam[inside], k, -k)
    return side


def seam_band(vertices: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Vertices within SEAM_BAND_MM of a seam line.  There the BFM's rows of lip (lid) vertices cross
    the line in a zigzag, so their sides alternate; the smooth fit fills them from both sides instead
    of tearing teeth into an open mouth."""
    band = np.zeros(len(vertices), bool)
    for points, half_w, _ in SEAMS.values():
        band |= _seam_line(vertices, landmarks, points, half_w, SEAM_BAND_MM)[1]
    return band


def correspondence(ict: ICTModel, reg: Dict[str, np.ndarray], fm: FaceModel):
    """Closest point of the registered ICT skin for every BFM vertex, each side of a seam matched only
    to the same side: (distance (N,), triangle (N,), barycentric (N,3))."""
    bfm = fm.mean_mm.astype(np.float64)
    x = reg["registered"]
    bfm_side = seam_sides(bfm, bfm[fm.keypoints])
    ict_side = seam_sides(x, x[ict.landmarks])
    tri_side = np.where(
        (ict_side[ict.triangles] == ict_side[ict.triangles[:, :1]]).all(1), ict_side[ict.triangles[:, 0]], 0
    )
    dist = np.zeros(len(bfm))
    tri = np.zeros(len(bfm), np.int64)
    bary = np.zeros((len(bfm), 3))
    for label in np.unique(bfm_side):
        rows = np.flatnonzero(bfm_side == label)
        allowed = np.flatnonzero(tri_side == label) if label else np.arange(len(ict.triangles))
        d, t, b = closest_points_on_mesh(bfm[rows], x, ict.triangles[allowed])
        dist[rows], tri[rows], bary[rows] = d, allowed[t], b
    return dist, tri, bary


def transfer(ict: ICTModel, reg: Dict[str, np.ndarray], fm: FaceModel) -> Dict[str, np.ndarray]:
    """Each ICT mode carried onto the BFM vertices: ``modes`` (53,N,3) mm, and the correspondence used
    (``distance`` of each BFM vertex to the registered skin, ``fade``)."""
    bfm = fm.mean_mm.astype(np.float64)
    dist, tri, bary = correspondence(ict, reg, fm)
    fade = np.clip((FADE_MM[1] - dist) / (FADE_MM[1] - FADE_MM[0]), 0.0, 1.0)
    corners = ict.triangles[tri]  # (N,3)
    turn = _rotations_between(
        _normals(reg["aligned"], ict.triangles), _normals(reg["registered"], ict.triangles)
    )  # (V,3,3) per ICT vertex
    sim = reg["scale"] * reg["rotation"]
    raw = np.zeros((len(ict.modes), len(bfm), 3))
    for m, mode in enumerate(ict.modes):
        local = np.einsum("vij,vj->vi", turn, mode @ sim.T)  # (V,3) mm in the registered frame
        raw[m] = np.einsum("nk,nkc->nc", bary, local[corners])
    band = seam_band(bfm, bfm[fm.keypoints])
    modes, outliers = smooth_on_mesh(raw, np.where(band, SEAM_BAND_WEIGHT * fade, fade), fm.triangles)
    return {"modes": modes, "raw": raw, "distance": dist, "fade": fade, "outliers": outliers}


def smooth_on_mesh(raw: np.ndarray, weight: np.ndarray, triangles: np.ndarray):
    """Displacement fields (M,N,3) made smooth on the BFM mesh: minimise Σ w |d − raw|² + λ |L d|², then
    again with the vertices that disagree with their smooth neighbourhood (folds of the matched
    surface at the lip corners and eyelids) down-weighted.  Where ``weight`` is 0 (off the ICT skin)
    the fields are filled smoothly and fade to the data around.  Returns (fields float32, the number of
    down-weighted vertices)."""
    m, n, _ = raw.shape
    ltl = uniform_laplacian(n, triangles)
    ltl = (ltl.T @ ltl).tocsc()
    cols = raw.transpose(1, 0, 2).reshape(n, -1)  # (N, M·3)
    w = weight.astype(np.float64)
    out = cols
    for _ in range(2):
        solve = factorized((sp.diags(w + 1e-8) + SMOOTH_LAMBDA * ltl).tocsc())
        rhs = cols * w[:, None]
        out = np.column_stack([solve(rhs[:, k]) for k in range(rhs.shape[1])])
        residual = np.abs(out - cols).reshape(n, m, 3).max(axis=(1, 2))
        w = weight / (1.0 + (residual / OUTLIER_MM) ** 2)
    outliers = int(((weight > 0) & (w < 0.5 * weight)).sum())
    return out.reshape(n, m, 3).transpose(1, 0, 2).astype(np.float32), outliers


def quantise(modes: np.ndarray) -> np.ndarray:
    q = np.round(modes / EXPRESSION_STEP_MM)
    if np.abs(q).max() > np.iinfo(np.int16).max:
        raise FG3DError("an expression mode exceeds the int16 range of the compact form")
    return q.astype(np.int16)


def build(ict_dir: Path, fm: FaceModel) -> Dict[str, object]:
    """Register, transfer and quantise; returns the arrays to save and the numbers for the card."""
    t0 = time.perf_counter()
    ict = load_ict(ict_dir)
    reg = register(ict, fm)
    tr = transfer(ict, reg, fm)
    q = quantise(tr["modes"])
    outliers = tr["outliers"]
    err = np.abs(q.astype(np.float32) * EXPRESSION_STEP_MM - tr["modes"]).max()
    face = reg["registered"][:FACE_VERTICES]
    face_dist = cKDTree(fm.mean_mm).query(face)[0]
    bfm_face = fm.face_region
    stats = {
        "registration_face_to_bfm_mm": {
            "median": float(np.median(face_dist)),
            "mean": float(face_dist.mean()),
            "p95": float(np.percentile(face_dist, 95)),
        },
        "bfm_face_to_registered_mm": {
            "median": float(np.median(tr["distance"][bfm_face])),
            "mean": float(tr["distance"][bfm_face].mean()),
            "p95": float(np.percentile(tr["distance"][bfm_face], 95)),
        },
        "similarity_scale_mm_per_cm": float(reg["scale"]),
        "inner_landmark_residual_mm": float(
            np.linalg.norm(
                reg["registered"][ict.landmarks[INNER]] - fm.mean_mm[fm.keypoints[INNER]], axis=1
            ).mean()
        ),
        "quantisation_max_error_mm": float(err),
        "outliers": outliers,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return {"names": np.array(ict.names), "modes": q, "stats": stats, "float_modes": tr["modes"]}


FILE = "bfm_expressions_ict.npz"
CARD = "EXPRESSIONS_MODEL_CARD.md"
NOTICE = "ICT_FACEKIT_LICENSE.txt"
LICENCE = (
    "MIT (derived from ICT-FaceKit, Copyright (c) 2020 USC Institute for Creative Technologies; "
    f"notice in {NOTICE}); see {CARD}"
)


def write_model(out: Dict[str, object], models: Path, ict_dir: Path) -> dict:
    """Save the compact modes into ``models/``, copy ICT's MIT notice beside them, record the manifest
    entry (role ``expressions``) and write the card; returns the entry."""
    models = Path(models)
    path = models / FILE
    tmp = models / f".{FILE}.tmp.npz"
    np.savez_compressed(tmp, names=out["names"], modes=out["modes"], step_mm=np.float32(EXPRESSION_STEP_MM))
    tmp.replace(path)
    notice = (Path(ict_dir) / "LICENSE").read_text(encoding="utf-8")
    (models / NOTICE).write_text(
        f"models/{FILE} is derived from ICT-FaceKit (ICT-VGL/ICT-FaceKit, commit da5f95a, FaceXModel/).\n"
        "Its licence, which has to travel with the derived file:\n\n" + notice,
        encoding="utf-8",
    )
    stats = out["stats"]
    entry = {
        "role": "expressions",
        "path": FILE,
        "size": path.stat().st_size,
        "sha256": sha256_of(path),
        "licence": LICENCE,
        "meta": {
            "modes": len(out["names"]),
            "vertices": int(out["modes"].shape[1]),
            "step_mm": EXPRESSION_STEP_MM,
            "source": "ICT-FaceKit da5f95a FaceXModel (light-stage), 53 ARKit-style blendshapes",
        },
    }
    write_bundled(models, entry)
    (models / CARD).write_text(card_text(entry, stats), encoding="utf-8")
    return entry


def card_text(entry: dict, stats: dict) -> str:
    r, b = stats["registration_face_to_bfm_mm"], stats["bfm_face_to_registered_mm"]
    return f"""# BFM expression modes from ICT-FaceKit (`models/{entry["path"]}`)

Written by `python -m fg3d_blender build-expressions --ict ../shared/ict_facekit` (training/expressions.py);
every number below is printed by that command.

- **What:** {entry["meta"]["modes"]} expression blendshapes (ARKit names as ICT-FaceKit spells them) as
  displacements of the {entry["meta"]["vertices"]:,} BFM vertices (`tri_full` topology), millimetres,
  int16 at {entry["meta"]["step_mm"]} mm steps (max quantisation error
  {stats["quantisation_max_error_mm"]:.4f} mm),
  compressed npz, {entry["size"]:,} bytes, sha256 `{entry["sha256"]}`.
- **Source:** ICT-FaceKit (ICT-VGL/ICT-FaceKit, commit da5f95a, `FaceXModel/`): light-stage scans
  registered to one topology; MIT licence, notice in `models/{NOTICE}` (keep it with this file).
- **Method:** (1) similarity of ICT's inner 51 landmarks onto the BFM mean's (scale
  {stats["similarity_scale_mm_per_cm"]:.3f} mm per ICT cm; the jaw landmarks mark different lines in the
  two models and are left out); (2) smooth non-rigid ICP of the ICT skin onto the BFM mean (Laplacian-
  regularised displacements, stiffness 100 → 1, point-to-plane matches within {MATCH_MM:.0f} mm whose
  normals agree, inner landmarks as soft anchors); (3) each BFM vertex takes the closest point of the
  registered ICT skin, the lips' and eyelids' upper and lower sides matched only to the same side; a
  mode's displacement is the barycentric mix of ICT's, scaled and rotated by the similarity and by the
  local rotation of the surface normal (per-vertex displacement in a local frame); (4) each mode is
  fitted smoothly on the BFM mesh (Laplacian weight {SMOOTH_LAMBDA}, vertices farther than
  {OUTLIER_MM} mm from the smooth fit down-weighted; {stats.get("outliers", 0)} vertices), fading to zero
  between {FADE_MM[0]:.0f} and {FADE_MM[1]:.0f} mm from the ICT skin.
- **Registration residuals:** BFM face region (within 95 mm of the nose tip) to the registered ICT
  surface: median {b["median"]:.3f} mm, mean {b["mean"]:.3f} mm, 95th percentile {b["p95"]:.3f} mm.
  ICT face vertices to the nearest BFM vertex: median {r["median"]:.2f} mm, mean {r["mean"]:.2f} mm,
  95th percentile {r["p95"]:.2f} mm (the tail is ICT's skin inside the lips and around the eyes, which
  the BFM does not have).  Inner-landmark distance after registration:
  {stats["inner_landmark_residual_mm"]:.2f} mm.
- **Known limits:** the BFM mouth is closed (no inner lips), so `jawOpen` stretches the triangles across
  the lip seam; the eyelids of the BFM are a surface over the eye, so `eyeBlink_*` folds it.  ICT's
  `browInnerUp` comes as `browInnerUp_L/_R`.  Built in {stats["seconds"]} s on 2 CPU cores.
"""


def add_arguments(p) -> None:
    p.add_argument("--ict", required=True, metavar="DIR", help="ICT-FaceKit folder (shared/ict_facekit)")
    p.add_argument("--models", metavar="DIR", help="where to write (default: the project's models/)")


def run(args) -> int:
    fm = FaceModel()
    out = build(Path(args.ict), fm)
    entry = write_model(out, Path(args.models) if args.models else models_dir(), Path(args.ict))
    print(json.dumps({"entry": entry, "stats": out["stats"]}))
    return 0
