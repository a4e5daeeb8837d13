"""``bench aflw2000``: 68-point landmark NME on AFLW2000-3D.

Protocol: NME of the 68 2D landmarks normalised by sqrt(w·h) of the ground-truth landmarks' bounding
box, averaged per |yaw| bin [0,30), [30,60), [60,90] and over the three bins.  The 3D NME is the same
with z (the dataset's fitted 3D landmarks, z toward the camera like the pipeline's image space), z
centred per face on both sides (``nme3d_balanced``, ``nme3d_by_yaw``).  ``--crop gt`` crops from
the ground-truth landmarks (the published protocol of 3DDFA/3DDFA_V2); ``--crop detect`` runs our own
detection end to end and counts every photo: when no face is found, the regressor starts from a centred
box and re-crops from its own landmarks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from fg3d_blender.core import detect
from fg3d_blender.core.geometry import nme
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import Options, Reconstructor

YAW_BINS = ((0, 30), (30, 60), (60, 91))
DEFAULT_PASSES = Options().passes


def balanced(errors: np.ndarray, yaws_deg: np.ndarray) -> dict:
    by = []
    for lo, hi in YAW_BINS:
        sel = (np.abs(yaws_deg) >= lo) & (np.abs(yaws_deg) < hi)
        by.append(float(errors[sel].mean()) if sel.any() else float("nan"))
    return {"nme_balanced": float(np.nanmean(by)), "nme_by_yaw": by, "nme_mean": float(errors.mean())}


def fitted_landmarks(rec: Reconstructor, image, start_landmarks, passes, refine, refit=True) -> np.ndarray:
    """The mesh's 68 landmarks in image space (x, y px; z toward the camera, px)."""
    fit = rec.fit(image, start_landmarks, passes=passes, refit=refit)
    verts = rec.refined_shape(image, fit)[0] if refine else fit.vertices
    return fit.project(verts[rec.face_model.keypoints])


def nme3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """pred, gt (68,3): mean 3D point error, z centred on each side, / sqrt(w·h) of the GT 2D box."""
    p, g = pred.astype(np.float64), gt.astype(np.float64)
    p[:, 2] -= p[:, 2].mean()
    g[:, 2] -= g[:, 2].mean()
    wh = g[:, :2].max(0) - g[:, :2].min(0)
    return float(np.linalg.norm(p - g, axis=1).mean() / np.sqrt(wh[0] * wh[1]))


def fallback_start(image) -> np.ndarray:
    """No face found: pretend landmarks fill a centred box half the photo's size (the regressor re-crops)."""
    h, w = image.shape[:2]
    s = min(h, w) * 0.25
    cx, cy = w / 2, h / 2
    return np.array([[cx - s, cy - s], [cx + s, cy + s]], dtype=np.float32)


def image_path(root: Path, name: str) -> Path:
    p = root / "images" / name
    return p if p.suffix else p.with_suffix(".jpg")


def run(args) -> dict:
    rec = Reconstructor()
    root = Path(args.dir)
    labels = np.load(root / "labels.npz", allow_pickle=False)
    names = [str(n) for n in labels["names"]]
    gts3 = labels["pt3d_68"].transpose(0, 2, 1).astype(np.float32)
    gts = gts3[:, :, :2]
    yaws = np.degrees(labels["pose_para"][:, 1])
    n = len(names) if not args.limit else min(args.limit, len(names))
    errs, errs3, found, t0 = np.zeros(n), np.zeros(n), 0, time.perf_counter()
    for i in range(n):
        image = load_image(image_path(root, names[i]))
        gt = gts[i]
        passes = args.passes or (1 if args.crop == "gt" else DEFAULT_PASSES)
        if args.crop == "gt":
            start = gt
        else:
            faces = rec.faces(image, largest=args.face == "largest")
            if faces:
                found += 1
                start = detect.nearest_face(faces, gt.mean(0)).landmarks
            else:
                start, passes = fallback_start(image), passes + 2
        pred = fitted_landmarks(rec, image, start, passes, not args.no_refine, not args.no_refit)
        errs[i] = nme(pred[:, :2], gt)
        errs3[i] = nme3d(pred, gts3[i])
        if (i + 1) % 50 == 0 or i + 1 == n:
            sys.stderr.write(
                f"\r{i + 1}/{n} NME so far {errs[: i + 1].mean() * 100:.2f}% "
                f"({(time.perf_counter() - t0) / (i + 1) * 1000:.0f} ms/photo)"
            )
            sys.stderr.flush()
    sys.stderr.write("\n")
    out = balanced(errs[:n], yaws[:n])
    b3 = balanced(errs3[:n], yaws[:n])
    out.update(nme3d_balanced=b3["nme_balanced"], nme3d_by_yaw=b3["nme_by_yaw"], nme3d_mean=b3["nme_mean"])
    out.update(
        {
            "n": n,
            "crop": args.crop,
            "face": args.face if args.crop == "detect" else None,
            "refine": not args.no_refine,
            "refit": not args.no_refit,
            "passes": args.passes or (1 if args.crop == "gt" else DEFAULT_PASSES),
            "detected": (found / n) if args.crop == "detect" else None,
        }
    )
    return out
