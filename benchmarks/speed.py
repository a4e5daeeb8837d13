"""``bench speed``: warm per-stage medians and the cold start (a fresh process) for one photo."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import Options, Reconstructor

REPO = Path(__file__).resolve().parents[1]


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
    rec = Reconstructor()
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
    }
