"""Outputs: OBJ (+MTL + texture PNG), GLB, PLY, NPZ, and depth / PNCC / preview PNGs.

Every file is first written under a short hidden temporary name in the output folder and renamed only
when all of them are complete (``atomic.AtomicWriter``), so a failure never leaves a partial file
behind.  OBJ and PLY are in millimetres, GLB in metres (glTF's unit); all are in the canonical BFM
frame (y up, face toward +z).
"""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import cv2
import numpy as np

from .atomic import NAME_MAX, AtomicWriter, remove_stale, signals_held, temp_file
from .errors import FG3DError
from .render import interpolate, render_face

FORMATS = ("obj", "glb", "ply", "npz")
EXTRAS = ("depth", "pncc", "preview")


def png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise FG3DError("could not encode PNG")
    return buf.tobytes()


def _write_png(path: str, img: np.ndarray):
    with open(path, "wb") as f:
        f.write(png_bytes(img))


def _rows(fmt: str, array: np.ndarray) -> str:
    """``array``'s rows as text, ``fmt`` once per row, in one formatting call (the bytes ``np.savetxt``
    writes, ~4× faster: its per-row loop is what made the OBJ slow)."""
    return ((fmt + "\n") * len(array)) % tuple(array.ravel().tolist())


_OBJ_TOPOLOGY: List[tuple] = []  # [(uvs, triangles, their "vt …" + "f …" text)]: the last layout written


def _obj_topology(uvs: np.ndarray, triangles: np.ndarray) -> str:
    """The OBJ's UV and face lines (two thirds of its text), formatted once per mesh layout: every
    photo's mesh has the same UVs and triangles, only the vertex lines change."""
    if _OBJ_TOPOLOGY:
        u, t, text = _OBJ_TOPOLOGY[0]
        if np.array_equal(u, uvs) and np.array_equal(t, triangles):
            return text
    text = (
        _rows("vt %.6f %.6f", uvs)
        + "usemtl face\ns 1\n"
        + _rows("f %d/%d %d/%d %d/%d", np.repeat(triangles + 1, 2, axis=1))
    )
    _OBJ_TOPOLOGY[:] = [(uvs.copy(), triangles.copy(), text)]
    return text


def write_obj(obj_path: str, mtl_path: str, mtl_name: str, tex_name: str, result) -> None:
    with open(mtl_path, "w", encoding="utf-8") as f:
        f.write(f"newmtl face\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\nmap_Kd {tex_name}\n")
    with open(obj_path, "w", encoding="utf-8") as f:
        f.write(f"# fg3d-blender face mesh, millimetres\nmtllib {mtl_name}\n")
        f.write(_rows("v %.4f %.4f %.4f", result.vertices))
        f.write(_obj_topology(result.uvs, result.triangles))


