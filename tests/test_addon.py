"""The Blender add-on, tested with real Blender code: the bpy module (bpy==5.0.1 in .venv; the zip with
wheels and the legacy install also in bpy 4.2 LTS and 4.5 LTS, see ``BPY_VERSIONS``) and, when a
``blender`` binary is on PATH (Debian's 3.4.1: ``apt-get install blender``), that binary too.

The zip is built by ``build_addon.py``, installed as an extension (``extensions.package_install_files``)
into a temporary ``BLENDER_USER_RESOURCES``, and its operator runs on a real photo; the legacy
add-on path (``preferences.addon_install``) runs in a separate process so that the installed copy, not
this checkout, is what gets imported.
"""

from __future__ import annotations

import ast
import atexit
import dataclasses
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fg3d_blender.core.pipeline import default_reconstructor  # noqa: E402
from fg3d_blender.core.refine import REFINE_GAIN  # noqa: E402

pytestmark = pytest.mark.slow  # integration tier: bpy and the Blender binary

REC = default_reconstructor()

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PHOTO = SHARED / "photos" / "fg3d_examples" / "test.jpg"
EXT_ID = "bl_ext.user_default.fg3d_blender"
N_VERTS, N_TRIS = 53215, 105954
# the shape keys of a result: the neutral identity, the 53 expression blendshapes, the refinement
KEYS = ["Basis", *REC.face_model.expressions.names, "FGNet"]
DATA_KINDS = (
    "objects",
    "meshes",
    "materials",
    "images",
    "cameras",
    "shape_keys",
    "node_groups",
    "collections",
    "textures",
)

# The bpy releases the zip with wheels and the legacy install are tested in: the LTS lines 4.2 and 4.5
# (newest patch releases on PyPI) and the 5.0 of requirements.txt.  Each runs in a venv of its own that
# holds bpy and what bpy pulls, nothing else: what Blender's own Python has.  numpy is pinned to 1.26.4,
# the numpy Blender 4.2-5.0 ship (bpy 4.5 and 5.0 require numpy<2, bpy 4.2 asks for any numpy).  All
# three are Python 3.11 builds, like .venv, so the compiled modules built there
# (render_ext/_raster and landmark_ext/_ert .cpython-311-*.so) are the ones every zip holds: one build
# serves them all.
BPY_VERSIONS = ("4.2.23", "4.5.15", importlib.metadata.version("bpy"))
BPY_VENVS = ROOT / ".venv-bpy"  # gitignored; each venv is made on first use and kept (~20 s, 1 GB each)

# Blender reads BLENDER_USER_RESOURCES once, when bpy is first imported: point it at a temporary folder
# now (collection time) so that installing the add-on never touches a real Blender configuration.
_USER_RES = None
if "bpy" not in sys.modules:
    _USER_RES = tempfile.mkdtemp(prefix="fg3d-test-blender-user-")
    os.environ["BLENDER_USER_RESOURCES"] = _USER_RES
    atexit.register(shutil.rmtree, _USER_RES, True)
if (SHARED / "models").is_dir():
    os.environ.setdefault("FG3D_ASSET_MIRROR", str(SHARED / "models"))


# The options the operator and the panel's scene settings share (one declaration: ops.reconstruct_options)
# and the one default that differs on purpose, (operator, scene settings): the panel's button adds the
# photo camera unless it is unticked, a script's call (and F3, the file browser) only when asked.
SHARED_OPTIONS = ("refine", "face_index", "texture_size", "add_images", "add_camera")
OWN_DEFAULTS = {"add_camera": (False, True)}

# What the registered RNA says of the operator's and the scene settings' properties (FG3D_SceneSettings,
# reached through Scene.fg3d: bpy.types does not list a PropertyGroup by its name), as JSON.  The same
# source runs here and in the scripts that install the zip into Blender 3.4 and bpy 4.2/4.5/5.0 in a
# process of their own, so every Blender the add-on is tested in checks it.
_RNA_OPTIONS = textwrap.dedent("""
    def rna_options(props):
        fields = ("type", "name", "description", "subtype", "default", "hard_min", "hard_max",
                  "soft_min", "soft_max", "step", "is_hidden", "is_skip_save", "is_enum_flag")
        out = {}
        for p in props:
            if p.identifier != "rna_type":
                out[p.identifier] = {f: getattr(p, f) for f in fields if hasattr(p, f)}
                if p.type == "ENUM":
                    out[p.identifier]["items"] = [[i.identifier, i.name, i.description] for i in p.enum_items]
        return out

    def reconstruct_rna_options(bpy):
        return {"operator": rna_options(bpy.ops.fg3d.reconstruct.get_rna_type().properties),
                "scene": rna_options(bpy.types.Scene.bl_rna.properties["fg3d"].fixed_type.properties)}
""")


def _rna_options(bpy) -> dict:
    namespace: dict = {}
    exec(_RNA_OPTIONS, namespace)
    return namespace["reconstruct_rna_options"](bpy)


def _option_differences(rna: dict) -> list:
    """How the operator's options and the scene settings' differ (other than ``OWN_DEFAULTS``), one line
    each; ``rna`` is what ``reconstruct_rna_options`` returns."""
    op, scene = rna["operator"], rna["scene"]
    shared = sorted(op.keys() & scene.keys())
    out = [] if shared == sorted(SHARED_OPTIONS) else [f"shared: {shared}, expected {sorted(SHARED_OPTIONS)}"]
    for name in SHARED_OPTIONS:
        a, b = dict(op.get(name, {})), dict(scene.get(name, {}))
        if name in OWN_DEFAULTS and (a.pop("default", None), b.pop("default", None)) != OWN_DEFAULTS[name]:
            out.append(
                f"{name}.default: operator {op.get(name, {}).get('default')!r}, "
                f"scene {scene.get(name, {}).get('default')!r}"
            )
        if not a.get("description"):
            out.append(f"{name}: no description")
        out += [
            f"{name}.{k}: operator {a.get(k)!r}, scene {b.get(k)!r}"
            for k in sorted(a | b)
            if a.get(k) != b.get(k)
        ]
    return out


def _counts(bpy) -> dict:
    return {k: sorted(x.name for x in getattr(bpy.data, k)) for k in DATA_KINDS}


def _gradient_png(folder: Path) -> Path:
    import cv2

    img = np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    path = folder / "gradient.png"
    cv2.imwrite(str(path), img)
    return path


def _to_blender(v_mm: np.ndarray) -> np.ndarray:
    """The documented frame change: (x, y, z) mm, y up, z to the viewer → (x, -z, y) m."""
    v = np.asarray(v_mm, np.float64)
    return np.column_stack([v[:, 0], -v[:, 2], v[:, 1]]) / 1000.0


def _co(block, n: int) -> np.ndarray:
    co = np.empty(n * 3, np.float32)
    block.foreach_get("co", co)
    return co.reshape(-1, 3).astype(np.float64)


def _mixed(keys, n: int) -> np.ndarray:
    """What the relative shape keys show together: Basis + Σ value · (key − Basis)."""
    basis = _co(keys.key_blocks["Basis"].data, n)
    return basis + sum(k.value * (_co(k.data, n) - basis) for k in keys.key_blocks[1:])


@pytest.fixture(scope="module")
def fg3d_addon_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, str(ROOT / "build_addon.py"), "--no-wheels", "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    zips = list(out.glob("fg3d_blender-*.zip"))
    assert len(zips) == 1 and not list(out.glob(".*part"))
    return zips[0]


