"""Self-supervised FGNet training on real photos without 3D labels (``python -m fg3d_blender train-fgnet``).

1. Cache (once, resumable by shard): for every photo, dlib's 68 landmarks, the coarse 3DMM fit exactly
   as the pipeline makes it (shape parameters, camera A, b, rotation; with the landmark refit), the
   landmark head's prediction, the visibility UV map and the per-photo spherical-harmonic (SH) lighting
   (and a low-pass albedo map, kept for inspection) estimated from the coarse shape.  Photos where HOG
   finds no face are skipped.  A ``HOLDOUT`` fraction of the photos (by a hash of the name) is held out.
2. Training: the network sees exactly the inputs the pipeline gives it (``uv_inputs``) and predicts a
   UV shape-difference map D (mm) added to the coarse UV position map.  Losses, all in UV space and
   weighted by visibility:
   * photometric: the photo sampled at each texel's refined projected position against
     albedo × SH shading of the refined normals (lighting: the photo's SH estimate from the coarse
     shape, cached; albedo: the low-pass ratio of the sampled texture to the shading, recomputed for
     the refined shape, so the network must explain the fine shading with geometry);
   * landmarks: the 68 refined keypoint vertices, projected, against the regressor's landmark head
     (flip-averaged, the target the coarse refit only approaches under its shape prior; ``--landmark-target
     dlib`` uses dlib's), normalised by the face size — this is where expression comes back, which the
     3DMM basis here lacks;
   * Laplacian smoothness of D and a magnitude prior on D.
3. Synthetic views (``--views N``, usually a fine-tune with ``--init``): single photos carry no
   multi-view signal, so the landmark loss alone teaches view-dependent corrections (each view's own 2D
   evidence).  ``view_one`` re-renders a training photo's face, its coarse fit refined by the ``--init``
   network, turned 10–30° further from the camera and pitched ±10° (``novel_view``), and runs the
   pipeline's coarse fit on the render.  The drawn shape is known: its error after a similarity
   alignment (``shape_error_mm``) is a 3D loss, added for ``--views-per-batch`` renders per step along
   with the four losses above (the render's exact 68 points as landmark target).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np

from . import morphable, render, uv_inputs

HOLDOUT = 0.05
SHARD = 500
CACHE_VERSION = 2  # 2: refitted coarse fits and the landmark head's prediction (head_landmarks)
ALBEDO_SIGMA_FRAC = 1.0 / 32  # low-pass of the albedo estimate, fraction of the UV size
# landmark target → (cache key, weight of the 17 jaw points).  The regressor's landmark head was trained
# on 3DMM-fitted landmarks, whose jaw points are fixed vertices; dlib's jaw points lie on the silhouette.
# On AFLW2000-3D the head is far more accurate (239 photos with a HOG face: 3.25 % vs dlib's 8.1 %).
LANDMARK_TARGETS = {"head": ("head_landmarks", 1.0), "dlib": ("landmarks", 0.5)}


# ---- spherical harmonics (works on numpy arrays and torch tensors) --------------------------------

def sh_basis(n):
    """Second-order real SH basis (9 functions, constants folded into the lighting) of unit normals (...,3)."""
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    one = x * 0 + 1
    comps = [one, y, z, x, x * y, y * z, 3 * z * z - 1, x * z, x * x - y * y]
    if isinstance(n, np.ndarray):
        return np.stack(comps, -1)
    import torch
    return torch.stack(comps, -1)


# ---- UV constants of the layout (the coarse shape as a linear function of the 40 parameters) ------

class UVModel:
    """Mean and identity basis of the BFM as UV maps at ``size`` (mm), keypoint UVs, layout mask."""

    def __init__(self, size: int):
        fm = morphable.face_model()
        self.size = size
        n = len(fm.mean_mm)
        attrs = np.concatenate([fm.mean_mm, (fm.basis_um / 1000.0).reshape(n, -1)], 1).astype(np.float32)
        m = render.to_uv(attrs, fm.uvs, fm.triangles, size)
        self.mean = m[:, :, :3].copy()                                  # (S,S,3)
        self.basis = m[:, :, 3:].reshape(size, size, 3, -1).copy()      # (S,S,3,40)
        self.layout = render.uv_raster(fm.uvs, fm.triangles, size).mask
        self.kp_uv = fm.uvs[fm.keypoints].astype(np.float32)            # (68,2)
        self.keypoints = fm.keypoints

    def positions(self, alpha: np.ndarray) -> np.ndarray:
        return self.mean + self.basis @ alpha.astype(np.float32)


# ---- cache ---------------------------------------------------------------------------------------

def list_photos(folder: Path) -> List[Path]:
    from ..cli import IMAGE_EXTS
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def estimate_albedo_light(tex: np.ndarray, normals_cam: np.ndarray, w: np.ndarray, size: int):
    """Gray SH lighting (9,) by weighted least squares, and a low-pass albedo map (S,S,3)."""
    y = sh_basis(normals_cam)
    g = tex.mean(-1)
    sel = w > 0.05
    if sel.sum() < 50:
        return np.zeros((size, size, 3), np.float32), np.zeros(9, np.float32)
    yw = y[sel] * w[sel, None]
    l = np.linalg.solve(yw.T @ y[sel] + 1e-3 * np.eye(9), yw.T @ g[sel])
    shade = np.clip(y @ l, 0.05, None)
    sig = max(1.0, size * ALBEDO_SIGMA_FRAC)
    num = cv2.GaussianBlur((tex * w[..., None]).astype(np.float32), (0, 0), sig)
    den = cv2.GaussianBlur((shade * w).astype(np.float32), (0, 0), sig)
    alb = num / np.maximum(den, 1e-3)[..., None]
    return np.clip(alb, 0, 3).astype(np.float32), l.astype(np.float32)


def cache_one(image: np.ndarray, landmarks: np.ndarray, size: int) -> dict:
    """Everything training needs about one photo (coarse fit, UV maps, albedo, lighting)."""
    fm = morphable.face_model()
    fit = morphable.fit_3dmm(image, landmarks)
    inp = uv_inputs.uv_inputs(image, fit, size)
    rgb = image[:, :, ::-1].astype(np.float32) / 255.0
    pos = inp.positions / inp.scale
    tex = cv2.remap(rgb, np.ascontiguousarray(pos[:, :, 0]), np.ascontiguousarray(pos[:, :, 1]),
                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    n = render.vertex_normals(fit.vertices, fm.triangles) @ fit.rotation.T
    n_uv = render.to_uv(n, fm.uvs, fm.triangles, size)
    n_uv /= np.maximum(np.linalg.norm(n_uv, axis=-1, keepdims=True), 1e-6)
    alb, light = estimate_albedo_light(tex, n_uv, inp.visibility, size)
    return {"alpha": fit.params[12:52].astype(np.float32), "A": fit.A.astype(np.float32),
            "b": fit.b.astype(np.float32), "rot": fit.rotation.astype(np.float32),
            "landmarks": landmarks.astype(np.float32), "head_landmarks": fit.head_landmarks.astype(np.float32),
            "vis": (inp.visibility * 255 + 0.5).astype(np.uint8),
            "albedo": alb.astype(np.float16), "light": light}


def _load_fixed(path: Path, side: int) -> np.ndarray:
    from .image_io import load_image
    img = load_image(path)
    if img.shape[:2] != (side, side):
        raise ValueError("size")
    return img


def build_cache(photos: List[Path], cache: Path, size: int, worker: int = 0, workers: int = 1,
                side: int = 200, log=print) -> None:
    """Write ``shard_XXX.npz`` files (``SHARD`` photos each); existing shards of this version and UV size
    are kept (resume), others are rebuilt."""
    from . import detect
    cache.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(photos) / SHARD)
    for si in range(worker, n_shards, workers):
        out = cache / f"shard_{si:03d}.npz"
        if out.is_file() and _shard_meta(out) == (CACHE_VERSION, size, ""):
            continue
        recs, names, images = [], [], []
        t0 = time.perf_counter()
        for p in photos[si * SHARD:(si + 1) * SHARD]:
            try:
                img = _load_fixed(p, side)
            except Exception:  # noqa: BLE001 - unreadable or odd-sized photo: skip it
                continue
            faces = detect.detect_faces(img, use_cnn=False)
            if not faces:
                continue
            face = detect.nearest_face(faces, (side / 2, side / 2))
            recs.append(cache_one(img, face.landmarks, size))
            names.append(p.name)
            images.append(img)
        _write_shard(out, recs, names, np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8), size)
        log(f"cache shard {si + 1}/{n_shards}: {len(recs)} faces in {time.perf_counter() - t0:.0f} s")


def _write_shard(out: Path, recs: List[dict], names: List[str], images: np.ndarray, size: int,
                 tag: str = "") -> None:
    """One shard of records, written atomically with its version, UV size and ``tag``."""
    arrays = {k: np.stack([r[k] for r in recs]) for k in recs[0]} if recs else {}
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.npz")
    np.savez(tmp, names=np.array(names), images=images, size=np.array(size), version=np.array(CACHE_VERSION),
             teacher=np.array(tag), **arrays)
    os.replace(tmp, out)


def _shard_meta(path: Path) -> tuple:
    """(cache version, UV size, tag) of a shard, read without loading its arrays."""
    with np.load(path, allow_pickle=False) as z:
        return int(z["version"]), int(z["size"]), str(z["teacher"]) if "teacher" in z.files else ""


def load_cache(cache: Path, pattern: str = "shard_*.npz") -> dict:
    files = sorted(cache.glob(pattern))
    if not files:
        raise FileNotFoundError(cache)
    old = [f.name for f in files if _shard_meta(f)[0] != CACHE_VERSION]
    if old:
        raise ValueError(f"cache {cache} was built by an older version ({', '.join(old[:3])}…); "
                         f"delete the folder, or pass --photos, to rebuild it")
    parts = [dict(np.load(f, allow_pickle=False)) for f in files]
    parts = [p for p in parts if len(p["names"])]
    if not parts:
        raise ValueError(f"cache {cache} holds no faces")
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in ("size", "version", "teacher")}
    out["size"] = int(parts[0]["size"])
    return out


def is_holdout(name: str) -> bool:
    """Deterministic ~5 % split by a hash of the file name (independent of the name's age prefix)."""
    import zlib
    return zlib.crc32(name.encode()) % 100 < int(HOLDOUT * 100)


# ---- synthetic views with known geometry -----------------------------------------------------------

VIEW_TURN_DEG = (10.0, 30.0)   # yaw change of a synthetic view, always away from the camera
VIEW_PITCH_DEG = 10.0          # and a pitch change within ±this


def view_one(data: dict, i: int, size: int, teacher=None) -> Optional[dict]:
    """A cached photo's face re-rendered at a new pose (``novel_view``), as a cache record of the render
    (the pipeline's coarse fit of it, exactly like ``cache_one``) plus what is true about it:

    * ``target``: the drawn mesh, moved onto the render's coarse fit by a similarity transform, as a UV
      map of image-space positions (px), so the error left is shape, not pose or size;
    * ``head_landmarks``: the drawn mesh's 68 keypoints (the render's exact landmarks).

    The drawn mesh is the photo's coarse fit plus ``teacher``'s refinement (a network, or None for the
    coarse shape alone).  None when HOG finds no face in the render (or another one)."""
    from . import bench, detect, novel_view, refine
    fm = morphable.face_model()
    rng = np.random.default_rng(int(i))
    image = data["images"][i]
    fit = morphable.Fit(params=np.zeros(62, np.float32), roi_box=np.zeros(4, np.float32),
                        vertices=fm.shape_mm(data["alpha"][i]).astype(np.float32),
                        A=data["A"][i].astype(np.float32), b=data["b"][i].astype(np.float32))
    shape = fit.vertices
    if teacher is not None:
        d = refine.network_difference(teacher, image, fit, size)
        shape = shape + render.from_uv(d, fm.uvs)
    drawn = fit.project(shape)
    yaw = novel_view.away_yaw(fit.pose_degrees["yaw"], rng.uniform(*VIEW_TURN_DEG), rng)
    moved = novel_view.turned(drawn, yaw, rng.uniform(-VIEW_PITCH_DEG, VIEW_PITCH_DEG))
    view, _ = novel_view.render_view(image, drawn, moved, fm.triangles)
    truth = moved[fm.keypoints, :2]
    faces = detect.detect_faces(view, use_cnn=False)
    if not faces:
        return None
    face = detect.nearest_face(faces, truth.mean(0))
    if np.linalg.norm(face.landmarks.mean(0) - truth.mean(0)) > 0.1 * np.ptp(truth[:, 0]):
        return None
    rec = cache_one(view, face.landmarks, size)
    coarse = fm.shape_mm(rec["alpha"]) @ rec["A"].T.astype(np.float64) + rec["b"]
    sc, r, t = bench.similarity_transform(moved.astype(np.float64), coarse)
    target = (sc * moved.astype(np.float64) @ r.T + t).astype(np.float32)
    rec["target"] = render.to_uv(target, fm.uvs, fm.triangles, size)
    rec["head_landmarks"] = truth.astype(np.float32)
    rec["view_image"] = view
    return rec


def build_view_cache(data: dict, idx: np.ndarray, cache: Path, size: int, teacher=None, tag: str = "",
                     log=print) -> None:
    """``views_XXX.npz`` shards of ``view_one`` records for the cached photos ``idx`` (``SHARD`` each);
    shards of this version, UV size and teacher ``tag`` are kept (resume), others are rebuilt."""
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{tag}|turn {VIEW_TURN_DEG}|pitch {VIEW_PITCH_DEG}"
    n_shards = math.ceil(len(idx) / SHARD)
    for si in range(n_shards):
        out = cache / f"views_{si:03d}.npz"
        if out.is_file() and _shard_meta(out) == (CACHE_VERSION, size, tag):
            continue
        t0 = time.perf_counter()
        recs, names = [], []
        for i in idx[si * SHARD:(si + 1) * SHARD]:
            rec = view_one(data, int(i), size, teacher)
            if rec is not None:
                recs.append(rec)
                names.append("view_" + str(data["names"][i]))
        images = np.stack([r.pop("view_image") for r in recs]) if recs else np.zeros((0, 1, 1, 3), np.uint8)
        _write_shard(out, recs, names, images, size, tag)
        log(f"view shard {si + 1}/{n_shards}: {len(recs)} views in {time.perf_counter() - t0:.0f} s")


# ---- training ------------------------------------------------------------------------------------

class Batcher:
    """Turns cached photos into the network's inputs (exactly as ``uv_inputs`` builds them) and the
    loss targets, as torch tensors."""

    def __init__(self, data: dict, size: int, device, target: str = "head"):
        import torch
        self.d, self.size, self.device, self.torch = data, size, device, torch
        self.target = target
        self.lm_key = LANDMARK_TARGETS[target][0]
        self.uvm = UVModel(size)
        fm = morphable.face_model()
        self.lo, self.hi = uv_inputs.shape_range_um()
        self.kp_mean = fm.mean_mm[fm.keypoints].astype(np.float32)                 # (68,3)
        self.kp_basis = (fm.basis_um[fm.keypoints] / 1000.0).astype(np.float32)   # (68,3,40)

    def inputs(self, i: int):
        d, uvm = self.d, self.uvm
        alpha = d["alpha"][i]
        p0 = uvm.positions(alpha)
        img = d["images"][i]
        scale = float(abs(np.linalg.det(d["A"][i].astype(np.float64))) ** (1 / 3))
        photo, s = uv_inputs.photo_at_scale(img, scale)
        pos = (p0 @ d["A"][i].T + d["b"][i]) * s
        paf = uv_inputs.paf_image(np.ascontiguousarray(photo[:, :, ::-1]), pos[:, :, :2].astype(np.float32))
        shape = np.clip(((uvm.basis @ alpha) * 1000.0 - self.lo) / (self.hi - self.lo), 0, 1)
        vis = d["vis"][i].astype(np.float32) / 255.0
        return paf, vis, shape.astype(np.float32), p0

    def batch(self, idx):
        torch, d = self.torch, self.d
        parts = [self.inputs(i) for i in idx]
        t = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack(a))).to(self.device)
        b = {"paf": t([p[0].transpose(2, 0, 1) for p in parts]), "vis": t([p[1][None] for p in parts]),
             "shape": t([p[2].transpose(2, 0, 1) for p in parts]), "p0": t([p[3] for p in parts]),
             "image": t([d["images"][i][:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255 for i in idx]),
             "A": t([d["A"][i] for i in idx]), "b": t([d["b"][i] for i in idx]),
             "rot": t([d["rot"][i] for i in idx]), "lm": t([d[self.lm_key][i] for i in idx]),
             "albedo": t([d["albedo"][i].astype(np.float32) for i in idx]), "light": t([d["light"][i] for i in idx]),
             "kp0": t([self.kp_mean + self.kp_basis @ d["alpha"][i] for i in idx])}
        if "target" in d:
            b["target"] = t([d["target"][i] for i in idx])
        return b


class Losses:
    """The four UV-space losses; ``__call__`` returns (total, parts dict)."""

    WEIGHTS = {"photo": 1.0, "landmark": 2.0, "laplacian": 2.0, "magnitude": 1e-3}

    def __init__(self, uvm: UVModel, device, weights: Optional[dict] = None, target: str = "head"):
        import torch
        self.torch = torch
        self.w = dict(self.WEIGHTS, **(weights or {}))
        lay = uvm.layout.astype(np.float32)
        inner = cv2.erode(lay, np.ones((3, 3), np.uint8)) > 0
        inner[[0, -1], :] = False  # no central differences (normals) on the map's border
        inner[:, [0, -1]] = False
        self.inner = torch.from_numpy(inner.astype(np.float32)).to(device)
        kg = uvm.kp_uv * 2 - 1
        kg[:, 1] = -kg[:, 1]  # v up → row down
        self.kp_grid = torch.from_numpy(kg).to(device).view(1, 1, -1, 2)
        lw = np.ones(68, np.float32)
        lw[:17] = LANDMARK_TARGETS[target][1]
        self.lm_w = torch.from_numpy(lw / lw.sum()).to(device)
        self.sign = self._normal_sign(uvm)
        sig = max(1.0, uvm.size * ALBEDO_SIGMA_FRAC)
        x = np.arange(-int(3 * sig), int(3 * sig) + 1, dtype=np.float32)
        g = np.exp(-x * x / (2 * sig * sig))
        self.gauss = torch.from_numpy(g / g.sum()).to(device)
        self.lap_k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32,
                                  device=device).view(1, 1, 3, 3).repeat(3, 1, 1, 1)

    @staticmethod
    def _normal_sign(uvm: UVModel) -> float:
        fm = morphable.face_model()
        n = render.to_uv(render.vertex_normals(fm.mean_mm, fm.triangles), fm.uvs, fm.triangles, uvm.size)
        fd = np.cross(np.gradient(uvm.mean, axis=1), np.gradient(uvm.mean, axis=0))
        return 1.0 if float(np.sum(fd * n * uvm.layout[..., None])) > 0 else -1.0

    def normals(self, p):
        """Unit normals (B,S,S,3) of a UV position map (B,S,S,3) by central differences."""
        torch = self.torch
        dx = torch.zeros_like(p)
        dy = torch.zeros_like(p)
        dx[:, :, 1:-1] = (p[:, :, 2:] - p[:, :, :-2]) / 2
        dy[:, 1:-1] = (p[:, 2:] - p[:, :-2]) / 2
        n = torch.cross(dx, dy, dim=-1) * self.sign
        return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def project(self, p, b):
        return torch_einsum(self.torch, p, b["A"]) + b["b"].view(-1, *([1] * (p.dim() - 2)), 3)

    def blur(self, x):
        """Separable Gaussian low-pass (sigma = ``ALBEDO_SIGMA_FRAC`` of the map size) of (B,C,S,S)."""
        F = self.torch.nn.functional
        c = x.shape[1]
        k = self.gauss.to(x.dtype)
        r = k.shape[-1] // 2
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)

    def photometric_residual(self, p, b):
        """Per-texel (B,S,S) residual |photo(q) − albedo·shading(n)| and its weight (B,S,S).

        The photo is sampled at the texels' projected positions (no gradient through the position: the
        landmark term aligns, this term only judges the shading of the refined normals).  The albedo is
        the low-pass ratio of that texture to the shading, so only shading detail finer than the
        low-pass has to be explained by geometry; the SH lighting is the photo's (cached) estimate."""
        torch = self.torch
        F = torch.nn.functional
        q = self.project(p, b).detach()
        h, w = b["image"].shape[2:]
        grid = torch.stack([q[..., 0] / (w - 1) * 2 - 1, q[..., 1] / (h - 1) * 2 - 1], -1)
        photo = F.grid_sample(b["image"], grid, mode="bilinear", padding_mode="border", align_corners=True)
        n = self.normals(p) @ b["rot"].transpose(1, 2).unsqueeze(1)
        shade = (sh_basis(n) * b["light"].view(-1, 1, 1, 9)).sum(-1).clamp_min(0.05).unsqueeze(1)
        wt = (b["vis"][:, 0] * self.inner).unsqueeze(1)
        albedo = self.blur(photo * wt) / self.blur(shade * wt).clamp_min(1e-3)
        r = (photo - albedo * shade).abs().mean(1)
        return r, wt[:, 0]

    def landmark_nme(self, d, b):
        """(B,68) landmark errors normalised by sqrt(w·h) of the target landmarks' box."""
        torch = self.torch
        dk = torch.nn.functional.grid_sample(d, self.kp_grid.expand(d.shape[0], -1, -1, -1), mode="bilinear",
                                             align_corners=False)[:, :, 0].transpose(1, 2)   # (B,68,3)
        q = self.project(b["kp0"] + dk, b)[..., :2]
        wh = b["lm"].amax(1) - b["lm"].amin(1)
        return (q - b["lm"]).norm(dim=-1) / (wh[:, 0] * wh[:, 1]).sqrt().unsqueeze(1)

    def shape_error_mm(self, d, b):
        """(B,) mean distance (mm) of the refined face to a synthetic view's true shape (``target``)."""
        q = self.project(b["p0"] + d.permute(0, 2, 3, 1), b)
        scale = self.torch.linalg.det(b["A"]).abs().pow(1.0 / 3.0)
        e = (q - b["target"]).norm(dim=-1) * self.inner
        return e.sum((1, 2)) / self.inner.sum() / scale

    def __call__(self, d, b):
        torch = self.torch
        p = b["p0"] + d.permute(0, 2, 3, 1)
        r, wt = self.photometric_residual(p, b)
        photo = (torch.sqrt(r * r + 1e-4) * wt).sum() / wt.sum().clamp_min(1.0)
        lm = (self.landmark_nme(d, b) * self.lm_w).sum(1).mean()
        lap = torch.nn.functional.conv2d(d, self.lap_k, padding=1, groups=3)
        lap = (lap.square().sum(1) * self.inner).mean()
        mag = (d.square().sum(1) * self.inner).mean()
        parts = {"photo": photo, "landmark": lm, "laplacian": lap, "magnitude": mag}
        total = sum(self.w[k] * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}