def write_ply(path: str, result) -> None:
    v = result.vertices.astype("<f4")
    tri = result.triangles.astype("<i4")
    header = (
        f"ply\nformat binary_little_endian 1.0\ncomment fg3d-blender face mesh, millimetres\n"
        f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(tri)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    faces = np.empty(len(tri), dtype=[("n", "u1"), ("i", "<i4", 3)])
    faces["n"] = 3
    faces["i"] = tri
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(v.tobytes())
        f.write(faces.tobytes())


MORPH_MIN_MM = 0.01  # a morph target stores the vertices it moves by more than this (sparse accessor)


class _GlbBuffer:
    """The binary chunk of a GLB being built: buffer views (4-byte aligned) and accessors."""

    def __init__(self):
        self.chunks: List[bytes] = []
        self.views: List[dict] = []
        self.accessors: List[dict] = []
        self.offset = 0

    def view(self, data: bytes, target: Optional[int] = None) -> int:
        v = {"buffer": 0, "byteOffset": self.offset, "byteLength": len(data)}
        if target:
            v["target"] = target
        self.views.append(v)
        pad = (-len(data)) % 4
        self.chunks += [data, b"\0" * pad]  # written one after the other, never joined (no copy)
        self.offset += len(data) + pad
        return len(self.views) - 1

    def accessor(
        self, array: np.ndarray, kind: str, target: Optional[int] = 34962, bounds: bool = False
    ) -> int:
        a = {"bufferView": self.view(array.tobytes(), target), "count": len(array), "type": kind}
        a["componentType"] = 5125 if array.dtype.kind == "u" else 5126
        if bounds:
            a.update(min=array.min(0).tolist(), max=array.max(0).tolist())
        self.accessors.append(a)
        return len(self.accessors) - 1

    def sparse_vec3(self, count: int, target: _SparseTarget) -> int:
        """A VEC3 float accessor of ``count`` zeros but the target's values at its rows (sparse storage)."""
        a = {"componentType": 5126, "count": count, "type": "VEC3", "min": target.lo, "max": target.hi}
        if target.count:
            a["sparse"] = {
                "count": target.count,
                "indices": {"bufferView": self.view(target.rows), "componentType": 5125},
                "values": {"bufferView": self.view(target.values)},
            }
        self.accessors.append(a)
        return len(self.accessors) - 1


@dataclass(frozen=True)
class _SparseTarget:
    """One morph target as the GLB stores it: row indices (<u4) and displacements in metres (<f4) as
    bytes, their count and bounds (zero included)."""

    count: int
    rows: bytes
    values: bytes
    lo: List[float]
    hi: List[float]


_MORPH_TARGETS: List[tuple] = []  # [(the ExpressionModes, its _SparseTargets)]: the last model written


def _morph_targets(shapes) -> List[_SparseTarget]:
    """The expression modes as sparse GLB morph targets, built once per model (they are the same for
    every photo; building them was most of a GLB's time)."""
    if _MORPH_TARGETS and _MORPH_TARGETS[0][0] is shapes:
        return _MORPH_TARGETS[0][1]
    targets = []
    for rows, values in shapes.sparse(MORPH_MIN_MM):
        m = (values / np.float32(1000.0)).astype("<f4")
        lo = np.minimum(m.min(0), 0).tolist() if len(rows) else [0.0] * 3
        hi = np.maximum(m.max(0), 0).tolist() if len(rows) else [0.0] * 3
        targets.append(_SparseTarget(len(rows), rows.astype("<u4").tobytes(), m.tobytes(), lo, hi))
    _MORPH_TARGETS[:] = [(shapes, targets)]
    return targets


def write_glb(path: str, result, texture_png: Optional[bytes] = None) -> None:
    """Binary glTF 2.0 (metres): one mesh with normals, UVs and the embedded PNG texture, and the
    expression blendshapes as named morph targets (``extras.targetNames``).  The base positions are the
    neutral face (FGNet detail included) and the mesh's default ``weights`` are the fitted ones, so a
    viewer shows the reconstructed expression and any ARKit capture can drive the targets."""
    shapes = result.blendshapes
    weights = result.expression_weights
    base = np.asarray(result.vertices, np.float32)
    if shapes is not None and len(weights):
        base = base - shapes.apply(weights)
    buf = _GlbBuffer()
    pos = buf.accessor((base / 1000.0).astype("<f4"), "VEC3", bounds=True)
    nrm = buf.accessor(result.normals.astype("<f4"), "VEC3")
    uv = buf.accessor(np.column_stack([result.uvs[:, 0], 1.0 - result.uvs[:, 1]]).astype("<f4"), "VEC2")
    idx = buf.accessor(result.triangles.astype("<u4").ravel(), "SCALAR", target=34963)
    primitive = {
        "attributes": {"POSITION": pos, "NORMAL": nrm, "TEXCOORD_0": uv},
        "indices": idx,
        "material": 0,
    }
    mesh = {"name": "FG3D_face", "primitives": [primitive]}
    if shapes is not None and len(weights):
        n = len(base)
        primitive["targets"] = [{"POSITION": buf.sparse_vec3(n, t)} for t in _morph_targets(shapes)]
        mesh["weights"] = [float(w) for w in weights]
        mesh["extras"] = {"targetNames": list(shapes.names)}
    image = buf.view(texture_png if texture_png is not None else png_bytes(result.texture))
    gltf = {
        "asset": {"version": "2.0", "generator": "fg3d-blender"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "FG3D_face"}],
        "meshes": [mesh],
        "materials": [
            {
                "name": "face",
                "pbrMetallicRoughness": {
                    "baseColorTexture": {"index": 0},
                    "metallicFactor": 0.0,
                    "roughnessFactor": 0.8,
                },
            }
        ],
        "textures": [{"source": 0, "sampler": 0}],
        "samplers": [{}],
        "images": [{"bufferView": image, "mimeType": "image/png"}],
        "buffers": [{"byteLength": buf.offset}],
        "bufferViews": buf.views,
        "accessors": buf.accessors,
    }
    js = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    js += b" " * ((-len(js)) % 4)
    total = 12 + 8 + len(js) + 8 + buf.offset
    with open(path, "wb") as f:
        f.write(struct.pack("<4sII", b"glTF", 2, total))
        f.write(struct.pack("<I4s", len(js), b"JSON") + js)
        f.write(struct.pack("<I4s", buf.offset, b"BIN\0"))
        for chunk in buf.chunks:
            f.write(chunk)


