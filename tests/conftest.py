"""Shared fixtures for the test suite.

Data comes from ``../shared`` (the repository's parent always has it; see ../shared/README.md):
model files under ``shared/models`` and real photos under ``shared/photos``.  Nothing from there is
ever copied into the repository; tests that need modified photos build them in ``tmp_path``.

Fixtures (generic, usable by every test module):

* ``shared_dir``   — Path of ``../shared`` (session).  ``$FG3D_ASSET_MIRROR`` is set to
  ``shared/models`` when unset, at import time of this file, so the pipeline finds its model files.
* ``photos_dir``   — Path of ``../shared/photos``.
* ``example_photo``— Path of ``photos/fg3d_examples/test.jpg`` (the seed's own example photo).
* ``reconstructed``— a function ``reconstructed(path, **kwargs) -> Result`` that runs
  ``core.pipeline.reconstruct`` once per (path, kwargs) for the whole session (results are shared,
  do not modify them in place).
* ``cli_env``      — environment dict for ``subprocess`` runs of ``python -m fg3d_blender`` (repo on
  PYTHONPATH, asset mirror set, one thread per library: one photo needs no more, and the CLI runs
  must not compete with the test process for the CI's two cores).
* ``run_cli``      — ``run_cli(*args, cwd=None) -> CompletedProcess`` (text, captured output).
* ``unwritable_dir``— an existing folder this process cannot write (a read-only tmpfs as root, who
  ignores file modes; mode 0555 otherwise).

Helper (``from conftest import check_one_error_line``): ``check_one_error_line(proc, out_dir, *needles)``
asserts a failed run printed exactly one ``fg3d: error:`` line holding each needle, no traceback, and
left nothing in ``out_dir``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

if (SHARED / "models").is_dir():
    os.environ.setdefault("FG3D_ASSET_MIRROR", str(SHARED / "models"))


def _require_shared() -> Path:
    if not (SHARED / "models").is_dir() or not (SHARED / "photos").is_dir():
        pytest.fail(f"{SHARED} with models/ and photos/ is required by the tests (see README)")
    return SHARED


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Path of ``../shared`` (model mirror, photos, benchmarks)."""
    return _require_shared()


@pytest.fixture(scope="session")
def photos_dir(shared_dir) -> Path:
    return shared_dir / "photos"


@pytest.fixture(scope="session")
def example_photo(photos_dir) -> Path:
    return photos_dir / "fg3d_examples" / "test.jpg"


@pytest.fixture(scope="session")
def reconstructed(shared_dir):
    """``reconstructed(path, **kwargs)``: the pipeline's Result, computed once per session."""
    from fg3d_blender.core.pipeline import reconstruct

    cache = {}

    def get(path, **kwargs):
        key = (str(path), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = reconstruct(path, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def cli_env(shared_dir) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("FG3D_ASSET_MIRROR", str(shared_dir / "models"))
    env.pop("FG3D_DEBUG", None)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    return env


@pytest.fixture(scope="session")
def run_cli(cli_env):
    def run(*args, cwd=None, timeout=300):
        return subprocess.run(
            [sys.executable, "-m", "fg3d_blender", *map(str, args)],
            cwd=cwd or REPO,
            env=cli_env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=timeout,
        )

    return run


def check_one_error_line(proc, out_dir: Path, *needles: str) -> str:
    """A failed CLI run: exactly one ``fg3d: error:`` line with every needle, no traceback, no files."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fg3d: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out_dir.exists() or not list(out_dir.iterdir()), list(out_dir.iterdir())
    return lines[0]


@pytest.fixture
def unwritable_dir(tmp_path):
    """An existing folder this process cannot write: read-only tmpfs as root, mode 0555 otherwise."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