def torch_einsum(torch, p, a):
    """Points (B,...,3) times per-sample matrices (B,3,3)ᵀ."""
    return torch.einsum("b...j,bij->b...i", p, a)


def detail_mm(d: np.ndarray, mask: np.ndarray, sigma: float) -> float:
    """Mean magnitude (mm) of the high-frequency part of a UV shape-difference map (S,S,3)."""
    hf = d - cv2.GaussianBlur(d.astype(np.float32), (0, 0), sigma)
    return float(np.linalg.norm(hf, axis=-1)[mask].mean()) if mask.any() else 0.0


def evaluate(net, batcher: Batcher, losses: Losses, idx: np.ndarray, batch: int = 16) -> dict:
    """Held-out photometric error and landmark NME (vs the batcher's target), coarse vs refined, and the
    detail measure."""
    import torch
    if len(idx) == 0:
        return {"n": 0}
    acc = {"photo_coarse": [0.0, 0.0], "photo_refined": [0.0, 0.0]}
    nme_c, nme_r, det = [], [], []
    net.eval()
    with torch.inference_mode():
        for s in range(0, len(idx), batch):
            b = batcher.batch(idx[s:s + batch])
            d = net(b["paf"], b["vis"], b["shape"]).float()
            for tag, dd in (("coarse", torch.zeros_like(d)), ("refined", d)):
                p = b["p0"] + dd.permute(0, 2, 3, 1)
                r, wt = losses.photometric_residual(p, b)
                acc[f"photo_{tag}"][0] += float((r * wt).sum())
                acc[f"photo_{tag}"][1] += float(wt.sum())
                (nme_c if tag == "coarse" else nme_r).append(losses.landmark_nme(dd, b).mean(1).cpu().numpy())
            dn = d.permute(0, 2, 3, 1).cpu().numpy()
            m = (b["vis"][:, 0] * losses.inner).cpu().numpy() > 0
            det += [detail_mm(dn[j], m[j], batcher.size / 64) for j in range(len(dn))]
    return {"n": int(len(idx)), "landmark_target": batcher.target,
            "photometric_coarse": acc["photo_coarse"][0] / max(acc["photo_coarse"][1], 1e-9),
            "photometric_refined": acc["photo_refined"][0] / max(acc["photo_refined"][1], 1e-9),
            "landmark_nme_coarse": float(np.concatenate(nme_c).mean()),
            "landmark_nme_refined": float(np.concatenate(nme_r).mean()),
            "detail_mm": float(np.mean(det))}


