"""Outputs parse back: OBJ/MTL/PNG, GLB (glTF 2.0 binary), PLY, NPZ; writes are atomic."""

from __future__ import annotations

import dataclasses
import json
import struct

import cv2
import numpy as np
import pytest

from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.export import write_outputs

N_V, N_F = 53215, 105954


@pytest.fixture(scope="module")
def result(reconstructed, example_photo):
    return reconstructed(example_photo, texture_size=512)


@pytest.fixture(scope="module")
def written(result, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    files = write_outputs(result, out, "face", ("obj", "glb", "ply", "npz"))
    return out, files


def test_all_files_written_and_nothing_else(written):
    out, files = written
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in files)
    assert names == sorted(
        [
            "face.obj",
            "face.mtl",
            "face_texture.png",
            "face.glb",
            "face.ply",
            "face.npz",
            "face_depth.png",
            "face_pncc.png",
            "face_preview.png",
        ]
    )


def test_obj_mtl_png_parse_back(written, result):
    out, _ = written
    v, vt, f, mtllib, usemtl = [], [], [], None, None
    for line in (out / "face.obj").read_text(encoding="utf-8").splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "v":
            v.append([float(x) for x in rest.split()])
        elif tag == "vt":
            vt.append([float(x) for x in rest.split()])
        elif tag == "f":
            f.append([[int(i) for i in c.split("/")] for c in rest.split()])
        elif tag == "mtllib":
            mtllib = rest
        elif tag == "usemtl":
            usemtl = rest
    v, vt, f = np.array(v), np.array(vt), np.array(f)
    assert v.shape == (N_V, 3) and vt.shape == (N_V, 2) and f.shape == (N_F, 3, 2)
    np.testing.assert_allclose(v, result.vertices, atol=1e-3)
    np.testing.assert_allclose(vt, result.uvs, atol=1e-5)
    assert f.min() == 1 and f.max() == N_V
    np.testing.assert_array_equal(f[:, :, 0] - 1, result.triangles)
    np.testing.assert_array_equal(f[:, :, 0], f[:, :, 1])
    assert mtllib == "face.mtl"
    mtl = (out / mtllib).read_text(encoding="utf-8").splitlines()
    assert f"newmtl {usemtl}" in mtl
    tex_name = [ln.split(" ", 1)[1] for ln in mtl if ln.startswith("map_Kd ")][0]
    tex = cv2.imread(str(out / tex_name), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(tex, result.texture)


def test_glb_is_valid_gltf_binary(written, result):
    data = (written[0] / "face.glb").read_bytes()
    magic, version, total = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and total == len(data)
    jlen, jtype = struct.unpack_from("<I4s", data, 12)
    assert jtype == b"JSON" and jlen % 4 == 0
    gltf = json.loads(data[20 : 20 + jlen])
    blen, btype = struct.unpack_from("<I4s", data, 20 + jlen)
    assert btype == b"BIN\0" and blen % 4 == 0
    assert 28 + jlen + blen == len(data)
    binary = data[28 + jlen : 28 + jlen + blen]
    assert gltf["asset"]["version"] == "2.0"
    assert gltf["buffers"][0]["byteLength"] == blen
    prim = gltf["meshes"][0]["primitives"][0]
    acc = gltf["accessors"]

    def read(i, dtype, width):
        a = acc[i]
        view = gltf["bufferViews"][a["bufferView"]]
        assert view["byteOffset"] + view["byteLength"] <= blen
        arr = np.frombuffer(binary, dtype=dtype, count=a["count"] * width, offset=view["byteOffset"])
        return arr.reshape(a["count"], width) if width > 1 else arr

    pos = read(prim["attributes"]["POSITION"], "<f4", 3)
    nrm = read(prim["attributes"]["NORMAL"], "<f4", 3)
    uv = read(prim["attributes"]["TEXCOORD_0"], "<f4", 2)
    idx = read(prim["indices"], "<u4", 1)
    assert acc[prim["attributes"]["POSITION"]]["componentType"] == 5126
    assert acc[prim["indices"]]["componentType"] == 5125
    assert len(pos) == N_V and len(idx) == 3 * N_F and idx.max() == N_V - 1
    # metres; the base is the neutral face (with FGNet's detail), the fitted weights dial the expression
    base = result.vertices - result.blendshapes.apply(result.expression_weights)
    np.testing.assert_allclose(pos, base / 1000.0, atol=1e-7)
    assert gltf["meshes"][0]["weights"] == pytest.approx(list(result.expression_weights))
    np.testing.assert_allclose(acc[prim["attributes"]["POSITION"]]["min"], pos.min(0), rtol=1e-6)
    np.testing.assert_allclose(acc[prim["attributes"]["POSITION"]]["max"], pos.max(0), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1, atol=1e-4)
    np.testing.assert_allclose(uv[:, 1], 1 - result.uvs[:, 1], atol=1e-6)  # glTF: v down
    np.testing.assert_array_equal(idx.reshape(-1, 3), result.triangles)
    img = gltf["images"][prim["material"] * 0 + gltf["textures"][0]["source"]]
    view = gltf["bufferViews"][img["bufferView"]]
    png = binary[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]
    assert img["mimeType"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    tex = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(tex, result.texture)


def test_ply_header_and_body(written, result):
    data = (written[0] / "face.ply").read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    assert f"element vertex {N_V}" in header and f"element face {N_F}" in header
    body = data[end:]
    assert len(body) == N_V * 12 + N_F * 13
    v = np.frombuffer(body, "<f4", N_V * 3).reshape(-1, 3)
    np.testing.assert_array_equal(v, result.vertices)
    faces = np.frombuffer(body, dtype=[("n", "u1"), ("i", "<i4", 3)], offset=N_V * 12)
    assert (faces["n"] == 3).all()
    np.testing.assert_array_equal(faces["i"], result.triangles)


def test_npz_keys_and_shapes(written, result):
    with np.load(written[0] / "face.npz", allow_pickle=False) as z:
        assert {
            "vertices",
            "vertices_coarse",
            "triangles",
            "uvs",
            "landmarks_2d",
            "landmarks_3d",
            "pose",
            "camera_A",
            "camera_b",
            "params",
            "image_vertices",
            "refined",
        } <= set(z.files)
        assert z["vertices"].shape == (N_V, 3) and z["triangles"].shape == (N_F, 3)
        assert z["landmarks_2d"].shape == (68, 2) and z["uvs"].shape == (N_V, 2)
        np.testing.assert_array_equal(z["vertices"], result.vertices)
        np.testing.assert_allclose(z["pose"], [result.pose[k] for k in ("yaw", "pitch", "roll")], atol=1e-4)


def test_extra_pngs(written, result):
    out = written[0]
    h, w = result.image.shape[:2]
    depth = cv2.imread(str(out / "face_depth.png"), cv2.IMREAD_UNCHANGED)
    assert depth.shape == (h, w) and (depth[~result.mask] == 0).all() and depth[result.mask].min() >= 30
    x, y = np.rint(result.landmarks_2d[30]).astype(int)
    assert depth[y, x] > np.median(depth[result.mask])  # the nose is near: bright
    pncc = cv2.imread(str(out / "face_pncc.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(pncc, result.pncc)
    prev = cv2.imread(str(out / "face_preview.png"))
    assert prev.shape == (h, 3 * w, 3)
    np.testing.assert_array_equal(prev[:, :w], result.image)


def test_unknown_format_after_valid_ones_writes_nothing(result, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(FG3DError, match="unknown output format 'fbx'"):
        write_outputs(result, out, "face", ("obj", "glb", "fbx"))
    assert not out.exists() or not list(out.iterdir())


def test_failure_in_the_middle_leaves_no_file_and_keeps_old_outputs(result, tmp_path):
    """OBJ, MTL and texture are complete when the GLB writer fails: none of them may appear."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "face.obj").write_text("previous run\n")
    broken = dataclasses.replace(result, normals=None)  # write_glb fails on it after the OBJ is written
    with pytest.raises(Exception):  # noqa: B017 - whichever writer error, nothing may be left behind
        write_outputs(broken, out, "face", ("obj", "glb", "ply", "npz"))
    assert sorted(p.name for p in out.iterdir()) == ["face.obj"]
    assert (out / "face.obj").read_text() == "previous run\n"


def test_output_folder_that_cannot_be_created_gives_one_line(result, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(FG3DError) as e:
        write_outputs(result, blocker / "out", "face", ("obj",))
    assert "\n" not in str(e.value) and str(blocker / "out") in str(e.value)


def test_read_only_folder_gives_one_line_and_leaves_nothing(result, unwritable_dir):
    out = unwritable_dir
    with pytest.raises(FG3DError) as e:
        write_outputs(result, out, "face", ("obj", "glb"))
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    assert not list(out.iterdir())


def test_obj_text_is_byte_identical_to_numpy_savetxt(written, result):
    out, _ = written
    """The one-pass formatter writes exactly what the row-by-row ``np.savetxt`` writer wrote."""
    import io

    ref = io.StringIO()
    ref.write("# fg3d-blender face mesh, millimetres\nmtllib face.mtl\n")
    np.savetxt(ref, result.vertices, fmt="v %.4f %.4f %.4f")
    np.savetxt(ref, result.uvs, fmt="vt %.6f %.6f")
    ref.write("usemtl face\ns 1\n")
    np.savetxt(ref, np.repeat(result.triangles + 1, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
    assert (out / "face.obj").read_text(encoding="utf-8") == ref.getvalue()


def test_glb_texture_is_the_obj_texture_png(written):
    """The texture is encoded once and the same bytes go into the PNG file and the GLB."""
    out, _ = written
    data = (out / "face.glb").read_bytes()
    n = struct.unpack("<I", data[12:16])[0]
    gltf = json.loads(data[20 : 20 + n])
    view = gltf["bufferViews"][gltf["images"][0]["bufferView"]]
    start = 20 + n + 8 + view.get("byteOffset", 0)
    assert data[start : start + view["byteLength"]] == (out / "face_texture.png").read_bytes()


def test_obj_and_glb_caches_follow_the_mesh(result, tmp_path):
    """The OBJ's UV and face lines and the GLB's morph targets are built once per layout and model; a
    result with other UVs, triangles or vertices still gets exactly its own file."""
    import io

    def savetxt_obj(r):
        ref = io.StringIO()
        ref.write("# fg3d-blender face mesh, millimetres\nmtllib m.mtl\n")
        np.savetxt(ref, r.vertices, fmt="v %.4f %.4f %.4f")
        np.savetxt(ref, r.uvs, fmt="vt %.6f %.6f")
        ref.write("usemtl face\ns 1\n")
        np.savetxt(ref, np.repeat(r.triangles + 1, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
        return ref.getvalue()

    flipped = result.triangles[:, ::-1].copy()
    others = [
        result,
        dataclasses.replace(result, vertices=result.vertices * 1.5),
        dataclasses.replace(result, uvs=result.uvs * 0.5),
        dataclasses.replace(result, triangles=flipped),
        result,
    ]
    glbs = []
    for i, r in enumerate(others):
        out = tmp_path / str(i)
        write_outputs(r, out, "m", ("obj", "glb"), ())
        assert (out / "m.obj").read_text(encoding="utf-8") == savetxt_obj(r)
        glbs.append((out / "m.glb").read_bytes())
    assert glbs[0] == glbs[-1] and glbs[0] != glbs[1]
