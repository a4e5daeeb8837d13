"""Training data with known shape beyond the 3DMM: our own FG3D (``train-fgnet --synthetic N``).

The paper's FGNet learns the shape difference beyond the 3DMM from real scans re-rendered at other
poses.  Ours comes from light-stage identities instead:

* **Shape.**  ICT-FaceKit's 100 identity modes carried onto the BFM mesh with the registration the
  expression modes use (``identity_modes``; weights ~ N(0, 1)), plus the BFM identity of a real fit (so
  the set covers both spaces), plus the expression weights of another real fit (real faces' mix:
  mostly neutral, smiles, open mouths, sparse).
* **Appearance.**  A UTKFace photo's texture, baked by the pipeline's own texture stage (mirror-filled),
  divided by that photo's spherical-harmonic (SH) shading estimate (albedo), shaded by another real
  photo's SH lighting, over a third photo blurred beyond recognition.
* **Camera.**  Yaw within ±``YAW_DEG``, pitch ±``PITCH_DEG``, roll ±``ROLL_DEG``, the face size and place
  of a real photo's fit jittered, a Gaussian blur on half the renders.

Each render goes through the pipeline's own detection (HOG, then the CNN) and coarse fit
(``views.render_record``; a miss is counted, not hidden); the target is the drawn shape moved onto the
coarse fit by a similarity transform, as a UV map.  Texture, lighting and background photos of the
held-out draws come from held-out photos only, and their identities are drawn from their own seeds.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import cv2
import numpy as np

from fg3d_blender.core import render
from fg3d_blender.core.fgnet_inputs import load_shape_range
from fg3d_blender.core.geometry import pose_rotation, sh_basis
from fg3d_blender.core.morphable import FaceModel
from fg3d_blender.core.pipeline import Reconstructor, bake_texture, render_mesh

from .cache import CACHE_VERSION, cached_fit, shard_meta, write_shard
from .views import render_record

VERSION = 1  # of the draw and the render: a change here rebuilds the shards
IDENTITY_FILE = "ict_identity_bfm.npz"
IDENTITY_VERSION = "ICT-FaceKit da5f95a identity modes, expressions.register + transfer v1"
YAW_DEG = 80.0
PITCH_DEG = 30.0
ROLL_DEG = 15.0
SCALE_JITTER = 0.15  # the face size: a real fit's, times 1 ± this
SHIFT_PX = 8.0  # and its place, ± this
BLUR_SHARE = 0.5  # renders blurred …
BLUR_SIGMA_PX = (0.4, 1.2)  # … by a Gaussian of this sigma
BACKGROUND_BLUR_PX = 8.0  # the photo behind the face, blurred so no second face shows
TEXTURE_SIZE = 256  # the baked texture the albedo is read from
SHADE_CLIP = (0.3, 2.0)  # the photo's shading estimate is clipped to this before dividing it out
HELD_SEED = 1_000_003  # held-out draws use seeds from here on (training draws: 0, 1, 2, …)
SHARD = 250


def identity_modes(ict_dir: Path, fm: FaceModel, cache: Path, log=print) -> np.ndarray:
    """ICT's 100 identity modes on the BFM vertices (100,N,3) float32 mm, made once (~1 min) with the
    expression modes' registration and transfer, and kept in ``cache``."""
    from . import expressions  # scipy: only to make the file

    path = Path(cache) / IDENTITY_FILE
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if int(z["vertices"]) == len(fm.mean_mm) and str(z.get("version", "")) == IDENTITY_VERSION:
                return z["modes"]
    t0 = time.perf_counter()
    ict = expressions.load_ict(Path(ict_dir), kind="identity")
    reg = expressions.register(ict, fm)
    modes = expressions.transfer(ict, reg, fm)["modes"].astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(
        tmp,
        modes=modes,
        names=np.array(ict.names),
        vertices=np.array(len(fm.mean_mm)),
        version=np.array(IDENTITY_VERSION),
    )
    os.replace(tmp, path)
    log(f"ICT identity modes carried onto the BFM mesh in {time.perf_counter() - t0:.0f} s")
    return modes


@dataclass
class Draw:
    """Everything random about one synthetic face."""

    identity: np.ndarray  # (100,) ICT identity weights
    shape_of: int  # cached record whose BFM identity is used
    expression_of: int  # … whose expression weights
    texture_of: int  # … whose photo gives the albedo
    light_of: int  # … whose SH lighting shades the render
    background_of: int  # … whose photo, blurred, is the background
    frame_of: int  # … whose fit gives the face size and place
    yaw: float
    pitch: float
    roll: float
    scale: float  # × the frame fit's px/mm
    shift: np.ndarray  # (2,) px
    blur: float  # Gaussian sigma px, 0 = none


