"""``bench …``: the benchmarks' command line (registered by ``fg3d_blender.cli`` from a checkout).
Each prints its numbers, or one JSON line with ``--json``."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

DEFAULT_PHOTO = str(
    Path(__file__).resolve().parents[2] / "shared/photos/fg3d_examples/AFW_1814664578_2_0.jpg"
)
DEFAULT_SCAN_DIR = str(Path(__file__).resolve().parents[2] / "shared/scans/james")
DEFAULT_ICT_DIR = str(Path(__file__).resolve().parents[2] / "shared/ict_facekit")
#: bench name → the module whose ``run(args)`` runs it.  They import torch and the pipeline, so only the
#: chosen one is imported, when it runs: building the parser stays cheap for every other command.
RUNNERS = {
    "aflw2000": "aflw2000",
    "speed": "speed",
    "consistency": "consistency",
    "heldout": "heldout",
    "memory": "memory",
    "raster": "raster",
    "figure": "fgnet_figure",
    "expression-figure": "expression_figure",
    "scan": "scan",
    "synthetic": "synthetic",
    "detect": "detect",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    a = sub.add_parser("aflw2000", help="landmark NME on AFLW2000-3D (images/ + labels.npz)")
    a.add_argument("--dir", required=True)
    a.add_argument("--crop", choices=["gt", "detect"], default="detect")
    a.add_argument("--no-refine", action="store_true")
    a.add_argument("--limit", type=int, default=0, help="first N photos only (0 = all)")
    a.add_argument(
        "--passes",
        type=int,
        default=0,
        help="regressor passes (default: 1 for --crop gt, the published protocol; else the pipeline's)",
    )
    a.add_argument("--no-refit", action="store_true", help="skip the landmark refit of the 3DMM")
    a.add_argument(
        "--face",
        choices=["nearest", "largest"],
        default="nearest",
        help="with --crop detect: the detected face nearest the labels (the protocol), or the largest "
        "alone, as the product's default finds it",
    )
    s = sub.add_parser("speed", help="warm per-stage medians and cold start for one photo")
    s.add_argument("photo")
    s.add_argument("--repeat", type=int, default=20)
    s.add_argument("--no-refine", action="store_true")
    s.add_argument("--texture-size", type=int, default=1024)
    s.add_argument("--backend", choices=["onnxruntime", "torch"], default="onnxruntime")
    s.add_argument("--threads", type=int, default=0, help="CPU threads, core.threads (default 0: one)")
    s.add_argument("--cold-runs", type=int, default=3, help="fresh processes per cold measurement (0: none)")
    s.add_argument("--batch", type=int, default=0, metavar="N", help="also N photos through the CLI")
    s.add_argument("--batch-dir", default="../shared/benchmarks/aflw2000_3d/images", metavar="DIR")
    s.add_argument("--no-networks", action="store_true", help="skip torch vs onnxruntime per network")
    c = sub.add_parser(
        "consistency", help="one person at many poses: vertex deviation (mm) from the mean shape"
    )
    c.add_argument("--dir", required=True)
    c.add_argument("--no-refine", action="store_true")
    h = sub.add_parser(
        "heldout",
        help="FGNet on the held-out training photos: photometric error, landmark "
        "NME, coarse vs refined, and the detail measure (mm)",
    )
    h.add_argument("--cache", required=True, help="the train-fgnet cache folder")
    h.add_argument("--photos", help="photo folder to (re)build the cache from when it is incomplete")
    h.add_argument("--limit", type=int, default=0)
    h.add_argument(
        "--landmark-target",
        choices=["head", "dlib"],
        default="head",
        help="landmarks the NME is measured against (the regressor's landmark head, or dlib's)",
    )
    m = sub.add_parser("memory", help="peak memory of a small face pasted into a large photo")
    m.add_argument("photo")
    m.add_argument("--canvas", default="4032x3024", help="W×H of the large photo (default 12 MP)")
    m.add_argument("--face-px", type=int, default=150, help="width of the pasted face box, px")
    m.add_argument("--texture-size", type=int, default=1024)
    r = sub.add_parser("raster", help="compiled rasterizer vs the numpy reference on the real mesh")
    r.add_argument("photo", nargs="?", default=DEFAULT_PHOTO)
    f = sub.add_parser("figure", help="FGNet figure rows photo | coarse | refined | detail into a PNG")
    f.add_argument("out")
    f.add_argument("photos", nargs="+")
    ef = sub.add_parser(
        "expression-figure", help="six carried ICT expression modes on the BFM mean, into a PNG"
    )
    ef.add_argument("out")
    sc = sub.add_parser(
        "scan",
        help="real 3D scan: renders at 21 poses reconstructed, aligned (landmarks + ICP) and measured "
        "scan-to-mesh (mm, NoW-style), against the mean face",
    )
    sc.add_argument("--dir", default=DEFAULT_SCAN_DIR, help="the scan folder (james.obj, .jpg, .ljson)")
    sc.add_argument("--no-refine", action="store_true")
    sc.add_argument("--no-refit", action="store_true", help="skip the landmark refit of the 3DMM")
    sc.add_argument(
        "--lightings",
        type=int,
        choices=(1, 2, 3),
        default=2,
        help="how many lightings to render under (soft front, strong side, top; default 2)",
    )
    sy = sub.add_parser(
        "synthetic",
        help="held-out synthetic faces of known shape (ICT identities): 3D error coarse vs refined, "
        "detail, detail correlation across lightings",
    )
    sy.add_argument(
        "--cache", required=True, help="the train-fgnet cache folder (its photos texture the faces)"
    )
    sy.add_argument("--ict", default=DEFAULT_ICT_DIR, help="ICT-FaceKit's folder (shared/ict_facekit)")
    sy.add_argument("--n", type=int, default=150, help="held-out draws to render (default 150)")
    sy.add_argument("--lighting-pairs", type=int, default=16, help="faces rendered under two lightings")
    sy.add_argument("--figure", metavar="PNG", help="write figure rows of held-out faces")
    sy.add_argument("--figure-rows", type=int, default=4)
    dt = sub.add_parser(
        "detect", help="the default's largest-face search against the full detection: same face, time"
    )
    dt.add_argument("--dir", action="append", required=True, help="a photo folder (repeatable)")
    for p in (a, s, c, h, m, r, f, ef, sc, sy, dt):
        p.add_argument("--json", action="store_true", help="print one JSON line")


def run(args) -> int:
    out = importlib.import_module(f"{__package__}.{RUNNERS[args.bench]}").run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0
