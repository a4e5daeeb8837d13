"""``bench speed``: warm per-stage medians and the cold start (a fresh process) for one photo, and the two
networks alone on that photo's real inputs, torch against onnxruntime (medians of interleaved runs)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fg3d_blender.core import detect
from fg3d_blender.core.fgnet_inputs import fgnet_inputs
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.morphable import crop_resize, roi_from_landmarks
from fg3d_blender.core.pipeline import Options, Reconstructor

REPO = Path(__file__).resolve().parents[1]


def _interleaved(calls: dict, repeat: int) -> dict:
    """Median ms of each call, the calls taking turns (so a change of machine load hits all alike)."""
    times = {k: [] for k in calls}
    for f in calls.values():  # warm-up
        f()
    for _ in range(repeat):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1000.0)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def networks(photo, threads: int, repeat: int) -> dict:
    """The regressor (batch 2: the crop and its mirror, as the pipeline runs it) and FGNet on the photo's
    own inputs, torch (``threads`` threads) against onnxruntime (``threads`` intra-op threads)."""
    torch.set_num_threads(max(1, threads))
    ort_rec, torch_rec = Reconstructor(threads=threads), Reconstructor(threads=threads, backend="torch")
    image = load_image(photo)
    face = detect.select_face(ort_rec.faces(image), None)
    crop = crop_resize(image, roi_from_landmarks(face.landmarks))[None]
    crops = np.concatenate([crop, crop[:, :, ::-1]])
    x = (crops.transpose(0, 3, 1, 2).astype(np.float32) - np.float32(127.5)) / np.float32(128.0)
    fit = ort_rec.fit(image, face.landmarks)
    refiner = ort_rec.refiner
    inp = fgnet_inputs(image, fit, ort_rec.face_model, refiner.uv_size, refiner.shape_range).arrays()
    recs = {"torch": torch_rec, "onnxruntime": ort_rec}
    return {
        "regressor_batch2": _interleaved(
            {b: (lambda r=r: r.regressor.predict(x)) for b, r in recs.items()}, repeat
        ),
        "fgnet": _interleaved(
            {b: (lambda r=r: r.refiner.net.predict(*inp)) for b, r in recs.items()}, repeat
        ),
    }


def run(args) -> dict:
    cold_cmd = [
        sys.executable,
        "-c",
        "import time,sys;t=time.perf_counter();"
        "from fg3d_blender.core.pipeline import reconstruct;"
        f"reconstruct(sys.argv[1], refine={not args.no_refine}, texture_size={args.texture_size});"
        "print((time.perf_counter()-t)*1000)",
        args.photo,
    ]
    cold = float(
        subprocess.run(cold_cmd, capture_output=True, text=True, check=True, cwd=str(REPO))
        .stdout.strip()
        .splitlines()[-1]
    )
    image = load_image(args.photo)
    if args.backend == "torch":
        torch.set_num_threads(max(1, args.threads))
    rec = Reconstructor(threads=args.threads, backend=args.backend)
    opts = Options(refine=not args.no_refine, texture_size=args.texture_size)
    rec.reconstruct(args.photo, opts)
    runs = [rec.reconstruct(args.photo, opts).timings for _ in range(args.repeat)]
    stages = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
    return {
        "photo": args.photo,
        "size": list(image.shape[:2]),
        "warm_ms": stages,
        "warm_total_ms": stages["total"],
        "cold_start_ms": round(cold, 1),
        "repeat": args.repeat,
        "refine": not args.no_refine,
        "texture_size": args.texture_size,
        "backend": args.backend,
        "threads": args.threads,
        "networks_ms": networks(args.photo, args.threads, max(args.repeat, 30)),
    }
