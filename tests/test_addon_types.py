"""mypy over the bpy layer (``fg3d_blender/operators``) against the fake-bpy-module-5-0 stubs."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # integration tier: mypy over the bpy layer

ROOT = Path(__file__).resolve().parent.parent


def test_operators_type_check():
    pytest.importorskip("mypy")
    from importlib import metadata

    try:
        metadata.version("fake-bpy-module-5-0")
    except metadata.PackageNotFoundError:
        pytest.skip("fake-bpy-module-5-0 is not installed (see requirements.txt)")
    # core/ and render_ext/ are followed for their types but only operators/ is judged here
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--follow-imports=silent",
            "--no-error-summary",
            "fg3d_blender/operators",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