@pytest.fixture(scope="module", params=BPY_VERSIONS)
def bpy_only_python(request) -> str:
    """The interpreter of a venv holding only bpy==VERSION and its requirements (made once, reused)."""
    venv, reqs = BPY_VENVS / request.param, f"bpy=={request.param} numpy==1.26.4"
    python, stamp = venv / "bin" / "python", venv / ".fg3d-stamp"
    if not (stamp.is_file() and stamp.read_text() == reqs):
        shutil.rmtree(venv, ignore_errors=True)
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs.split()],
        ):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            assert r.returncode == 0, f"{' '.join(cmd)}: {(r.stdout + r.stderr)[-3000:]}"
        stamp.write_text(reqs)  # last: a venv left half-made by a failure is made again
    return str(python)


@pytest.fixture(scope="module")
def fg3d_wheels_zip(tmp_path_factory):
    """The zip with the dependency wheels (fetched once into the wheel cache; from pip's cache after
    ``make setup``)."""
    sys.path.insert(0, str(ROOT))
    try:
        import build_addon
    finally:
        sys.path.remove(str(ROOT))
    cache = build_addon.default_wheel_cache()
    return build_addon.build(tmp_path_factory.mktemp("dist-wheels"), with_wheels=True, wheel_cache=cache)


@pytest.fixture(scope="module")
def fg3d_bpy(fg3d_addon_zip):
    bpy = pytest.importorskip("bpy")
    user = Path(bpy.utils.resource_path("USER")).resolve()
    if _USER_RES is None or not str(user).startswith(str(Path(_USER_RES).resolve())):
        pytest.skip("bpy was imported before BLENDER_USER_RESOURCES could point at a temporary folder")
    assert bpy.ops.extensions.package_install_files(
        filepath=str(fg3d_addon_zip), repo="user_default", enable_on_install=True
    ) == {"FINISHED"}
    yield bpy


@pytest.fixture(scope="module")
def fg3d_expected():
    """The same photo through the library directly, to compare the Blender data against."""
    from fg3d_blender.core.pipeline import reconstruct

    return reconstruct(PHOTO), REC.face_model.keypoints


@pytest.fixture(scope="module")
def fg3d_face(fg3d_bpy):
    """Run the installed operator once (camera and images on); returns (object name, counts before)."""
    bpy = fg3d_bpy
    before = _counts(bpy)
    assert bpy.ops.fg3d.reconstruct(filepath=str(PHOTO), add_camera=True, add_images=True) == {"FINISHED"}
    ob = bpy.context.view_layer.objects.active
    return ob.name, before


def _zip_sources(zip_path) -> dict:
    import zipfile

    with zipfile.ZipFile(zip_path) as z:
        return {n: z.read(n).decode("utf-8") for n in z.namelist() if n.endswith(".py")}


def test_zip_layout_extension_and_legacy(fg3d_addon_zip):
    import tomllib
    import zipfile

    with zipfile.ZipFile(fg3d_addon_zip) as z:
        names = set(z.namelist())
        manifest = tomllib.loads(z.read("fg3d_blender/blender_manifest.toml").decode())
        init = z.read("fg3d_blender/__init__.py").decode()
    assert {n.split("/")[0] for n in names} == {"fg3d_blender"}  # legacy install needs one folder
    assert "fg3d_blender/models/assets.json" in names
    for compiled in ("render_ext/_raster", "landmark_ext/_ert"):
        assert any(n.startswith(f"fg3d_blender/{compiled}") and n.endswith(("so", "pyd")) for n in names)
    assert "fg3d_blender/operators/ops.py" in names and "fg3d_blender/core/pipeline.py" in names
    third_party = {a["path"] for a in json.loads((ROOT / "models" / "assets.json").read_text())["assets"]}
    leaked = {
        n for n in names if Path(n).name in {Path(t).name for t in third_party} and not n.endswith(".json")
    }
    assert not leaked, f"third-party model files in the zip: {leaked}"
    # inference only: no training, benchmark or figure code, and nothing in the package imports them
    code = _zip_sources(fg3d_addon_zip)
    research = [n for n in names if any(part in n for part in ("train", "bench", "figure", "novel_view"))]
    assert not research, f"training/benchmark code in the add-on zip: {research}"
    for n, text in code.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("training", "benchmarks") for m in mods), (n, mods)
    bundled = json.loads((ROOT / "models" / "assets.json").read_text())["bundled"]
    assert {f"fg3d_blender/models/{b['path']}" for b in bundled} <= names  # our own weights ship
    assert (
        "fg3d_blender/models/ICT_FACEKIT_LICENSE.txt" in names
    )  # with the MIT notice of what they derive from
    assert manifest["id"] == "fg3d_blender" and manifest["type"] == "add-on"
    assert manifest["blender_version_min"] == "4.2.0" and "wheels" not in manifest  # --no-wheels
    from fg3d_blender import __version__

    assert manifest["version"] == __version__
    assert fg3d_addon_zip.name == f"fg3d_blender-{__version__}-{manifest['platforms'][0]}-no-wheels.zip"
    assert "fg3d_blender/requirements-runtime.txt" in names  # the Install Dependencies list ships
    bl_info = ast.literal_eval(init.split("bl_info = ", 1)[1].split("\n\n", 1)[0])
    assert bl_info["blender"] < (4, 2, 0) and bl_info["location"].startswith("View3D")


def test_installed_as_extension(fg3d_bpy):
    bpy = fg3d_bpy
    assert EXT_ID in {a.module for a in bpy.context.preferences.addons}
    op_cls = bpy.types.FG3D_OT_reconstruct
    assert op_cls.__module__.startswith(EXT_ID + ".")  # the installed copy, not this checkout
    assert op_cls.bl_options == {"REGISTER", "UNDO"}
    panel = bpy.types.FG3D_PT_reconstruct
    assert (panel.bl_space_type, panel.bl_region_type, panel.bl_category) == ("VIEW_3D", "UI", "FG3D")
    props = {p.identifier for p in bpy.ops.fg3d.reconstruct.get_rna_type().properties}
    assert {"filepath", "refine", "face_index", "texture_size", "add_images", "add_camera"} <= props
    prefs = bpy.context.preferences.addons[EXT_ID].preferences
    assert {"cache_dir", "mirror_dir", "threads"} <= {p.identifier for p in prefs.bl_rna.properties}
    assert hasattr(bpy.context.scene, "fg3d") and bpy.context.scene.fg3d.refine is True


def test_operator_and_panel_options_are_one_declaration(fg3d_bpy):
    """The registered RNA of the operator's options and of the panel's scene settings: the same names,
    types, labels, descriptions, limits and defaults (but the documented ``add_camera`` default)."""
    rna = _rna_options(fg3d_bpy)
    assert rna["operator"]["face_index"]["hard_max"] == 99 and rna["scene"]["add_camera"]["default"] is True
    assert _option_differences(rna) == []
    assert "photo" in rna["scene"] and {"filepath", "filter_glob", "synchronous"} <= rna["operator"].keys()


