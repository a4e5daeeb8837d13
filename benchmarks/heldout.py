"""``bench heldout``: the shipped FGNet on the training split's held-out photos — photometric error,
landmark NME (coarse vs refined) and the detail measure.  It measures the network's whole difference
(training's evaluation), not the pipeline's applied refinement (``refine.REFINE_GAIN`` of it where
the photo sees the surface)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.fgnet import load_checkpoint
from fg3d_blender.core.image_io import list_photos
from fg3d_blender.core.pipeline import Reconstructor
from training.batches import Batcher
from training.cache import build_cache, is_holdout, load_cache
from training.evaluate import evaluate
from training.losses import Losses


def run(args) -> dict:
    rec = Reconstructor()
    refiner = rec.refiner
    if refiner is None:
        raise FG3DError("no FGNet weights installed (models/assets.json names none)")
    size = refiner.uv_size
    cache = Path(args.cache)
    if args.photos:  # only the held-out photos are needed here
        photos = [p for p in list_photos(Path(args.photos)) if is_holdout(p.name)]
        build_cache(rec, photos, cache, size)
    data = load_cache(cache)
    held = np.flatnonzero([is_holdout(str(n)) for n in data["names"]])
    if args.limit:
        held = held[: args.limit]
    fm = rec.face_model
    batcher = Batcher(fm, data, size, torch.device("cpu"), args.landmark_target)
    losses = Losses(fm, batcher.uvm, "cpu", target=args.landmark_target)
    out = evaluate(load_checkpoint(refiner.info["file"]), batcher, losses, held)  # torch: evaluate's losses
    out.update({"weights": Path(refiner.info["file"]).name, "uv_size": size})
    return out
