"""Benchmarks that print numbers: ``bench aflw2000`` (landmark NME) and ``bench speed`` (per-stage ms).

AFLW2000-3D protocol: NME of the 68 2D landmarks normalised by sqrt(w·h) of the ground-truth
landmarks' bounding box, averaged per |yaw| bin [0,30), [30,60), [60,90] and over the three bins.
``--crop gt`` crops from the ground-truth landmarks (the published protocol of 3DDFA/3DDFA_V2);
``--crop detect`` runs our own detection end to end and counts every photo: when no face is found, the
regressor starts from a centred box and re-crops from its own landmarks.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

YAW_BINS = ((0, 30), (30, 60), (60, 91))
DEFAULT_PASSES = 2  # the pipeline's default (core.pipeline.reconstruct)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    a = sub.add_parser("aflw2000", help="landmark NME on AFLW2000-3D (images/ + labels.npz)")
    a.add_argument("--dir", required=True)
    a.add_argument("--crop", choices=["gt", "detect"], default="detect")
    a.add_argument("--no-refine", action="store_true")
    a.add_argument("--limit", type=int, default=0, help="first N photos only (0 = all)")
    a.add_argument("--passes", type=int, default=0,
                   help="regressor passes (default: 1 for --crop gt, the published protocol; else the pipeline's)")
    a.add_argument("--no-refit", action="store_true", help="skip the landmark refit of the 3DMM")
    a.add_argument("--json", action="store_true")
    s = sub.add_parser("speed", help="warm per-stage medians and cold start for one photo")
    s.add_argument("photo")
    s.add_argument("--repeat", type=int, default=20)
    s.add_argument("--no-refine", action="store_true")
    s.add_argument("--texture-size", type=int, default=1024)
    s.add_argument("--json", action="store_true")
    add_fgnet_arguments(sub)


def nme(pred: np.ndarray, gt: np.ndarray) -> float:
    """pred, gt: (68,2).  Mean point error / sqrt(w·h) of the GT bounding box."""
    wh = gt.max(0) - gt.min(0)
    return float(np.linalg.norm(pred - gt, axis=1).mean() / np.sqrt(wh[0] * wh[1]))


def balanced(errors: np.ndarray, yaws_deg: np.ndarray) -> dict:
    by = []
    for lo, hi in YAW_BINS:
        sel = (np.abs(yaws_deg) >= lo) & (np.abs(yaws_deg) < hi)
        by.append(float(errors[sel].mean()) if sel.any() else float("nan"))
    return {"nme_balanced": float(np.nanmean(by)), "nme_by_yaw": by, "nme_mean": float(errors.mean())}


def _fit_landmarks(image, start_landmarks, passes, refine, refit=True):
    from . import morphable
    from .pipeline import refined_shape
    fit = morphable.fit_3dmm(image, start_landmarks, passes=passes, refit=refit)
    verts = refined_shape(image, fit)[0] if refine else fit.vertices
    return fit.project(verts[morphable.face_model().keypoints])[:, :2]


def _fallback_start(image) -> np.ndarray:
    """No face found: pretend landmarks fill a centred box half the photo's size (the regressor re-crops)."""
    h, w = image.shape[:2]
    s = min(h, w) * 0.25
    cx, cy = w / 2, h / 2
    return np.array([[cx - s, cy - s], [cx + s, cy + s]], dtype=np.float32)


def _image_path(root: Path, name: str) -> Path:
    p = root / "images" / name
    return p if p.suffix else p.with_suffix(".jpg")


def run_aflw2000(args) -> dict:
    from . import detect
    from .image_io import load_image
    root = Path(args.dir)
    labels = np.load(root / "labels.npz", allow_pickle=False)
    names = [str(n) for n in labels["names"]]
    gts = labels["pt3d_68"][:, :2, :].transpose(0, 2, 1).astype(np.float32)
    yaws = np.degrees(labels["pose_para"][:, 1])
    n = len(names) if not args.limit else min(args.limit, len(names))
    errs, found, t0 = np.zeros(n), 0, time.perf_counter()
    for i in range(n):
        image = load_image(_image_path(root, names[i]))
        gt = gts[i]
        passes = args.passes or (1 if args.crop == "gt" else DEFAULT_PASSES)
        if args.crop == "gt":
            start = gt
        else:
            faces = detect.detect_faces(image)
            if faces:
                found += 1
                start = detect.nearest_face(faces, gt.mean(0)).landmarks
            else:
                start, passes = _fallback_start(image), passes + 2
        pred = _fit_landmarks(image, start, passes, not args.no_refine, not args.no_refit)
        errs[i] = nme(pred, gt)
        if (i + 1) % 50 == 0 or i + 1 == n:
            sys.stderr.write(f"\r{i + 1}/{n} NME so far {errs[:i + 1].mean() * 100:.2f}% "
                             f"({(time.perf_counter() - t0) / (i + 1) * 1000:.0f} ms/photo)")
            sys.stderr.flush()
    sys.stderr.write("\n")
    out = balanced(errs[:n], yaws[:n])
    out.update({"n": n, "crop": args.crop, "refine": not args.no_refine, "refit": not args.no_refit,
                "passes": args.passes or (1 if args.crop == "gt" else DEFAULT_PASSES),
                "detected": (found / n) if args.crop == "detect" else None})
    return out