def test_option_differences_are_found():
    """The comparison above fails on any drift: a description, a limit, a default, a missing option."""

    def options(which: int, **drift) -> dict:  # which: 0 = the operator's, 1 = the scene settings'
        out = {n: {"type": "BOOLEAN", "name": n, "description": "d", "default": True} for n in SHARED_OPTIONS}
        out["face_index"].update(type="INT", default=0, hard_min=0, hard_max=99)
        for n, defaults in OWN_DEFAULTS.items():
            out[n]["default"] = defaults[which]
        for key, value in drift.items():
            name, field = key.split("__")
            out[name][field] = value
        return out

    assert _option_differences({"operator": options(0), "scene": options(1)}) == []
    for drift in (
        {"refine__description": "other"},
        {"face_index__hard_max": 9},
        {"add_images__default": False},
        {"add_camera__default": False},
    ):
        assert len(_option_differences({"operator": options(0), "scene": options(1, **drift)})) == 1, drift
    missing = options(1)
    del missing["texture_size"]
    assert _option_differences({"operator": options(0), "scene": missing})


def test_a_class_cannot_declare_a_shared_option_again(fg3d_bpy):
    ops = importlib.import_module(EXT_ID + ".operators.ops")  # the installed copy

    class Again:
        refine: bool

    with pytest.raises(TypeError, match="refine.*reconstruct_options"):
        ops.with_reconstruct_options(add_camera=True)(Again)


def test_reconstruct_adds_the_face(fg3d_bpy, fg3d_face, fg3d_expected):
    bpy, (name, before), (expected, keypoints) = fg3d_bpy, fg3d_face, fg3d_expected
    after = _counts(bpy)
    for kind, n_new in {
        "objects": 2,
        "meshes": 1,
        "materials": 1,
        "images": 4,
        "cameras": 1,
        "shape_keys": 1,
    }.items():
        assert len(after[kind]) == len(before[kind]) + n_new, kind
        assert set(before[kind]) <= set(after[kind]), f"an existing {kind} was renamed or removed"
    ob = bpy.data.objects[name]
    me = ob.data
    assert ob.type == "MESH" and len(me.vertices) == N_VERTS and len(me.polygons) == N_TRIS
    assert all(p.use_smooth for p in me.polygons[:100])
    # vertices: metres, Z up, the face toward -Y (the Basis key is the neutral 3DMM identity)
    basis = _co(me.vertices, N_VERTS)
    want = _to_blender(expected.vertices_neutral)
    assert np.allclose(basis - basis.mean(0), want - want.mean(0), atol=1e-5)
    assert 0.12 < np.ptp(basis[:, 0]) < 0.25 and 0.15 < np.ptp(basis[:, 2]) < 0.3  # a head, in metres
    nose = basis[keypoints[30]]
    assert nose[1] < np.percentile(basis[:, 1], 1)  # the nose tip is nearest the Front view
    normals = np.empty(N_TRIS * 3, np.float32)
    me.polygons.foreach_get("normal", normals)
    assert normals.reshape(-1, 3).mean(0)[1] < -0.3  # the surface faces -Y: the Front view sees it
    # UVs per face corner
    assert me.uv_layers.active.name == "UVMap"
    uv = np.empty(N_TRIS * 3 * 2, np.float32)
    me.uv_layers.active.data.foreach_get("uv", uv)
    loops = np.empty(N_TRIS * 3, np.int32)
    me.loops.foreach_get("vertex_index", loops)
    assert np.array_equal(loops, expected.triangles.ravel())
    assert np.allclose(uv.reshape(-1, 2), expected.uvs[expected.triangles.ravel()], atol=1e-6)


def test_material_has_the_packed_photo_texture(fg3d_bpy, fg3d_face, fg3d_expected):
    bpy, (name, _), (expected, _) = fg3d_bpy, fg3d_face, fg3d_expected
    mat = bpy.data.objects[name].active_material
    bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    link = bsdf.inputs["Base Color"].links[0]
    tex = link.from_node
    assert tex.type == "TEX_IMAGE" and tex.image.packed_file is not None
    assert tuple(tex.image.size) == expected.texture.shape[1::-1]
    px = np.empty(tex.image.size[0] * tex.image.size[1] * 4, np.float32)
    tex.image.pixels.foreach_get(px)
    img = np.flipud(px.reshape(tex.image.size[1], tex.image.size[0], 4))[:, :, 2::-1]  # → top-down BGR
    assert np.abs(img * 255 - expected.texture).mean() < 1.0  # the texture, in Blender's colour order


def test_shape_keys_neutral_blendshapes_and_fgnet(fg3d_bpy, fg3d_face, fg3d_expected):
    bpy, (name, _), (expected, _) = fg3d_bpy, fg3d_face, fg3d_expected
    keys = bpy.data.objects[name].data.shape_keys
    assert keys.use_relative and [k.name for k in keys.key_blocks] == KEYS
    basis = _co(keys.key_blocks["Basis"].data, N_VERTS)
    assert np.allclose(
        basis - basis.mean(0),
        _to_blender(expected.vertices_neutral) - _to_blender(expected.vertices_neutral).mean(0),
        atol=1e-5,
    )  # Basis is the neutral identity
    fgnet = keys.key_blocks["FGNet"]
    assert fgnet.relative_key.name == "Basis" and fgnet.value == 1.0
    assert (fgnet.slider_min, fgnet.slider_max) == (0.0, 1.0 / REFINE_GAIN)  # the network's whole difference
    delta = _co(fgnet.data, N_VERTS) - basis
    want = _to_blender(expected.vertices) - _to_blender(expected.vertices_coarse)
    assert np.allclose(delta, want, atol=1e-5)  # the slider dials exactly the refinement
    shapes = expected.blendshapes
    for kname in ("jawOpen", "mouthSmile_L", "eyeBlink_R"):
        k = keys.key_blocks[kname]
        assert k.value == pytest.approx(expected.expression[kname], abs=1e-6)
        mode = _to_blender(shapes.modes[shapes.names.index(kname)]) - _to_blender(np.zeros((1, 3)))
        assert np.allclose(_co(k.data, N_VERTS) - basis, mode, atol=1e-5)
    # all keys at their values: the reconstructed mesh, up to the object's centring
    mixed = _mixed(keys, N_VERTS)
    want = _to_blender(expected.vertices)
    assert np.abs((mixed - mixed.mean(0)) - (want - want.mean(0))).max() < 1e-5


def test_custom_properties_and_images(fg3d_bpy, fg3d_face, fg3d_expected):
    bpy, (name, _), (expected, _) = fg3d_bpy, fg3d_face, fg3d_expected
    ob = bpy.data.objects[name]
    assert ob["fg3d_source_photo"] == str(PHOTO)
    for k in ("yaw", "pitch", "roll"):
        assert ob[f"fg3d_{k}"] == pytest.approx(expected.pose[k], abs=1e-3)
    h, w = expected.image.shape[:2]
    for key in ("fg3d_depth", "fg3d_pncc", "fg3d_photo"):
        im = ob[key]
        assert isinstance(im, bpy.types.Image) and im.packed_file is not None, key
        assert tuple(im.size) == (w, h), key
    assert ob["fg3d_depth"].colorspace_settings.name == "Non-Color"