def draw(rng: np.random.Generator, pool: np.ndarray, n_identity: int) -> Draw:
    """One draw; the cached records used come from ``pool``."""
    pick = rng.choice(pool, 6)
    return Draw(
        identity=rng.standard_normal(n_identity).astype(np.float32),
        shape_of=int(pick[0]),
        expression_of=int(pick[1]),
        texture_of=int(pick[2]),
        light_of=int(pick[3]),
        background_of=int(pick[4]),
        frame_of=int(pick[5]),
        yaw=float(rng.uniform(-YAW_DEG, YAW_DEG)),
        pitch=float(rng.uniform(-PITCH_DEG, PITCH_DEG)),
        roll=float(rng.uniform(-ROLL_DEG, ROLL_DEG)),
        scale=float(rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)),
        shift=rng.uniform(-SHIFT_PX, SHIFT_PX, 2).astype(np.float32),
        blur=float(rng.uniform(*BLUR_SIGMA_PX)) if rng.random() < BLUR_SHARE else 0.0,
    )


def true_shape(fm: FaceModel, modes: np.ndarray, data: dict, d: Draw) -> np.ndarray:
    """The drawn face (N,3) mm, BFM frame: a real fit's BFM identity + ICT identity + a real expression."""
    identity = fm.shape_mm(data["alpha"][d.shape_of]) + np.tensordot(d.identity, modes, 1)
    expression = data["expression"][d.expression_of] if data["expression"].shape[1] else None
    return fm.with_expression(identity.astype(np.float32), expression)


def shading(normals_cam: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Gray SH shading (N,) of camera-frame unit normals under a cached SH lighting (9,)."""
    return sh_basis(normals_cam) @ light


def vertex_albedo(fm: FaceModel, data: dict, i: int) -> np.ndarray:
    """Per-vertex albedo (N,3) float32, BGR 0–255, of cached photo ``i``: the pipeline's baked texture
    (mirror-filled) read at each vertex, divided by the photo's own SH shading of its coarse shape."""
    image = data["images"][i]
    fit = cached_fit(fm, data, i)
    tex = bake_texture(image, render_mesh(image.shape, fit, fit.vertices, fm), fm, TEXTURE_SIZE)
    colour = fm.from_uv(tex.astype(np.float32))
    n = render.vertex_normals(fit.vertices, fm.triangles) @ fit.rotation.T  # unit normals, turned
    shade = np.clip(shading(n, data["light"][i]), *SHADE_CLIP)
    return (colour / shade[:, None]).astype(np.float32)


def camera(d: Draw, fm: FaceModel, data: dict, shape: np.ndarray):
    """(A, b, rotation) of the render: the draw's rotation, the frame fit's scale and keypoint centroid,
    jittered."""
    frame = cached_fit(fm, data, d.frame_of)
    rot = pose_rotation(d.yaw, d.pitch, d.roll)
    a = np.diag([1.0, -1.0, 1.0]) @ rot * frame.scale * d.scale
    centre = frame.project(frame.vertices[fm.keypoints]).mean(0)
    centre[:2] += d.shift
    b = centre - shape[fm.keypoints].astype(np.float64).mean(0) @ a.T
    return a, b, rot


def render_draw(fm: FaceModel, modes: np.ndarray, data: dict, d: Draw):
    """(uint8 BGR image like the photos, drawn image-space vertices (N,3)) of one draw."""
    shape = true_shape(fm, modes, data, d)
    a, b, rot = camera(d, fm, data, shape)
    iv = (shape.astype(np.float64) @ a.T + b).astype(np.float32)
    h, w = data["images"].shape[1:3]
    n = render.vertex_normals(shape, fm.triangles) @ rot.T  # unit normals, turned into the camera frame
    shade = np.clip(shading(n, data["light"][d.light_of]), 0.05, None)
    colour = vertex_albedo(fm, data, d.texture_of) * shade[:, None]
    ras = render.rasterize(iv, fm.triangles, h, w)
    face = render.interpolate(ras, fm.triangles, colour)
    back = cv2.GaussianBlur(data["images"][d.background_of].astype(np.float32), (0, 0), BACKGROUND_BLUR_PX)
    out = np.where(ras.mask[..., None], face, back)
    if d.blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), d.blur)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), iv