def run_speed(args) -> dict:
    from .image_io import load_image
    from .pipeline import reconstruct
    cold_cmd = [sys.executable, "-c",
                "import time,sys;t=time.perf_counter();"
                "from fg3d_blender.core.pipeline import reconstruct;"
                f"reconstruct(sys.argv[1], refine={not args.no_refine}, texture_size={args.texture_size});"
                "print((time.perf_counter()-t)*1000)", args.photo]
    cold = float(subprocess.run(cold_cmd, capture_output=True, text=True, check=True,
                                cwd=str(Path(__file__).resolve().parents[2])).stdout.strip().splitlines()[-1])
    image = load_image(args.photo)
    reconstruct(args.photo, refine=not args.no_refine, texture_size=args.texture_size)
    runs = [reconstruct(args.photo, refine=not args.no_refine, texture_size=args.texture_size).timings
            for _ in range(args.repeat)]
    stages = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
    return {"photo": args.photo, "size": list(image.shape[:2]), "warm_ms": stages,
            "warm_total_ms": stages["total"], "cold_start_ms": round(cold, 1), "repeat": args.repeat,
            "refine": not args.no_refine, "texture_size": args.texture_size}


def main(args) -> int:
    runners = {"aflw2000": run_aflw2000, "speed": run_speed, "consistency": run_consistency,
               "heldout": run_heldout}
    out = runners[args.bench](args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


# ---- FGNet benchmarks: multi-pose consistency and held-out photometric/detail ---------------------

def add_fgnet_arguments(sub) -> None:
    c = sub.add_parser("consistency", help="one person at many poses: vertex deviation (mm) from the mean shape")
    c.add_argument("--dir", required=True)
    c.add_argument("--no-refine", action="store_true")
    c.add_argument("--json", action="store_true")
    h = sub.add_parser("heldout", help="FGNet on the held-out training photos: photometric error, landmark "
                                       "NME, coarse vs refined, and the detail measure (mm)")
    h.add_argument("--cache", required=True, help="the train-fgnet cache folder")
    h.add_argument("--photos", help="photo folder to (re)build the cache from when it is incomplete")
    h.add_argument("--limit", type=int, default=0)
    h.add_argument("--landmark-target", choices=["head", "dlib"], default="head",
                   help="landmarks the NME is measured against (the regressor's landmark head, or dlib's)")
    h.add_argument("--json", action="store_true")


def similarity_transform(src: np.ndarray, dst: np.ndarray):
    """Least-squares similarity (Umeyama) taking src (N,3) onto dst: (scale, rotation (3,3), shift (3,)),
    applied as ``scale * x @ rotation.T + shift``."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, sig, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt))
    e = np.diag([1.0, 1.0, d])
    r = u @ e @ vt
    scale = float((sig * np.diag(e)).sum() / (a * a).sum())
    return scale, r, md - scale * ms @ r.T


def similarity_align(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """src (N,3) moved onto dst by the least-squares similarity transform."""
    s, r, t = similarity_transform(src, dst)
    return (s * np.asarray(src, np.float64) @ r.T + t).astype(np.float64)


def shape_consistency(shapes: list, iterations: int = 5) -> np.ndarray:
    """Generalised Procrustes: per-shape mean vertex distance (mm) to the mean after similarity alignment.
    The mean is kept at the shapes' average centroid size, so alignment cannot shrink the error."""
    x = [np.asarray(v, np.float64) for v in shapes]
    size = np.mean([np.sqrt(((v - v.mean(0)) ** 2).sum(1).mean()) for v in x])
    mean = x[0]
    for _ in range(iterations):
        aligned = [similarity_align(v, mean) for v in x]
        mean = np.mean(aligned, 0)
        mean = (mean - mean.mean(0)) * (size / np.sqrt(((mean - mean.mean(0)) ** 2).sum(1).mean()))
    aligned = [similarity_align(v, mean) for v in x]
    return np.array([np.linalg.norm(v - mean, axis=1).mean() for v in aligned])


def run_consistency(args) -> dict:
    from .pipeline import reconstruct
    from .errors import NoFaceError
    photos = sorted(p for p in Path(args.dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    shapes, names, missed = [], [], []
    for p in photos:
        try:
            r = reconstruct(p, refine=not args.no_refine, texture_size=256)
        except NoFaceError:
            missed.append(p.name)
            continue
        shapes.append(r.vertices)
        names.append(p.name)
    dev = shape_consistency(shapes) if len(shapes) > 1 else np.zeros(len(shapes))
    return {"mean_mm": float(dev.mean()) if len(dev) else float("nan"), "n": len(shapes),
            "no_face": missed, "per_view_mm": {n: round(float(d), 3) for n, d in zip(names, dev)},
            "refine": not args.no_refine}


def run_heldout(args) -> dict:
    import torch
    from . import train_fgnet
    from .refine import _model
    net, info = _model()
    if net is None:
        from .errors import FG3DError
        raise FG3DError("no FGNet weights installed (models/fgnet.json)")
    size = int(info["uv_size"])
    cache = Path(args.cache)
    if args.photos:  # only the held-out photos are needed here
        photos = [p for p in train_fgnet.list_photos(Path(args.photos)) if train_fgnet.is_holdout(p.name)]
        train_fgnet.build_cache(photos, cache, size)
    data = train_fgnet.load_cache(cache)
    held = np.flatnonzero([train_fgnet.is_holdout(str(n)) for n in data["names"]])
    if args.limit:
        held = held[:args.limit]
    batcher = train_fgnet.Batcher(data, size, torch.device("cpu"), args.landmark_target)
    losses = train_fgnet.Losses(batcher.uvm, "cpu", target=args.landmark_target)
    out = train_fgnet.evaluate(net, batcher, losses, held)
    out.update({"weights": info["file"], "uv_size": size})
    return out