def test_camera_sees_the_face_as_in_the_photo(fg3d_bpy, fg3d_face, fg3d_expected):
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    bpy, (name, _), (expected, keypoints) = fg3d_bpy, fg3d_face, fg3d_expected
    scene = bpy.context.scene
    ob, cam = bpy.data.objects[name], bpy.data.objects[name + "_camera"]
    h, w = expected.image.shape[:2]
    # the default scene has a camera: ours does not replace it, and the render size is left alone
    assert scene.camera.name == "Camera" and (scene.render.resolution_x, scene.render.resolution_y) == (
        1920,
        1080,
    )
    assert cam.data.type == "ORTHO" and cam.data.background_images[0].image == ob["fg3d_photo"]
    assert cam.parent == ob and cam.users_collection == ob.users_collection  # moves with its face
    assert ob.users_collection[0].name == name and len(ob.users_collection[0].objects) == 2
    shown = _mixed(ob.data.shape_keys, N_VERTS)
    px = []
    saved = scene.render.resolution_x, scene.render.resolution_y
    scene.render.resolution_x, scene.render.resolution_y = w, h  # as when it is the scene's camera
    try:
        for i in keypoints:
            x, y, _ = world_to_camera_view(scene, cam, ob.matrix_world @ Vector(shown[int(i)]))
            px.append((x * w - 0.5, (1.0 - y) * h - 0.5))
    finally:
        scene.render.resolution_x, scene.render.resolution_y = saved
    err = np.linalg.norm(np.array(px) - expected.landmarks_2d, axis=1)
    assert err.max() < 0.02 * w, f"landmarks through the Blender camera are off by up to {err.max():.1f} px"


def test_second_run_adds_a_new_object_and_touches_nothing(fg3d_bpy, fg3d_face):
    from mathutils import Vector

    bpy, (name, _) = fg3d_bpy, fg3d_face
    first = bpy.data.objects[name]
    state = (
        first.data.name,
        first.active_material.name,
        tuple(first.location),
        _co(first.data.vertices, N_VERTS).sum(),
        first["fg3d_yaw"],
    )
    before = _counts(bpy)
    assert bpy.ops.fg3d.reconstruct(
        filepath=str(PHOTO), refine=False, texture_size="256", add_images=False, add_camera=False
    ) == {"FINISHED"}
    after = _counts(bpy)
    new = set(after["objects"]) - set(before["objects"])
    assert len(new) == 1 and name not in new
    assert len(after["images"]) == len(before["images"]) + 1  # only its texture
    assert after["cameras"] == before["cameras"]
    first = bpy.data.objects[name]
    assert (
        first.data.name,
        first.active_material.name,
        tuple(first.location),
        _co(first.data.vertices, N_VERTS).sum(),
        first["fg3d_yaw"],
    ) == state
    second = bpy.data.objects[new.pop()]
    assert second.active_material.node_tree.nodes["Face texture"].image.size[0] == 256
    assert bpy.context.view_layer.objects.active == second and not first.select_get()
    # beside the first, not inside it, each in its own collection
    x_max_first = max((first.matrix_world @ Vector(c)).x for c in first.bound_box)
    x_min_second = min((second.matrix_world @ Vector(c)).x for c in second.bound_box)
    assert x_min_second > x_max_first and second.users_collection[0].name == second.name


def test_photo_camera_becomes_the_camera_of_a_scene_without_one(fg3d_bpy, fg3d_expected):
    from fg3d_blender.operators.build import BuildOptions, add_result

    bpy, (expected, _) = fg3d_bpy, fg3d_expected
    scene = bpy.data.scenes.new("no camera yet")
    built = add_result(expected, scene, scene.collection, None, BuildOptions(add_camera=True))
    try:
        h, w = expected.image.shape[:2]
        assert scene.camera == built.camera
        assert (scene.render.resolution_x, scene.render.resolution_y) == (w, h)
        assert built.collection.name in scene.collection.children
    finally:  # leave no data behind: the save-and-reopen test counts it
        ob, cam, mat = built.obj, built.camera, built.obj.active_material
        images = [*built.images, mat.node_tree.nodes["Face texture"].image]
        me, cam_data = ob.data, cam.data
        bpy.data.objects.remove(cam)
        bpy.data.objects.remove(ob)
        bpy.data.meshes.remove(me)
        bpy.data.cameras.remove(cam_data)
        bpy.data.materials.remove(mat)
        bpy.data.collections.remove(built.collection)
        bpy.data.scenes.remove(scene)
        for im in images:
            bpy.data.images.remove(im)


def test_one_undo_step_removes_everything(fg3d_bpy, fg3d_face):
    bpy = fg3d_bpy
    win = bpy.context.window_manager.windows[0]
    with bpy.context.temp_override(window=win):
        bpy.ops.ed.undo_push(message="before FG3D")
        before = _counts(bpy)
        # 'EXEC_DEFAULT', True: push an undo step as a click in the UI does (scripts don't by default)
        assert bpy.ops.fg3d.reconstruct(
            "EXEC_DEFAULT", True, filepath=str(PHOTO), refine=False, texture_size="256", add_camera=True
        ) == {"FINISHED"}
        added = _counts(bpy)
        assert len(added["objects"]) == len(before["objects"]) + 2
        bpy.ops.ed.undo()
        assert _counts(bpy) == before
        bpy.ops.ed.redo()  # the operator's own step holds everything it made
        assert _counts(bpy) == added


def test_save_and_reopen(fg3d_bpy, fg3d_face, tmp_path):
    bpy, (name, _) = fg3d_bpy, fg3d_face
    path = tmp_path / "faces.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    before = {k: v for k, v in _counts(bpy).items() if k not in ("materials", "node_groups", "textures")}
    bpy.ops.wm.open_mainfile(filepath=str(path))  # replaces all data with what was saved
    assert {k: v for k, v in _counts(bpy).items() if k in before} == before  # (unused data is not saved)
    ob = bpy.data.objects[name]
    assert len(ob.data.vertices) == N_VERTS
    assert [k.name for k in ob.data.shape_keys.key_blocks] == KEYS
    tex = ob.active_material.node_tree.nodes["Face texture"].image
    for im in (tex, ob["fg3d_depth"], ob["fg3d_pncc"], ob["fg3d_photo"]):
        assert im.packed_file is not None and im.packed_file.size > 0 and im.size[0] > 0, im.name
    assert ob["fg3d_source_photo"] == str(PHOTO)


def test_no_face_leaves_blender_data_unchanged(fg3d_bpy, tmp_path):
    bpy = fg3d_bpy
    before = _counts(bpy)
    with pytest.raises(RuntimeError, match="no face found"):
        bpy.ops.fg3d.reconstruct(filepath=str(_gradient_png(tmp_path)), add_camera=True)
    not_a_photo = tmp_path / "notes.png"
    not_a_photo.write_text("not an image")
    with pytest.raises(RuntimeError, match="not a readable image") as info:
        bpy.ops.fg3d.reconstruct(filepath=str(not_a_photo))
    assert "\n" not in str(info.value).strip() and "Traceback" not in str(info.value)
    with pytest.raises(RuntimeError, match="no such file"):
        bpy.ops.fg3d.reconstruct(filepath=str(tmp_path / "missing.jpg"))
    assert _counts(bpy) == before


def test_hostile_photo_files_give_one_line_and_leave_the_scene_unchanged(fg3d_bpy, tmp_path):
    """The loader's refusals reach the operator as one line each: a FIFO (it would block forever), an
    EXR, a thin strip and a header declaring 30000² pixels; nothing is added to the scene."""
    import cv2

    bpy = fg3d_bpy
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    exr = tmp_path / "render.exr"
    exr.write_bytes(b"\x76\x2f\x31\x01" + bytes(200))
    strip = tmp_path / "strip.png"
    cv2.imwrite(str(strip), np.full((16, 2400, 3), 128, np.uint8))
    huge = tmp_path / "huge.png"
    data = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    data[16:24] = (30000).to_bytes(4, "big") * 2
    huge.write_bytes(bytes(data))
    before = _counts(bpy)
    for path in (fifo, exr, strip, huge):
        with pytest.raises(RuntimeError) as info:
            bpy.ops.fg3d.reconstruct(filepath=str(path))
        text = str(info.value).strip()
        assert path.name in text and "\n" not in text and "Traceback" not in text and "internal" not in text
    assert _counts(bpy) == before