def write_npz(path: str, result) -> None:
    """The arrays as a compressed .npz, built in memory first: a full disk then fails in one ``write``
    (a zip file being written to disk that fails would also fail again in its finaliser)."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        vertices=result.vertices,
        vertices_coarse=result.vertices_coarse,
        triangles=result.triangles,
        uvs=result.uvs,
        landmarks_2d=result.landmarks_2d,
        landmarks_3d=result.landmarks_3d,
        pose=np.array([result.pose["yaw"], result.pose["pitch"], result.pose["roll"]], dtype=np.float32),
        camera_A=result.camera["A"],
        camera_b=result.camera["b"],
        params=result.params,
        vertices_neutral=result.vertices_neutral,
        expression_names=np.array(list(result.expression), dtype=str),
        expression_weights=np.array(list(result.expression.values()), dtype=np.float32),
        image_vertices=result.image_vertices,
        refined=np.array(result.refined),
    )
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def depth_image(result) -> np.ndarray:
    d = result.depth
    out = np.zeros(d.shape, dtype=np.uint8)
    if result.mask.any():
        lo, hi = np.nanmin(d), np.nanmax(d)
        out[result.mask] = (30 + 225 * (d[result.mask] - lo) / max(hi - lo, 1e-6)).astype(np.uint8)
    return out


PREVIEW_MAX_WIDTH = 2400  # photo | overlay | shaded, side by side


def shaded_render(result, scale: float = 1.0) -> np.ndarray:
    """Grey Lambertian render of the posed mesh over black, the photo's size times ``scale``."""
    h, w = result.image.shape[:2]
    iv = result.image_vertices
    if scale != 1.0:  # pixel centres stay at integer coordinates
        iv = iv.copy()
        iv[:, :2] = (iv[:, :2] + 0.5) * scale - 0.5
    face = render_face(iv, result.triangles, max(1, round(h * scale)), max(1, round(w * scale)))
    n = result.normals @ result.camera["rotation"].T
    shade = 0.15 + 0.85 * np.clip(n[:, 2], 0, 1)
    img = face.in_photo(interpolate(face.raster, result.triangles, shade), 0.0)
    return np.repeat((np.clip(img, 0, 1) * 235)[:, :, None], 3, axis=2).astype(np.uint8)


