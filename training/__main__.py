"""Cache worker: ``python -m training PHOTOS CACHE SIZE WORKER WORKERS`` builds every WORKERS-th shard
of the training cache from WORKER on (run several in parallel, one thread each)."""

import sys
from pathlib import Path

import torch  # noqa: F401 - imported first, so the thread policy below sets its threads too

from fg3d_blender.core import threads
from fg3d_blender.core.image_io import list_photos
from fg3d_blender.core.pipeline import Reconstructor

from .cache import build_cache

threads.apply(1, torch=True)
build_cache(
    Reconstructor(),
    list_photos(Path(sys.argv[1])),
    Path(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    int(sys.argv[5]),
    log=lambda m: print(m, flush=True),
)