def test_failed_build_removes_what_it_made(fg3d_bpy, fg3d_expected):
    """A failure half-way through building (after mesh, material and object exist) rolls all back."""
    from fg3d_blender.operators.build import BuildOptions, add_result

    bpy, (expected, _) = fg3d_bpy, fg3d_expected
    scene = bpy.context.scene
    settings = (scene.render.resolution_x, scene.render.resolution_y, scene.camera)
    broken = dataclasses.replace(expected, pncc=np.zeros((0, 0, 3), np.uint8))  # PNCC cannot be encoded
    before = _counts(bpy)
    with pytest.raises(Exception):  # noqa: B017 - whatever Blender raises, nothing may be left behind
        add_result(
            broken,
            scene,
            scene.collection,
            bpy.context.view_layer,
            BuildOptions(add_images=True, add_camera=True),
        )
    assert _counts(bpy) == before
    assert (scene.render.resolution_x, scene.render.resolution_y, scene.camera) == settings


def test_worker_thread_progress_and_cancel():
    from fg3d_blender.operators import job as jobmod

    tree = ast.parse(Path(jobmod.__file__).read_text())
    imported = {
        a.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    } | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "bpy" not in imported and "mathutils" not in imported  # no Blender calls off the main thread
    settings = jobmod.Settings(filepath=str(PHOTO), refine=False, texture_size=256)
    job = jobmod.Job(settings).start()
    seen, deadline = [], time.monotonic() + 300
    while not job.finished and time.monotonic() < deadline:
        seen += [v for k, v in job.poll() if k == "progress"]
        time.sleep(0.02)
    assert job.finished and job.error is None and job.result.vertices.shape == (N_VERTS, 3)
    stages = [s for s, _ in seen]
    assert stages[0] in ("models", "load") and stages[-1] == "done"
    assert {"load", "detect", "3dmm", "texture"} <= set(stages)
    assert [f for _, f in seen] == sorted(f for _, f in seen)
    assert "%" in job.label
    cancelled = jobmod.Job(settings).start()
    cancelled.cancel()
    assert cancelled.join(300)
    cancelled.poll()
    assert cancelled.finished and cancelled.result is None  # computed, then discarded
    bad = jobmod.Job(jobmod.Settings(filepath=str(ROOT / "missing.jpg"))).start()
    bad.join(60)
    bad.poll()
    assert bad.finished and bad.result is None and "no such file" in bad.error


def test_preferences_folders_drive_fetch_assets(fg3d_bpy, tmp_path):
    bpy = fg3d_bpy
    if not (SHARED / "models").is_dir():
        pytest.skip("no asset mirror at ../shared/models")
    prefs = bpy.context.preferences.addons[EXT_ID].preferences
    saved_env = {k: os.environ.get(k) for k in ("FG3D_CACHE_DIR", "FG3D_ASSET_MIRROR")}
    try:
        prefs.cache_dir, prefs.mirror_dir = str(tmp_path / "cache"), str(SHARED / "models")
        assert bpy.ops.fg3d.fetch_assets() == {"FINISHED"}
        got = tmp_path / "cache" / "beyond3dmm" / "Model_PAF.pkl"
        assert (
            got.is_file()
            and got.stat().st_size == (SHARED / "models" / "beyond3dmm" / "Model_PAF.pkl").stat().st_size
        )
        # and dlib's detector and landmark arrays are prepared, so the first Reconstruct need not
        assert (
            len(list((tmp_path / "cache" / "derived").glob("shape_predictor_68_face_landmarks.*.npy"))) == 6
        )
        prefs.mirror_dir = str(tmp_path / "empty-mirror")
        (tmp_path / "empty-mirror").mkdir()
        prefs.cache_dir = str(tmp_path / "cache2")
        with pytest.raises(RuntimeError, match="not in the mirror"):
            bpy.ops.fg3d.fetch_assets()
    finally:
        prefs.cache_dir = prefs.mirror_dir = ""
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_corrupt_or_misplaced_cache_chosen_in_preferences_gives_one_line(fg3d_bpy, tmp_path):
    """The Asset cache folder preference changes within one Blender session: the next Reconstruct
    verifies the assets of the new folder (a corrupt weights file there is found; the models loaded
    from the default cache by the tests before are not reused), and a folder path that is a file is one
    line; the scene is unchanged either way."""
    bpy = fg3d_bpy
    prefs = bpy.context.preferences.addons[EXT_ID].preferences
    saved_env = {k: os.environ.get(k) for k in ("FG3D_CACHE_DIR", "FG3D_ASSET_MIRROR")}
    bad = tmp_path / "bad-cache"
    shutil.copytree(SHARED / "models", bad, ignore=shutil.ignore_patterns("eos"))
    w = bad / "3ddfa_v2" / "mb05_120x120.pth"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    before = _counts(bpy)
    try:
        os.environ["FG3D_ASSET_MIRROR"] = ""
        prefs.cache_dir = str(bad)
        with pytest.raises(RuntimeError, match="mb05_120x120.pth .*corrupt") as info:
            bpy.ops.fg3d.reconstruct(filepath=str(PHOTO), refine=False, texture_size="256")
        assert "\n" not in str(info.value).strip() and "Traceback" not in str(info.value)
        prefs.cache_dir = str(blocker)
        with pytest.raises(RuntimeError, match="is a file, not a folder"):
            bpy.ops.fg3d.reconstruct(filepath=str(PHOTO), refine=False, texture_size="256")
        assert _counts(bpy) == before
    finally:
        prefs.cache_dir = ""
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_LEGACY_SCRIPT = _RNA_OPTIONS + textwrap.dedent("""
    import json, os, sys, time
    zip_path, photo, noface = sys.argv[-3:]
    import bpy, addon_utils
    out = {"blender": bpy.app.version_string}
    out["install"] = sorted(bpy.ops.preferences.addon_install(filepath=zip_path))
    addons_dir = bpy.utils.user_resource('SCRIPTS', path="addons")
    out["enabled"] = addon_utils.enable("fg3d_blender", default_set=True) is not None
    out["options"] = reconstruct_rna_options(bpy)
    import fg3d_blender
    from fg3d_blender.core import dependencies
    out["file"] = fg3d_blender.__file__
    out["addons_dir"] = addons_dir
    counts = lambda: {k: len(getattr(bpy.data, k)) for k in ("objects", "meshes", "materials", "images")}
    before = counts()
    out["missing"] = [r.module for r in dependencies.missing() if r.module]
    if out["missing"]:  # a Blender without the dependencies: a run says so, then the button installs them
        try:
            bpy.ops.fg3d.reconstruct(filepath=photo)
            out["run_missing"] = "no error"
        except RuntimeError as exc:
            out["run_missing"] = str(exc)
        t0 = time.monotonic()
        out["deps"] = sorted(bpy.ops.fg3d.install_dependencies())
        out["deps_s"] = round(time.monotonic() - t0, 1)
        out["missing_after"] = [r.label for r in dependencies.missing()]
    try:
        bpy.ops.fg3d.reconstruct(filepath=noface)
        out["noface"] = "no error"
    except RuntimeError as exc:
        out["noface"] = str(exc)
    out["unchanged"] = before == counts()
    t0 = time.monotonic()
    out["run"] = sorted(bpy.ops.fg3d.reconstruct(filepath=photo, refine=True, texture_size='1024'))
    out["first_run_s"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    bpy.ops.fg3d.reconstruct(filepath=photo, refine=True, texture_size='1024')
    out["second_run_s"] = round(time.monotonic() - t0, 2)
    ob = bpy.context.view_layer.objects.active
    out["verts"] = len(ob.data.vertices)
    out["keys"] = [k.name for k in ob.data.shape_keys.key_blocks]
    out["packed"] = ob.active_material.node_tree.nodes["Face texture"].image.packed_file is not None
    out["depth"] = ob["fg3d_depth"].packed_file is not None
    bpy.ops.wm.save_userpref()
    print("FG3D-JSON " + json.dumps(out), flush=True)
""")


