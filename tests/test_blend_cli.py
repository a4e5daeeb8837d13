"""``reconstruct PHOTO -o DIR --format blend``: the add-on's builder through the bpy module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # integration tier: the CLI with bpy

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PHOTO = SHARED / "photos" / "fg3d_examples" / "test.jpg"

_READ_BLEND = """
import json, sys, bpy

bpy.ops.wm.open_mainfile(filepath=sys.argv[1])
ob = next(o for o in bpy.data.objects if o.type == 'MESH')
print("FG3D-JSON " + json.dumps({
    "objects": sorted(o.type for o in bpy.data.objects),
    "verts": len(ob.data.vertices),
    "keys": [k.name for k in ob.data.shape_keys.key_blocks],
    "uv": ob.data.uv_layers.active.name,
    "packed": sorted(i.name for i in bpy.data.images if i.packed_file is not None),
    "camera": bpy.context.scene.camera.name if bpy.context.scene.camera else None,
    "source": ob["fg3d_source_photo"],
}))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("FG3D_ASSET_MIRROR", str(SHARED / "models"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "fg3d_blender", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def test_cli_writes_a_blend(tmp_path):
    pytest.importorskip("bpy")
    out = tmp_path / "out"
    r = _cli(["reconstruct", str(PHOTO), "-o", str(out), "--format", "blend,obj", "--no-extras"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["test.blend", "test.mtl", "test.obj", "test_texture.png"]
    script = tmp_path / "read.py"
    script.write_text(_READ_BLEND)
    rr = subprocess.run(
        [sys.executable, str(script), str(out / "test.blend")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    line = [ln for ln in rr.stdout.splitlines() if ln.startswith("FG3D-JSON ")]
    assert line, rr.stdout + rr.stderr
    got = json.loads(line[-1][len("FG3D-JSON ") :])
    assert got["objects"] == ["CAMERA", "MESH"] and got["verts"] == 53215
    keys = got["keys"]
    assert keys[0] == "Basis" and keys[-1] == "FGNet" and len(keys) == 55 and "jawOpen" in keys
    assert got["uv"] == "UVMap" and got["camera"]
    assert {"FG3D_test_texture", "FG3D_test_depth", "FG3D_test_pncc", "FG3D_test_photo"} <= set(got["packed"])
    assert Path(got["source"]).resolve() == PHOTO.resolve()


def test_cli_blend_no_face_writes_nothing(tmp_path):
    pytest.importorskip("bpy")
    import cv2

    photo = tmp_path / "gradient.png"
    cv2.imwrite(str(photo), np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (200, 1, 3)))
    out = tmp_path / "out"
    r = _cli(["reconstruct", str(photo), "-o", str(out), "--format", "blend"])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"fg3d: error: {photo}: no face found"]
    assert not out.exists() or not list(out.iterdir())


def test_cli_blend_without_bpy_is_one_line(tmp_path):
    """Where the bpy module is missing, --format blend fails at once with one line and writes nothing."""
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['bpy'] = None; from fg3d_blender.cli import main; "
        f"sys.exit(main(['reconstruct', {str(PHOTO)!r}, '-o', {str(out)!r}, '--format', 'obj,blend']))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "fg3d: error: --format blend needs Blender's Python module"
    )
    assert not out.exists()
