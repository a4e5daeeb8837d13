"""``train-fgnet``: the command line of the trainer (registered by ``fg3d_blender.cli`` from a checkout)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fg3d_blender.core.errors import FG3DError


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--photos", required=True, metavar="DIR")
    t.add_argument(
        "--out", required=True, metavar="FILE", help="weights file (fp16); FILE.ckpt is the checkpoint"
    )
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--resume", action="store_true", help="continue from FILE.ckpt")
    t.add_argument("--cache", metavar="DIR", help="precomputed inputs (default FILE.cache; built when empty)")
    t.add_argument("--width", type=int, default=8, help="first-stage channels (the paper: 16)")
    t.add_argument("--uv-size", type=int, default=128, help="UV map size, a multiple of 32 (the paper: 256)")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--checkpoint-every", type=int, default=100, metavar="N")
    t.add_argument(
        "--eval-every", type=int, default=500, metavar="N", help="held-out evaluation (0 = only at the end)"
    )
    t.add_argument(
        "--landmark-target",
        choices=["head", "dlib"],
        default="head",
        help="landmark loss target: the regressor's landmark head (default) or dlib's 68",
    )
    t.add_argument("--threads", type=int, default=1, help="CPU threads: torch and every stage (core.threads)")
    t.add_argument(
        "--init",
        metavar="FILE",
        help="start from these weights (fine-tune); they also refine the shapes drawn in the synthetic views",
    )
    t.add_argument(
        "--views",
        type=int,
        default=0,
        metavar="N",
        help="add N synthetic views of training photos, turned away from the camera, whose 3D "
        "shape is known (0 = none)",
    )
    t.add_argument("--views-per-batch", type=int, default=4, metavar="N")
    t.add_argument("--view-weight", type=float, default=0.15, help="weight of the views' 3D error, per mm")
    t.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="add N synthetic faces of ICT-FaceKit light-stage identities beyond the 3DMM (and N/20 held "
        "out), rendered with real photos' textures and lighting, whose 3D shape is known (needs --ict)",
    )
    t.add_argument("--ict", metavar="DIR", help="ICT-FaceKit's folder (shared/ict_facekit), for --synthetic")
    t.add_argument("--synthetic-per-batch", type=int, default=8, metavar="N")
    t.add_argument(
        "--synthetic-weight", type=float, default=0.3, help="weight of the synthetic faces' 3D error, per mm"
    )


def run(args) -> int:
    photos = Path(args.photos)
    if not photos.is_dir():
        raise FG3DError(f"{photos}: not a folder of photos")
    if args.init and not Path(args.init).is_file():
        raise FG3DError(f"{args.init}: no such weights file (--init)")
    if args.views < 0 or args.views_per_batch < 1:
        raise FG3DError("--views must be 0 or more and --views-per-batch 1 or more")
    if args.synthetic < 0 or args.synthetic_per_batch < 1:
        raise FG3DError("--synthetic must be 0 or more and --synthetic-per-batch 1 or more")
    if args.synthetic and not (args.ict and (Path(args.ict) / "shape_modes.npz").is_file()):
        raise FG3DError("--synthetic needs --ict DIR, ICT-FaceKit's folder with shape_modes.npz")
    from . import trainer  # imports torch and the pipeline: only when training runs, not for every CLI call

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = trainer.train(
        photos,
        out,
        steps=args.steps,
        resume=args.resume,
        cache=Path(args.cache) if args.cache else None,
        width=args.width,
        size=args.uv_size,
        batch=args.batch,
        lr=args.lr,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        target=args.landmark_target,
        threads=args.threads,
        init=Path(args.init) if args.init else None,
        views=args.views,
        views_per_batch=args.views_per_batch,
        view_weight=args.view_weight,
        synthetic=args.synthetic,
        synthetic_per_batch=args.synthetic_per_batch,
        synthetic_weight=args.synthetic_weight,
        ict=Path(args.ict) if args.ict else None,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(json.dumps(res))
    return 0
