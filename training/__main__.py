"""Cache worker: ``python -m training PHOTOS CACHE SIZE WORKER WORKERS`` builds every WORKERS-th shard
of the training cache from WORKER on (run several in parallel, one thread each)."""

import sys
from pathlib import Path

import torch

from fg3d_blender.core.image_io import list_photos
from fg3d_blender.core.pipeline import Reconstructor

from .cache import build_cache

torch.set_num_threads(1)
build_cache(
    Reconstructor(),
    list_photos(Path(sys.argv[1])),
    Path(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    int(sys.argv[5]),
    log=lambda m: print(m, flush=True),
)
