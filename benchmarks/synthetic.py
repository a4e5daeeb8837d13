"""``bench synthetic``: the product on held-out synthetic faces of known shape (``training.synthetic``).

The held-out draws (identities from their own seeds, textures, lighting and backgrounds from held-out
photos only) are rendered again and reconstructed by the product's pipeline (detection, coarse fit,
FGNet through onnxruntime).  Each mesh is compared with the drawn shape vertex by vertex (the same
topology) after a similarity alignment, over the face region: ``coarse_mm`` and ``refined_mm``, by |yaw|.

Also measured: ``detail_mm``, the high-frequency part of the refinement (its UV map minus a Gaussian
low-pass of ``DETAIL_SIGMA`` texels); and ``detail_lighting_corr``, the correlation of those detail maps
(their component along the surface normal) for two renders of the same held-out face under two real
photos' lightings: fine detail that is shape, not shading noise, correlates.  ``--figure PNG`` writes rows
photo | coarse | refined | truth | coarse error | refined error.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np

from fg3d_blender.core import render
from fg3d_blender.core.geometry import similarity_align
from fg3d_blender.core.pipeline import Reconstructor
from training import synthetic
from training.cache import is_holdout, load_cache
from training.views import drawn_face

from .fgnet_figure import _shade

DETAIL_SIGMA = 2.0  # texels of the 128² UV map
DETAIL_UV = 128
ERROR_RANGE_MM = 6.0  # the error panels' colour scale
PANEL = 200


def aligned_error(mesh: np.ndarray, truth: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per-vertex distance (mm) over ``region`` of ``mesh``, similarity-aligned onto the truth there (in
    the truth's millimetres, so a smaller mesh gains nothing)."""
    m, t = mesh.astype(np.float64), truth.astype(np.float64)
    moved = similarity_align(m[region], t[region])
    return np.linalg.norm(moved - t[region], axis=1)