def tag(n_train: int, n_held: int, names: np.ndarray, train_idx: np.ndarray, held_idx: np.ndarray) -> str:
    """What a shard's contents depend on besides its index: the code version, the draw counts (laid
    out train, then held) and the photos of the two pools."""
    pools = zlib.crc32("\n".join(map(str, names[train_idx])).encode())
    pools = zlib.crc32("\n".join(map(str, names[held_idx])).encode(), pools)
    return (
        f"synthetic v{VERSION}|yaw {YAW_DEG}|pitch {PITCH_DEG}|roll {ROLL_DEG}|seed {HELD_SEED}"
        f"|draws {n_train}+{n_held}|pools {pools:08x}"
    )


def build_synthetic_cache(
    rec: Reconstructor,
    data: dict,
    train_idx: np.ndarray,
    held_idx: np.ndarray,
    n_train: int,
    n_held: int,
    ict_dir: Path,
    cache: Path,
    size: int,
    worker: int = 0,
    workers: int = 1,
    log=print,
) -> None:
    """``synth_XXX.npz`` shards (``SHARD`` draws each, ``render_record``s of the renders found) for
    ``n_train`` training draws (seeds 0…, records of ``train_idx``) and ``n_held`` held-out ones (seeds
    from ``HELD_SEED``, records of ``held_idx``); finished shards of this version are kept (resume).
    Beside each shard, ``synth_XXX.json`` counts the draws and the misses by |yaw|."""
    fm = rec.face_model
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    modes = identity_modes(ict_dir, fm, cache.parent, log=log)
    shape_range = load_shape_range()
    if len(held_idx) == 0 and n_held:
        log("no held-out photos in the cache: the synthetic set has no held-out draws")
        n_held = 0
    jobs = [("synth", k, train_idx, k) for k in range(n_train)]
    jobs += [("synth_held", k, held_idx, HELD_SEED + k) for k in range(n_held)]
    n_shards = math.ceil(len(jobs) / SHARD)
    shard_tag = tag(n_train, n_held, data["names"], train_idx, held_idx)
    for extra in [*cache.glob("synth_*.npz"), *cache.glob("synth_*.json")]:  # of a larger set: not ours
        if int(extra.stem.split("_")[1]) >= n_shards:
            extra.unlink(missing_ok=True)
    for si in range(worker, n_shards, workers):
        out = cache / f"synth_{si:03d}.npz"
        if out.is_file() and shard_meta(out) == (CACHE_VERSION, size, shard_tag):
            continue
        t0 = time.perf_counter()
        recs, names, missed = [], [], {}
        for prefix, k, pool, seed in jobs[si * SHARD : (si + 1) * SHARD]:
            d = draw(np.random.default_rng(seed), pool, len(modes))
            view, drawn = render_draw(fm, modes, data, d)
            r = render_record(rec, view, drawn, size, shape_range)
            if r is None:
                key = str(int(abs(d.yaw) // 20 * 20))
                missed[key] = missed.get(key, 0) + 1
                continue
            r["synthetic_yaw"] = np.float32(d.yaw)
            recs.append(r)
            names.append(f"{prefix}_{k:06d}")
        images = np.stack([r.pop("view_image") for r in recs]) if recs else np.zeros((0, 1, 1, 3), np.uint8)
        side = out.with_suffix(".json")
        side.write_text(json.dumps({"draws": len(recs) + sum(missed.values()), "missed_by_abs_yaw": missed}))
        write_shard(out, recs, names, images, size, shard_tag)
        log(
            f"synthetic shard {si + 1}/{n_shards}: {len(recs)} renders found, {sum(missed.values())} missed "
            f"in {time.perf_counter() - t0:.0f} s"
        )


def is_held(name: str) -> bool:
    return str(name).startswith("synth_held_")


def miss_counts(cache: Path) -> Dict[str, int]:
    """Draws and misses over all shards' side files."""
    total: Dict[str, int] = {"draws": 0, "missed": 0}
    for f in sorted(Path(cache).glob("synth_*.json")):
        s = json.loads(f.read_text())
        total["draws"] += int(s["draws"])
        total["missed"] += int(sum(s["missed_by_abs_yaw"].values()))
    return total


def held_draw(k: int, held_idx: np.ndarray, n_identity: int) -> Draw:
    """Held-out draw ``k`` (the figure and the lighting check re-render it)."""
    return draw(np.random.default_rng(HELD_SEED + k), held_idx, n_identity)