def evaluate_views(net, batcher: Batcher, losses: Losses, idx: np.ndarray, batch: int = 16) -> dict:
    """Mean 3D shape error (mm) on synthetic views, coarse vs refined."""
    import torch
    if len(idx) == 0:
        return {}
    coarse, refined = [], []
    net.eval()
    with torch.inference_mode():
        for s in range(0, len(idx), batch):
            b = batcher.batch(idx[s:s + batch])
            d = net(b["paf"], b["vis"], b["shape"]).float()
            coarse.append(losses.shape_error_mm(torch.zeros_like(d), b).cpu().numpy())
            refined.append(losses.shape_error_mm(d, b).cpu().numpy())
    return {"views_n": int(len(idx)), "view_shape_mm_coarse": float(np.concatenate(coarse).mean()),
            "view_shape_mm_refined": float(np.concatenate(refined).mean())}


def recalibrate_bn(net, batcher: Batcher, idx: np.ndarray, batches: int = 40, batch: int = 16,
                   seed: int = 0) -> None:
    """Replace the BatchNorm running statistics by exact averages over ``batches`` training batches.

    With small batches and a fast-moving network the exponential running averages lag behind the
    weights, and eval-mode outputs drift from what training optimised (measured: held-out landmark NME
    3.42 % → 3.25 % after recalibration).  Called before every evaluation and before the final save."""
    import torch
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    rng = np.random.default_rng(seed)
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            b = batcher.batch(rng.choice(idx, min(batch, len(idx)), replace=False))
            net(b["paf"], b["vis"], b["shape"])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    net.eval()