def detail_map(fm, refined: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """(S,S) the refinement's high-frequency component along the coarse surface normal (mm)."""
    n = render.vertex_normals(coarse, fm.triangles)  # unit normals
    along = np.einsum("ij,ij->i", refined - coarse, n)
    uv = fm.to_uv(along, DETAIL_UV)
    mask = fm.uv_raster(DETAIL_UV).mask.astype(np.float32)
    low = cv2.GaussianBlur(uv * mask, (0, 0), DETAIL_SIGMA) / np.maximum(
        cv2.GaussianBlur(mask, (0, 0), DETAIL_SIGMA), 1e-3
    )
    return np.where(mask > 0, uv - low, 0.0)


def reconstruct(rec: Reconstructor, image: np.ndarray, drawn: np.ndarray):
    """(fit, coarse vertices, refined vertices) of the face found where the face was drawn (``drawn``:
    its image-space vertices), or None when no face is found there (a miss)."""
    face = drawn_face(rec, image, drawn[rec.face_model.keypoints, :2])
    if face is None:
        return None
    fit = rec.fit(image, face.landmarks)
    refined, refined_ok = rec.refined_shape(image, fit)
    if not refined_ok:
        raise RuntimeError("no FGNet weights installed: nothing to compare the coarse fit with")
    return fit, fit.vertices, refined


def _error_colours(err: np.ndarray) -> np.ndarray:
    """Per-vertex colours (N,3) of per-vertex errors (mm): the JET map over 0…ERROR_RANGE_MM."""
    t = (np.clip(err / ERROR_RANGE_MM, 0, 1) * 255).astype(np.uint8)
    return cv2.applyColorMap(t[:, None], cv2.COLORMAP_JET)[:, 0].astype(np.float32) / 255.0


def figure_row(fm, image, fit, meshes: Dict[str, np.ndarray], errors: Dict[str, np.ndarray]) -> np.ndarray:
    """photo | coarse | refined | truth (similarity-aligned onto coarse) | coarse and refined error
    (``errors``: per-vertex mm, 0 outside the face region), shaded in the fit's pose."""

    def shaded(verts, colours=None):
        n = render.vertex_normals(verts, fm.triangles) @ fit.rotation.T
        return _shade(image, fit.project(verts), n, fm.triangles, colours)

    truth = similarity_align(meshes["truth"].astype(np.float64), meshes["coarse"].astype(np.float64))
    panels = [
        image,
        shaded(meshes["coarse"]),
        shaded(meshes["refined"]),
        shaded(truth.astype(np.float32)),
        shaded(meshes["coarse"], _error_colours(errors["coarse"])),
        shaded(meshes["refined"], _error_colours(errors["refined"])),
    ]
    return np.hstack([cv2.resize(p, (PANEL, PANEL), interpolation=cv2.INTER_AREA) for p in panels])


def run(args) -> dict:
    t0 = time.perf_counter()
    rec = Reconstructor()
    fm = rec.face_model
    cache = Path(args.cache)
    data = load_cache(cache)
    held = np.flatnonzero([is_holdout(str(n)) for n in data["names"]])
    modes = synthetic.identity_modes(Path(args.ict), fm, cache)
    region = np.flatnonzero(fm.face_region)
    coarse_e: Dict[int, float] = {}
    refined_e: Dict[int, float] = {}
    yaw_of: Dict[int, float] = {}
    details: List[float] = []
    missed: List[int] = []
    rows = []
    for k in range(args.n):
        d = synthetic.held_draw(k, held, len(modes))
        image, drawn = synthetic.render_draw(fm, modes, data, d)
        out = reconstruct(rec, image, drawn)
        if out is None:
            missed.append(k)
            continue
        fit, coarse, refined = out
        meshes = {"coarse": coarse, "refined": refined, "truth": synthetic.true_shape(fm, modes, data, d)}
        errors = {}
        for stage in ("coarse", "refined"):
            errors[stage] = np.zeros(len(coarse))
            errors[stage][region] = aligned_error(meshes[stage], meshes["truth"], region)
        coarse_e[k], refined_e[k] = (float(errors[s][region].mean()) for s in ("coarse", "refined"))
        yaw_of[k] = abs(d.yaw)
        details.append(float(np.abs(detail_map(fm, refined, coarse)).mean()))
        if args.figure and len(rows) < args.figure_rows:
            rows.append(figure_row(fm, image, fit, meshes, errors))
    corr = lighting_correlation(rec, fm, modes, data, held, args.lighting_pairs)
    if args.figure and rows:
        cv2.imwrite(str(args.figure), np.vstack(rows))
    bins = {}
    for lo in (0, 30, 60):
        ks = [k for k, y in yaw_of.items() if lo <= y < lo + 30]
        if ks:
            bins[f"{lo}-{lo + 30}"] = {
                "n": len(ks),
                "coarse_mm": round(float(np.mean([coarse_e[k] for k in ks])), 3),
                "refined_mm": round(float(np.mean([refined_e[k] for k in ks])), 3),
            }
    c = float(np.mean(list(coarse_e.values()))) if coarse_e else float("nan")
    r = float(np.mean(list(refined_e.values()))) if refined_e else float("nan")
    return {
        "coarse_mm": round(c, 3),
        "refined_mm": round(r, 3),
        "refined_over_coarse": round(r / c, 3) if coarse_e else None,
        "by_abs_yaw": bins,
        "detail_mm": round(float(np.mean(details)), 4) if details else None,
        "detail_lighting_corr": corr,
        "n": len(coarse_e),
        "n_missed": len(missed),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def lighting_correlation(rec, fm, modes, data, held, pairs: int) -> Optional[float]:
    """Mean correlation of the normal detail maps of ``pairs`` held-out faces, each rendered near frontal
    under its own and under another held-out photo's lighting (never the same photo's)."""
    corrs = []
    mask = fm.uv_raster(DETAIL_UV).mask
    for k in range(pairs):
        d = synthetic.held_draw(k, held, len(modes))
        d = dataclasses.replace(d, yaw=float(np.clip(d.yaw, -30, 30)), blur=0.0)
        lights = [int(i) for i in np.roll(held, -(k * 7 + 3)) if int(i) != d.light_of]
        other = dataclasses.replace(d, light_of=lights[0])
        maps = []
        for draw in (d, other):
            image, drawn = synthetic.render_draw(fm, modes, data, draw)
            out = reconstruct(rec, image, drawn)
            if out is None:
                break
            _, coarse, refined = out
            maps.append(detail_map(fm, refined, coarse)[mask])
        if len(maps) == 2 and maps[0].std() > 0 and maps[1].std() > 0:
            corrs.append(float(np.corrcoef(maps[0], maps[1])[0, 1]))
    return round(float(np.mean(corrs)), 3) if corrs else None
