"""The one thread policy (``core.threads``): a run with N threads sets OpenCV, every loaded BLAS and both
onnxruntime sessions to N, 0 means one; measured on real photos with the real libraries."""

from __future__ import annotations

import cv2
import pytest

from fg3d_blender.core import threads
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.pipeline import Reconstructor

pytestmark = pytest.mark.slow  # integration tier: real models, real photos


def _counts(rec: Reconstructor) -> dict:
    sessions = {"regressor": rec.regressor.session, "fgnet": rec.refiner.net.session}
    return {
        "opencv": cv2.getNumThreads(),
        **{f"onnx:{k}": s.get_session_options().intra_op_num_threads for k, s in sessions.items()},
        **{f"blas:{k}": v for k, v in threads.blas_threads().items() if not k.startswith("libopenblas-r0")},
    }


def test_every_library_runs_with_the_chosen_thread_count(example_photo):
    """OpenCV's own default is one thread per core whatever OMP_NUM_THREADS says; numpy's and scipy's
    OpenBLAS likewise.  (OpenCV's bundled OpenBLAS is a single-thread build: it reports 1 always.)"""
    try:
        for n, want in ((2, 2), (0, 1), (1, 1)):
            rec = Reconstructor(threads=n)
            rec.reconstruct(example_photo)
            counts = _counts(rec)
            assert any(k.startswith("blas:libopenblas64") for k in counts), counts  # numpy's is found
            assert set(counts.values()) == {want}, (n, counts)
    finally:
        threads.apply(1)


def test_thread_counts_are_checked():
    assert [threads.resolve(n) for n in (0, 1, 3)] == [1, 1, 3]
    for bad in (-1, 1.5, "2", True, None):
        with pytest.raises(FG3DError, match="threads"):
            threads.resolve(bad)


def test_a_host_process_keeps_its_thread_counts():
    """The add-on runs in Blender's process: after ``kept()`` OpenCV and the BLAS libraries have the
    counts they had before (other add-ons' settings), and the next run applies its own again."""
    try:
        threads.apply(2)
        before = (cv2.getNumThreads(), threads.blas_threads())
        with threads.kept():
            threads.ensure(1)
            assert cv2.getNumThreads() == 1
        assert (cv2.getNumThreads(), threads.blas_threads()) == before
        threads.ensure(1)
        assert cv2.getNumThreads() == 1
    finally:
        threads.apply(1)