def save_weights(net, path: Path, meta: dict) -> str:
    """fp16 weights in our format (``state_dict`` + width/size metadata), written atomically; → sha256."""
    import torch
    from .assets import sha256_of
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(meta, state_dict=state), str(tmp))
    os.replace(tmp, path)
    return sha256_of(path)


def train(photos: Path, out: Path, steps: int = 2000, resume: bool = False, cache: Optional[Path] = None,
          width: int = 8, size: int = 128, batch: int = 8, lr: float = 1e-3, checkpoint_every: int = 100,
          eval_every: int = 500, seed: int = 0, target: str = "head", threads: int = 1,
          init: Optional[Path] = None, views: int = 0, views_per_batch: int = 4, view_weight: float = 0.15,
          log=print) -> dict:
    """Train (or, with ``init``, fine-tune) FGNet on ``photos``; see the module docstring.

    ``views`` > 0 adds that many synthetic views of training photos (``view_one``; their geometry is the
    coarse fit plus ``init``'s refinement, or the coarse fit alone without ``init``), ``views_per_batch``
    per step, with their 3D shape error weighted by ``view_weight`` per mm."""
    import torch
    from .fgnet import FGNet
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(threads)
    cache = Path(cache or out.with_suffix(".cache"))
    if Path(photos).is_dir():
        build_cache(list_photos(photos), cache, size, log=log)  # resumable: finished shards are kept
    data = load_cache(cache)
    if data["size"] != size:
        raise ValueError(f"cache {cache} was built at UV size {data['size']}, not {size}")
    hold = np.array([is_holdout(str(n)) for n in data["names"]])
    train_idx, held_idx = np.flatnonzero(~hold), np.flatnonzero(hold)
    log(f"{len(data['names'])} cached faces: {len(train_idx)} train, {len(held_idx)} held out; device {device}")
    batcher = Batcher(data, size, device, target)
    losses = Losses(batcher.uvm, device, target=target)
    torch.manual_seed(seed)
    teacher, tag = None, ""
    if init is not None:
        from .assets import sha256_of
        from .fgnet import load_checkpoint
        teacher, tag = load_checkpoint(init), sha256_of(Path(init))
        width = teacher.width
    net = FGNet(width=width).to(device)
    net.set_bn_momentum(0.1)
    if teacher is not None:
        net.load_state_dict(teacher.state_dict())
    else:
        torch.nn.init.zeros_(net.output_conv[0].weight)
        torch.nn.init.zeros_(net.output_conv[0].bias)
    vbatcher, view_train, view_held = None, np.zeros(0, int), np.zeros(0, int)
    if views > 0:
        pick = np.random.default_rng(seed).permutation(train_idx)[:views]
        held_pick = held_idx[:max(1, views // 20)]
        build_view_cache(data, np.concatenate([pick, held_pick]), cache / "views", size, teacher, tag, log=log)
        vdata = load_cache(cache / "views", "views_*.npz")
        vhold = np.array([is_holdout(str(n)[len("view_"):]) for n in vdata["names"]])
        view_train, view_held = np.flatnonzero(~vhold), np.flatnonzero(vhold)
        vbatcher = Batcher(vdata, size, device, "head")
        log(f"{len(vdata['names'])} synthetic views: {len(view_train)} train, {len(view_held)} held out")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ckpt = out.with_name(out.name + ".ckpt")
    step, history = 0, []
    if resume and ckpt.is_file():
        ckpt_file = os.fspath(ckpt)
        ck = torch.load(ckpt_file, map_location=device, weights_only=True)
        net.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        step, history = int(ck["step"]), json.loads(ck["history"])
        log(f"resumed from {ckpt} at step {step}")
    sched = lambda s: lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed + step)
    t0, seen = time.perf_counter(), 0
    run = {}
    while step < steps:
        net.train()
        for g in opt.param_groups:
            g["lr"] = sched(step)
        b = batcher.batch(rng.choice(train_idx, batch, replace=False))
        d = net(b["paf"], b["vis"], b["shape"])
        total, parts = losses(d, b)
        if vbatcher is not None:
            bv = vbatcher.batch(rng.choice(view_train, min(views_per_batch, len(view_train)), replace=False))
            dv = net(bv["paf"], bv["vis"], bv["shape"])
            tv, _ = losses(dv, bv)
            err = losses.shape_error_mm(dv, bv).mean()
            total = total + tv * (len(bv["paf"]) / batch) + view_weight * err
            parts["view_3d_mm"] = float(err.detach())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        step += 1
        seen += 1
        for k, v in parts.items():
            run[k] = 0.9 * run.get(k, v) + 0.1 * v
        if step % 10 == 0 or step == steps:
            rate = (time.perf_counter() - t0) / seen
            bar = "#" * int(30 * step / steps)
            log(f"[{bar:30s}] step {step}/{steps} " + " ".join(f"{k} {v:.4g}" for k, v in run.items())
                + f" | {rate:.2f} s/step, ETA {rate * (steps - step) / 60:.0f} min")
        if step % checkpoint_every == 0 or step == steps:
            history.append({"step": step, **run})
            tmp = ckpt.with_name(f".{ckpt.name}.tmp")
            torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "history": json.dumps(history)}, str(tmp))
            os.replace(tmp, ckpt)
            save_weights(net, out, {"width": width, "uv_size": size, "paf_k": uv_inputs.PAF_K, "step": step,
                                         "landmark_target": target})
        if eval_every and step % eval_every == 0 and step < steps:
            recalibrate_bn(net, batcher, train_idx, seed=step)
            ev = evaluate(net, batcher, losses, held_idx[:256])
            if vbatcher is not None:
                ev.update(evaluate_views(net, vbatcher, losses, view_held))
            log("held-out: " + json.dumps(ev))
    recalibrate_bn(net, batcher, train_idx, batches=80, seed=step)
    ev = evaluate(net, batcher, losses, held_idx)
    if vbatcher is not None:
        ev.update(evaluate_views(net, vbatcher, losses, view_held))
    sha = save_weights(net, out, {"width": width, "uv_size": size, "paf_k": uv_inputs.PAF_K, "step": step,
                                  "landmark_target": target, "heldout": json.dumps(ev), "views": views,
                                  "init_sha256": tag})
    log("final held-out: " + json.dumps(ev))
    return {"out": str(out), "sha256": sha, "steps": step, "heldout": ev, "device": str(device),
            "landmark_target": target, "views": views, "init_sha256": tag}