def preview_image(result) -> np.ndarray:
    """Photo, overlay with landmarks and shaded mesh side by side, at most PREVIEW_MAX_WIDTH wide.

    A large photo is downscaled before anything is drawn, so a 144 MP photo costs no more than a small one.
    """
    photo = result.image
    h, w = photo.shape[:2]
    s = min(1.0, PREVIEW_MAX_WIDTH / (3 * w))
    if s < 1.0:
        photo = cv2.resize(photo, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    shaded = shaded_render(result, s)
    mask = shaded[:, :, :1] > 0  # the shade is at least 0.15 · 235 on the mesh
    overlay = np.where(mask, (0.45 * photo + 0.55 * shaded).astype(np.uint8), photo)
    for x, y in (result.landmarks_2d + 0.5) * s - 0.5:
        cv2.circle(
            overlay,
            (int(round(x)), int(round(y))),
            max(1, photo.shape[1] // 300),
            (0, 255, 0),
            -1,
            cv2.LINE_AA,
        )
    return np.concatenate([photo, overlay, shaded], axis=1)


def check_formats(
    formats: Iterable[str], extras: Iterable[str] = (), extra_formats: Iterable[str] = ()
) -> None:
    """Raise FG3DError for an unknown format or extra (call it before any work is done).

    ``extra_formats``: formats written by writers outside core (the CLI's ``blend``)."""
    formats, extras = list(formats), list(extras)
    known = FORMATS + tuple(extra_formats)
    bad = [f for f in formats if f not in FORMATS and f not in extra_formats] + [
        e for e in extras if e not in EXTRAS
    ]
    if bad:
        raise FG3DError(f"unknown output format {bad[0]!r} (choose from {', '.join(known)})")
    if not formats and not extras:
        raise FG3DError(f"no output format given (choose from {', '.join(known)})")


LONGEST_SUFFIX = "_texture.png"  # the longest ending write_outputs adds to a stem (with _preview.png)


def fit_stem(stem: str, suffix: str = "") -> str:
    """``stem + suffix``, the stem cut (at a character boundary) so that every output name made from it
    fits NAME_MAX bytes."""
    room = NAME_MAX - len((LONGEST_SUFFIX + suffix).encode())
    data = stem.encode("utf-8", "surrogateescape")
    if len(data) > room:
        stem = data[:room].decode("utf-8", "ignore") or "face"
    return stem + suffix


def check_output_dir(out_dir) -> None:
    """Raise FG3DError at once when ``out_dir`` cannot be written (it, or its nearest existing parent,
    is a file, is read-only or is not ours to write), before any photo is processed.  A probe file is
    created and deleted again; nothing is left, and a folder still to be made is not made yet."""
    p = Path(out_dir)
    try:
        if p.exists() and not p.is_dir():
            raise FG3DError(f"{p}: output path exists and is not a folder")
        folder = next((q for q in (p, *p.parents) if q.exists()), Path("."))
        if not folder.is_dir():
            raise FG3DError(f"{p}: cannot create the output folder ({folder} is a file)")
        with signals_held():  # the probe is never left behind
            os.unlink(temp_file(folder))
    except OSError as exc:
        raise FG3DError(f"{p}: cannot write there ({exc.strerror or exc})") from None


def write_outputs(
    result,
    out_dir,
    stem: str,
    formats: Iterable[str] = ("obj", "glb"),
    extras: Iterable[str] = EXTRAS,
    writers: Optional[Dict[str, Callable]] = None,
) -> List[Path]:
    """Write the chosen formats and extras atomically; returns the final paths.

    ``writers`` adds formats implemented outside core (``{"blend": write_blend}``): each is called as
    ``writer(temporary_path, result)`` and its file is committed with the others.
    """
    formats, extras, writers = list(formats), list(extras), dict(writers or {})
    check_formats(formats, extras, writers)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FG3DError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    remove_stale(out_dir)  # what a killed earlier run left
    w = AtomicWriter(out_dir)
    try:
        texture_png = png_bytes(result.texture) if {"obj", "glb"} & set(formats) else b""  # encoded once
        if "obj" in formats:
            tex_name, mtl_name = f"{stem}_texture.png", f"{stem}.mtl"
            with open(w.path(tex_name), "wb") as f:
                f.write(texture_png)
            write_obj(w.path(f"{stem}.obj"), w.path(mtl_name), mtl_name, tex_name, result)
        if "glb" in formats:
            write_glb(w.path(f"{stem}.glb"), result, texture_png)
        if "ply" in formats:
            write_ply(w.path(f"{stem}.ply"), result)
        if "npz" in formats:
            write_npz(w.path(f"{stem}.npz"), result)
        for fmt, writer in writers.items():
            if fmt in formats:
                writer(w.path(f"{stem}.{fmt}"), result)
        if "depth" in extras:
            _write_png(w.path(f"{stem}_depth.png"), depth_image(result))
        if "pncc" in extras:
            _write_png(w.path(f"{stem}_pncc.png"), result.pncc)
        if "preview" in extras:
            _write_png(w.path(f"{stem}_preview.png"), preview_image(result))
    except OSError as exc:  # permission denied, disk full, …: one line, nothing left behind
        w.abort()
        raise FG3DError(f"{out_dir}: could not write the outputs ({exc.strerror or exc})") from None
    except BaseException:
        w.abort()
        raise
    return w.commit()