def _blender_env(user: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        BLENDER_USER_RESOURCES=str(user),
        BLENDER_USER_SCRIPTS=str(user / "scripts"),
        BLENDER_USER_CONFIG=str(user / "config"),
        OMP_NUM_THREADS="1",
    )
    return env


def _json_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("FG3D-JSON ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1][len("FG3D-JSON ") :])


def test_legacy_addon_install_bpy(fg3d_addon_zip, bpy_only_python, tmp_path):
    """``preferences.addon_install`` (the Blender 3.x way) in a fresh process of a bpy-only venv: the
    installed copy registers without its dependencies, says what is missing, Install Dependencies
    (pip, for real) brings them and the installed copy runs."""
    user = tmp_path / "user"
    script = tmp_path / "legacy.py"
    script.write_text(_LEGACY_SCRIPT)
    r = subprocess.run(
        [bpy_only_python, str(script), str(fg3d_addon_zip), str(PHOTO), str(_gradient_png(tmp_path))],
        cwd=tmp_path,
        env=_blender_env(user),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = _json_line(r.stdout + r.stderr)
    assert out["blender"].startswith(Path(bpy_only_python).parents[1].name)
    assert out["install"] == ["FINISHED"] and out["enabled"]
    assert _option_differences(out["options"]) == []  # the options as this bpy registered them
    assert Path(out["file"]).resolve().is_relative_to(Path(out["addons_dir"]).resolve())
    assert {"onnxruntime", "cv2", "dlib", "scipy"} <= set(out["missing"])  # bpy brings none of them
    assert "Install Dependencies" in out["run_missing"] and "Traceback" not in out["run_missing"]
    assert out["deps"] == ["FINISHED"] and out["missing_after"] == []
    assert "no face found" in out["noface"] and out["unchanged"]
    assert out["run"] == ["FINISHED"] and out["verts"] == N_VERTS and out["keys"] == KEYS
    assert out["packed"] and out["depth"]
    assert "Traceback" not in r.stderr  # nothing failed along the way, however it was reported


@pytest.fixture(scope="module")
def fg3d_real_blender(fg3d_addon_zip, tmp_path_factory):
    """The real ``blender`` binary (Debian: 3.4.1) as a new user has it: the zip installed the legacy way
    into a Blender whose Python has none of the dependencies (Debian's has not even numpy), a run that
    says what is missing, then Install Dependencies (pip, for real) and runs.  The saved preferences
    keep the add-on enabled for later launches.  Returns (blender, env, folder, report, stderr)."""
    blender = shutil.which("blender")
    if blender is None:
        pytest.skip("no blender binary on PATH (Debian: apt-get install blender; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("real-blender")
    env = _blender_env(tmp / "user")
    script = tmp / "legacy.py"
    script.write_text(_LEGACY_SCRIPT)
    r = subprocess.run(
        [
            blender,
            "--background",
            "--factory-startup",
            "--python-exit-code",
            "1",
            "--python",
            str(script),
            "--",
            str(fg3d_addon_zip),
            str(PHOTO),
            str(_gradient_png(tmp)),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = _json_line(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-2000:]
    return blender, env, tmp, out, r.stderr


def test_real_blender_legacy_install_dependencies_and_run(fg3d_real_blender):
    out, stderr = fg3d_real_blender[3], fg3d_real_blender[4]
    print(
        f"\nreal Blender {out['blender']}: dependencies installed in {out.get('deps_s')} s; "
        f"first run {out['first_run_s']} s, second run {out['second_run_s']} s"
    )
    assert out["install"] == ["FINISHED"] and out["enabled"] and out["verts"] == N_VERTS
    assert _option_differences(out["options"]) == []  # the options as Blender 3.4 registered them
    assert Path(out["file"]).resolve().is_relative_to(Path(out["addons_dir"]).resolve())
    if out["missing"]:  # Debian's Blender: nothing installed at first
        line = next(ln for ln in stderr.splitlines() if "FG3D needs Python modules" in ln)  # at enable time
        assert "Install Dependencies" in line and all(m in line for m in out["missing"])
        assert {"numpy", "onnxruntime", "cv2", "dlib"} <= set(out["missing"])  # Debian's Blender has none
        assert "Install Dependencies" in out["run_missing"] and "Traceback" not in out["run_missing"]
        assert out["deps"] == ["FINISHED"] and out["missing_after"] == []
    assert "no face found" in out["noface"] and out["unchanged"]
    assert out["keys"] == KEYS and out["packed"] and out["depth"]
    assert "Traceback" not in stderr and "unregister" not in stderr  # a clean exit


def _readme_blender_line() -> str:
    lines = [
        ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("blender --background")
    ]
    assert len(lines) == 1, "the README documents one headless Blender command"
    return lines[0]


def test_real_blender_headless_one_liner(fg3d_real_blender):
    """The README's ``blender --background … --python-expr …`` line, run as written (in a folder with a
    ``photo.jpg``): it writes ``face.blend``; on a photo without a face it exits non-zero and writes
    nothing."""
    blender, env, tmp, *_ = fg3d_real_blender
    argv = shlex.split(_readme_blender_line())
    assert argv[0] == "blender" and "--python-exit-code" in argv
    for name, photo, ok in (("good", PHOTO, True), ("noface", _gradient_png(tmp), False)):
        folder = tmp / f"one-liner-{name}"
        folder.mkdir()
        (folder / "photo.jpg").symlink_to(photo)
        r = subprocess.run(
            [blender, *argv[1:]], cwd=folder, env=env, capture_output=True, text=True, timeout=600
        )
        blend = folder / "face.blend"
        if ok:
            assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
            assert blend.is_file() and blend.stat().st_size > 1_000_000
            assert "Traceback" not in r.stderr and "unregister" not in r.stderr
        else:
            assert r.returncode != 0 and not blend.exists()
            assert "no face found" in r.stdout + r.stderr


_GUI_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    import bpy
    photo = sys.argv[-1]
    shots = os.environ["FG3D_SHOTS"]
    from fg3d_blender.operators import job as ops  # the running jobs and their labels
    S = {"ticks": 0, "ticks_computing": 0, "max_gap_s": 0.0, "labels": [], "shots": [], "tab_tries": 0}
    t = {"phase": "cancel", "last": None}

    from fg3d_blender.operators import ui as _ui

    def ctx():
        win = bpy.context.window_manager.windows[0]
        area = next(a for a in win.screen.areas if a.type == 'VIEW_3D')
        return dict(window=win, screen=win.screen, area=area,
                    region=next(r for r in area.regions if r.type == 'WINDOW'))

    def shot(name):
        path = os.path.join(shots, name + ".png")
        with bpy.context.temp_override(**ctx()):
            bpy.ops.screen.screenshot(filepath=path)
        S["shots"].append(name)

    def invoke(**kw):
        opts = {"filepath": photo, "refine": False, "texture_size": '256', **kw}
        with bpy.context.temp_override(**ctx()):  # what clicking Reconstruct in the panel does
            return sorted(bpy.ops.fg3d.reconstruct('INVOKE_DEFAULT', **opts))

    def workers():
        return [th for th in threading.enumerate() if th.name == "fg3d-reconstruct"]

    def done(**kw):
        S.update(kw)
        print("FG3D-JSON " + json.dumps(S), flush=True)
        os._exit(0)

    def texture_size():
        ob = bpy.context.view_layer.objects.active
        return ob.active_material.node_tree.nodes["Face texture"].image.size[0]

    def tick():  # a UI timer: it only runs when Blender's main loop is free
        try:
            return step()
        except Exception:  # a broken step ends the run at once, with the traceback in the report
            import traceback
            done(error=traceback.format_exc())

    def step():
        now = time.monotonic()
        computing = bool(workers())
        if t["last"] is not None and computing:
            S["max_gap_s"] = round(max(S["max_gap_s"], now - t["last"]), 2)
        t["last"] = now
        S["ticks"] += 1
        S["ticks_computing"] += computing
        if ops.running:
            label = ops.running_label("reconstruct")
            if label not in S["labels"]:
                S["labels"].append(label)
        el = now - t["t0"]
        if t["phase"] == "cancel" and el > 0.2 and "esc" not in S:
            S["esc"] = True
            win = bpy.context.window_manager.windows[0]
            win.event_simulate('ESC', 'PRESS')
            win.event_simulate('ESC', 'RELEASE')
        elif t["phase"] == "cancel" and "esc" in S and not workers():
            S["cancel_busy_after"] = bool(ops.running)
            S["cancel_objects"] = len(bpy.data.objects)
            t["phase"], t["t0"] = "run", now
            S["run_ret"] = invoke(add_camera=True, refine=True, texture_size='1024')  # ~2 s: seen running
        elif t["phase"] == "run" and ops.running and "progress" not in S["shots"]:
            shot("progress")
        elif t["phase"] == "run" and not ops.running:
            S["run_objects"] = len(bpy.data.objects)
            ob = bpy.context.view_layer.objects.active
            S["active"] = ob.name
            rv3d = ctx()["area"].spaces.active.region_3d
            centre = sum((ob.matrix_world @ __import__("mathutils").Vector(c) for c in ob.bound_box),
                         __import__("mathutils").Vector()) / 8
            S["framed"] = [round((rv3d.view_location - centre).length, 3), round(rv3d.view_distance, 3)]
            t["phase"], t["t0"] = "result", now
        elif t["phase"] == "result" and el > 0.5 and "splash_closed" not in S:
            win = bpy.context.window_manager.windows[0]
            win.event_simulate('ESC', 'PRESS')  # close the splash screen (it is up at startup)
            win.event_simulate('ESC', 'RELEASE')
            S["splash_closed"], t["t0"] = True, now
        elif t["phase"] == "result" and el > 0.5:
            shot("result")
            with bpy.context.temp_override(**ctx()):
                bpy.ops.ed.undo()  # the whole run is one undo step
                S["undo_objects"] = len(bpy.data.objects)
                bpy.ops.ed.redo()
                S["redo_objects"] = len(bpy.data.objects)
            t["phase"], t["t0"] = "rerun", now
            S["rerun_ret"] = invoke()  # a second run, whose options are then adjusted
        elif t["phase"] == "rerun" and not ops.running and not workers() and el > 0.5:
            S["rerun_objects"] = len(bpy.data.objects)
            t["phase"], t["t0"] = "adjust", now
        elif t["phase"] == "adjust" and el > 0.5:
            # Adjust Last Operation: change an option, Blender undoes the run and executes it again
            last = bpy.context.window_manager.operators[-1]
            S["last_op"] = last.bl_idname
            last.properties.texture_size = '512'
            with bpy.context.temp_override(**ctx()):
                S["adjust_ret"] = sorted(bpy.ops.ed.undo_redo())
            S["adjust_workers"] = len(workers())  # synchronous: nothing left running
            S["adjust_objects"] = len(bpy.data.objects)
            S["adjust_texture"] = texture_size()
            t["phase"], t["t0"] = "browse", now
        elif t["phase"] == "browse" and "browse_ret" not in S and el > 0.5:
            # Reconstruct without a photo: the file browser opens, then the modal run
            with bpy.context.temp_override(**ctx()):
                S["browse_ret"] = sorted(bpy.ops.fg3d.reconstruct('INVOKE_DEFAULT'))
            t["t0"] = now
        elif t["phase"] == "browse" and "browse_ret" in S and "browse_exec" not in S and el > 0.5:
            picked = pick_in_browser()  # the browser window opens on a later turn of the event loop
            if picked is not None:
                S["browse_exec"], S["browse_busy"], t["t0"] = picked, False, now
        elif t["phase"] == "browse" and "browse_exec" in S:
            S["browse_busy"] |= bool(ops.running)  # the browser runs the operator on a later turn
            if (S["browse_busy"] and not ops.running and not workers()) or el > 60:
                S["browse_objects"] = len(bpy.data.objects)
                t["phase"], t["t0"] = "panel", now
        elif t["phase"] == "panel":
            ui_region = next(r for r in ctx()["area"].regions if r.type == 'UI')
            ui_region.tag_redraw()  # the sidebar draws each tick: a drawn FG3D panel is then seen
            # the sidebar has drawn the FG3D panel when it made the photo's thumbnail (ui._previews; in
            # 3.4 the panel is never on screen before this phase, and the popup below comes after)
            shown = any(k.startswith(photo) for k in _ui._previews.keys())
            if el > 0.3 and not shown and S["tab_tries"] < 8:
                # Blender 3.4 has no Python way to pick a sidebar tab (active_panel_category is 3.6+):
                # Ctrl+Wheel over the sidebar's tab strip, as a user can, until the FG3D panel draws
                # (over a button Ctrl+Wheel changes its value; the empty part passes it to the view)
                x, y = ui_region.x + ui_region.width - 8, ui_region.y + ui_region.height - 40
                win = bpy.context.window_manager.windows[0]
                wheel = 'WHEELDOWNMOUSE' if S["tab_tries"] < 4 else 'WHEELUPMOUSE'
                win.event_simulate('MOUSEMOVE', 'NOTHING', x=x, y=y)
                win.event_simulate(wheel, 'PRESS', x=x, y=y, ctrl=True)
                S["tab_tries"] += 1
                t["t0"] = now
            elif el > 0.3:
                S["panel_tab"] = shown
                shot("panel")
                draw_ui()  # last: an open popup must not outlive the data it shows (undo frees it)
                done()
        if el > 300:
            done(timeout=True)
        return 0.05

    def draw_ui():  # the sidebar panel and the preferences, drawn into a real layout (a popup)
        from fg3d_blender.operators import prefs, ui
        addon_prefs = bpy.context.preferences.addons["fg3d_blender"].preferences

        def draw(menu, context):
            for name, fn in (("panel", lambda: ui.FG3D_PT_reconstruct.draw(menu, context)),
                             ("prefs", lambda: prefs.draw_preferences(menu.layout, addon_prefs))):
                try:
                    fn()
                    S[name] = "drawn"
                except Exception as exc:
                    S[name] = repr(exc)
        with bpy.context.temp_override(**ctx()):
            bpy.context.window_manager.popup_menu(draw, title="FG3D")
        S["previews"] = [k.rsplit(":", 1)[0] for k in ui._previews.keys()]

    def pick_in_browser():
        # like a user: choose the folder, wait until the browser has listed it (its listing runs in a
        # job thread; executing while it reads races that thread: Blender 3.4 segfaults), then Open
        for win in bpy.context.window_manager.windows:
            for area in win.screen.areas:
                if area.type == 'FILE_BROWSER':
                    params = area.spaces.active.params
                    folder = os.path.dirname(photo)
                    shown = os.path.normpath(os.fsdecode(params.directory))
                    if shown != folder or params.filename != os.path.basename(photo):
                        params.directory = folder.encode()
                        params.filename = os.path.basename(photo)
                        t["listed_at"] = time.monotonic()
                        return None
                    if time.monotonic() - t.get("listed_at", 0.0) < 1.5:
                        return None
                    region = next(r for r in area.regions if r.type == 'WINDOW')
                    with bpy.context.temp_override(window=win, screen=win.screen, area=area, region=region):
                        return sorted(bpy.ops.file.execute())
        return None

    def start():
        S["objects"] = len(bpy.data.objects)
        bpy.context.scene.fg3d.photo = photo  # the panel shows it, with its thumbnail
        space = ctx()["area"].spaces.active
        space.show_region_ui = True  # the sidebar, on the FG3D tab where Blender can switch tabs
        ui_region = next(r for r in ctx()["area"].regions if r.type == 'UI')
        if hasattr(ui_region, "active_panel_category"):
            ui_region.active_panel_category = "FG3D"
        # the slowest options, so that Esc (0.2 s in) lands mid-run even with the models cached
        S["cancel_ret"] = invoke(refine=True, texture_size='2048')
        t["t0"] = time.monotonic()
        bpy.app.timers.register(tick, first_interval=0.05)

    bpy.app.timers.register(start, first_interval=1.0)
""")


@pytest.mark.skipif(
    shutil.which("xvfb-run") is None, reason="no xvfb-run for a windowed Blender (apt-get install xvfb)"
)
def test_real_blender_modal_ui(fg3d_real_blender):
    """Blender with a window (on Xvfb): the panel and preferences draw, the Reconstruct button's modal run
    keeps the UI alive, reports progress, Esc cancels and discards the result, the result is framed in
    the view, Adjust Last Operation (redo) re-runs it synchronously, a finished run is one undo step,
    and without a photo the operator opens the file browser and then runs modally.  Screenshots of the
    progress, the result and the panel are saved (``$FG3D_SCREENSHOTS``, else the test's folder)."""
    blender, env, tmp, *_ = fg3d_real_blender
    script = tmp / "gui.py"
    script.write_text(_GUI_SCRIPT)
    shots = Path(os.environ.get("FG3D_SCREENSHOTS") or tmp / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [
            "xvfb-run",
            "-a",
            "-s",
            "-screen 0 1280x800x24",
            blender,
            "--enable-event-simulate",
            "--python",
            str(script),
            "--",
            str(PHOTO),
        ],
        cwd=tmp,
        env={**env, "FG3D_SHOTS": str(shots)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = _json_line(r.stdout + r.stderr)
    assert "error" not in out, out["error"]
    print(
        f"\nmodal UI: {out['ticks_computing']} UI timer ticks while the worker computed, "
        f"longest UI stall {out['max_gap_s']:.2f} s; screenshots in {shots}"
    )
    assert "timeout" not in out
    assert out["panel"] == "drawn" and out["prefs"] == "drawn"
    assert out["panel_tab"], out["tab_tries"]  # the sidebar shows the FG3D tab in the screenshot
    assert out["previews"] == [str(PHOTO)]  # the panel shows a thumbnail of the chosen photo
    assert out["cancel_ret"] == ["RUNNING_MODAL"] and out["esc"]
    assert out["cancel_objects"] == out["objects"] and not out["cancel_busy_after"]  # result discarded
    assert out["run_ret"] == ["RUNNING_MODAL"]
    # Blender's main loop kept running while the worker thread computed (Esc was handled mid-run, and
    # the UI timer fired while the cancelled computation went on), and the panel's progress label was live
    assert out["ticks_computing"] >= 1 and out["labels"] and "%" in out["labels"][0]
    assert out["run_objects"] == out["objects"] + 2 and out["active"].startswith("FG3D_test")  # face, camera
    off_centre, distance = out["framed"]
    assert off_centre < 0.05 and distance < 1.0  # the view looks at the new face (it starts ~18 m away)
    assert out["undo_objects"] == out["objects"] and out["redo_objects"] == out["run_objects"]  # one step
    # Adjust Last Operation on a second run: re-run synchronously, the result replaced, not added
    assert out["rerun_ret"] == ["RUNNING_MODAL"] and out["rerun_objects"] == out["run_objects"] + 1
    assert out["last_op"] == "FG3D_OT_reconstruct" and out["adjust_ret"] == ["FINISHED"]
    assert out["adjust_workers"] == 0 and out["adjust_objects"] == out["rerun_objects"]
    assert out["adjust_texture"] == 512
    assert out["browse_ret"] == ["RUNNING_MODAL"] and out["browse_exec"] == ["FINISHED"]
    assert out["browse_busy"] and out["browse_objects"] == out["rerun_objects"] + 1
    assert {"result", "panel"} <= set(out["shots"])  # "progress" too when a UI tick saw the run going
    for name in out["shots"]:
        assert (shots / f"{name}.png").stat().st_size > 10_000


_ISOLATED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    zip_path, photo = sys.argv[-2:]
    out = {"ort_on_path": any(os.path.isdir(os.path.join(p, "onnxruntime")) for p in sys.path if p)}
    import bpy
    out["blender"] = bpy.app.version_string
    out["install"] = sorted(bpy.ops.extensions.package_install_files(
        filepath=zip_path, repo="user_default", enable_on_install=True))
    import onnxruntime, cv2, dlib, scipy
    out["deps"] = [m.__file__ for m in (onnxruntime, cv2, dlib, scipy)]
    out["run"] = sorted(bpy.ops.fg3d.reconstruct(filepath=photo, refine=False, texture_size='256'))
    out["verts"] = len(bpy.context.view_layer.objects.active.data.vertices)
    print("FG3D-JSON " + json.dumps(out), flush=True)
""")


def test_full_zip_wheels_make_the_extension_self_sufficient(fg3d_wheels_zip, bpy_only_python, tmp_path):
    """The zip with wheels, installed into a bpy-only venv (what Blender's own Python has: bpy, numpy,
    requests…): Blender installs the wheels and the operator runs on onnxruntime/dlib/opencv from them."""
    script = tmp_path / "isolated.py"
    script.write_text(_ISOLATED_SCRIPT)
    r = subprocess.run(
        [bpy_only_python, str(script), str(fg3d_wheels_zip), str(PHOTO)],
        cwd=tmp_path,
        env=_blender_env(tmp_path / "user"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = _json_line(r.stdout + r.stderr)
    assert out["blender"].startswith(Path(bpy_only_python).parents[1].name)
    assert not out["ort_on_path"] and out["install"] == ["FINISHED"]
    ext_site = (tmp_path / "user" / "extensions" / ".local").resolve()
    assert all(Path(f).resolve().is_relative_to(ext_site) for f in out["deps"]), out["deps"]
    assert out["run"] == ["FINISHED"] and out["verts"] == N_VERTS
    assert "Traceback" not in r.stderr