def install_weights(src: Path, models: Path, name: Optional[str] = None) -> dict:
    """Copy trained weights into ``models/`` and write ``models/fgnet.json`` (file, sha256, width, UV size)."""
    import shutil
    import torch
    from .assets import sha256_of
    src_file = os.fspath(src)
    ck = torch.load(src_file, map_location="cpu", weights_only=True)
    name = name or f"fgnet_w{int(ck['width'])}_uv{int(ck['uv_size'])}.pt"
    dst = models / name
    if Path(src).resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    info = {"file": name, "sha256": sha256_of(dst), "width": int(ck["width"]), "uv_size": int(ck["uv_size"]),
            "paf_k": int(ck["paf_k"]), "steps": int(ck["step"]), "bytes": dst.stat().st_size,
            "landmark_target": str(ck.get("landmark_target", "dlib"))}
    if int(ck.get("views", 0)):
        info.update(views=int(ck["views"]), init_sha256=str(ck["init_sha256"]))
    (models / "fgnet.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


if __name__ == "__main__":  # cache worker: python -m fg3d_blender.core.train_fgnet PHOTOS CACHE SIZE W N
    import torch
    torch.set_num_threads(1)
    build_cache(list_photos(Path(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                int(sys.argv[5]), log=lambda m: print(m, flush=True))
