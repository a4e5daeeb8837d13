"""``bench scan``: shape error against a real 3D scan, NoW-style.

The textured head scan of one person (``shared/scans/james``, mm, 68 3D landmarks) is rendered with the
project's rasterizer at 21 poses (yaw 0, ±30, ±60, ±75 × pitch 0, ±15) under a few lightings, over a
blurred photo.  Each render goes through the product's pipeline, detection included (a render where no
face is found is a miss, listed).  Each reconstructed mesh is aligned to the scan by the similarity of
the inner 51 landmarks, then by rigid+scale ICP to the scan's face region, and the distance from every
scan vertex within ``FACE_RADIUS_MM`` of the scan's nose tip to the mesh surface is measured (mm).  The
BFM mean face, aligned and measured the same way, is the floor to beat.  One person only: a check on
real geometry, not a population benchmark.

The scan's landmarks come in menpo's old labelling (chin, leye, reye, leyebrow, nose, reyebrow, mouth).
Measured on the data: the scan's frame is right-handed with y up and the face toward +z (nose tip
nearest), its UVs put x < 0 on the texture photo that shows the subject's right cheek, and "leye" lies
at x < 0 — so menpo's "l" is the image-left side, the subject's right (iBUG 36–41); a frontal render
checked against dlib confirms it (tests/test_bench_scan.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from scipy.spatial import cKDTree

from fg3d_blender.core import render
from fg3d_blender.core.geometry import (
    closest_points_on_mesh,
    pose_rotation,
    shape_consistency,
    similarity_transform,
)
from fg3d_blender.core.morphable import FACE_RADIUS_MM
from fg3d_blender.core.pipeline import Reconstructor

SHARED = Path(__file__).resolve().parents[2] / "shared"
BACKGROUND_DIR = SHARED / "photos/london_faces"

YAWS = (0, 30, -30, 60, -60, 75, -75)
PITCHES = (0, 15, -15)
IMAGE_SIZE = 450
FACE_WIDTH_PX = 210  # the frontal jaw span (iBUG 0–16) in the render
FACE_CENTRE = (0.5, 0.56)  # where the landmarks' centroid lands (fractions of the width, height)
INNER = slice(17, 68)  # the 51 inner landmarks the first alignment uses
CANDIDATES = 32  # nearest triangles tried per scan point (16 → 64 moves no distance by 0.02 mm)
ICP_ITERATIONS = 50  # converged: 30 → 50 changes the mean face by < 0.005 mm, 100 by nothing
BACKGROUND_SEED = 7
BACKGROUND_BLUR = 12.0  # Gaussian sigma, px: a photographic backdrop with no detectable face

#: menpo's old 68-point labels → their iBUG-68 indices (point order within each group is iBUG's).
MENPO_TO_IBUG = {
    "chin": range(0, 17),
    "leye": range(36, 42),  # image-left = the subject's right eye
    "reye": range(42, 48),
    "leyebrow": range(17, 22),
    "nose": range(27, 36),
    "reyebrow": range(22, 27),
    "mouth": range(48, 68),
}


@dataclass(frozen=True)
class Lighting:
    """A directional light in the camera frame (x right, y up, z toward the viewer) plus ambient."""

    name: str
    direction: Tuple[float, float, float]
    ambient: float
    diffuse: float


LIGHTINGS = (
    Lighting("soft", (0.0, 0.3, 1.0), 0.55, 0.55),
    Lighting("side", (0.9, 0.25, 0.35), 0.15, 1.05),
    Lighting("top", (-0.3, 1.0, 0.45), 0.3, 0.8),
)


@dataclass
class Scan:
    vertices: np.ndarray  # (N,3) mm, BFM frame (x right, y up, z toward the viewer)
    triangles: np.ndarray  # (T,3) int32 into vertices, wound outward
    landmarks: np.ndarray  # (68,3) mm, iBUG order, BFM frame
    texture: np.ndarray  # (H,W,3) uint8 BGR
    corner_vertex: np.ndarray  # (R,) render vertex → scan vertex (one render vertex per (v, vt) pair)
    corner_uv: np.ndarray  # (R,2) its UV (OBJ convention, v up)
    render_triangles: np.ndarray  # (T,3) int32 into the render vertices
    rotation: np.ndarray  # (3,3) the scan file's frame → BFM frame

    @property
    def nose_tip(self) -> np.ndarray:
        return self.landmarks[30]

    def face_region(self) -> np.ndarray:
        """Indices of the vertices within FACE_RADIUS_MM of the nose tip."""
        return np.flatnonzero(np.linalg.norm(self.vertices - self.nose_tip, axis=1) < FACE_RADIUS_MM)


# ---- loading --------------------------------------------------------------------------------------


def read_obj(path: Path):
    """(v (N,3), vt (M,2), face vertex indices (T,3), face vt indices (T,3)) of a triangle OBJ, 0-based."""
    v, vt, fv, ft = [], [], [], []
    for line in Path(path).read_text().splitlines():
        s = line.split()
        if not s:
            continue
        if s[0] == "v":
            v.append(s[1:4])
        elif s[0] == "vt":
            vt.append(s[1:3])
        elif s[0] == "f":
            corners = [c.split("/") for c in s[1:]]
            fv.append([int(c[0]) - 1 for c in corners])
            ft.append([int(c[1]) - 1 for c in corners])
    return (
        np.array(v, np.float64),
        np.array(vt, np.float64),
        np.array(fv, np.int32),
        np.array(ft, np.int32),
    )


def read_ljson(path: Path) -> np.ndarray:
    """The 68 landmarks (68,3) of an LJSON v3 file in menpo's old labelling, put in iBUG-68 order."""
    group = json.loads(Path(path).read_text())["groups"]["LJSON"]
    points = np.array(group["landmarks"]["points"], np.float64)
    out = np.full((68, 3), np.nan)
    for label in group["labels"]:
        out[list(MENPO_TO_IBUG[label["label"]])] = points[label["mask"]]
    if np.isnan(out).any():
        raise ValueError(f"{path}: the labels do not cover the 68 iBUG points")
    return out


def frame_rotation(landmarks: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The rotation taking the scan's landmarks into the frame of ``reference`` (the BFM mean's 68)."""
    _, r, _ = similarity_transform(landmarks, reference)
    return r


def outward(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """The triangles wound so that normals point away from the mesh's centroid."""
    n = render.vertex_normals(vertices, triangles)
    out = float(np.sum(n * (vertices - vertices.mean(0)))) > 0
    return np.ascontiguousarray(triangles if out else triangles[:, ::-1], np.int32)


def load_scan(folder, reference_landmarks: np.ndarray) -> Scan:
    """``james.obj`` + ``james.jpg`` + ``james.ljson`` of ``folder``, rotated into the BFM frame (the
    frame of ``reference_landmarks``) about the landmarks' centroid; millimetres kept."""
    folder = Path(folder)
    v, vt, fv, ft = read_obj(folder / "james.obj")
    lm = read_ljson(folder / "james.ljson")
    r = frame_rotation(lm, reference_landmarks)
    centre = lm.mean(0)
    verts = (v - centre) @ r.T
    pairs, inverse = np.unique(np.stack([fv.ravel(), ft.ravel()], 1), axis=0, return_inverse=True)
    render_tris = inverse.reshape(-1, 3).astype(np.int32)
    texture = cv2.imread(str(folder / "james.jpg"), cv2.IMREAD_COLOR)
    if texture is None:
        raise FileNotFoundError(folder / "james.jpg")
    return Scan(
        vertices=verts,
        triangles=outward(verts, fv),
        landmarks=(lm - centre) @ r.T,
        texture=texture,
        corner_vertex=pairs[:, 0],
        corner_uv=vt[pairs[:, 1]],
        render_triangles=np.ascontiguousarray(render_tris),
        rotation=r,
    )


# ---- rendering ------------------------------------------------------------------------------------


def px_per_mm(scan: Scan) -> float:
    """The render scale: the frontal jaw span is FACE_WIDTH_PX."""
    return FACE_WIDTH_PX / float(abs(scan.landmarks[16, 0] - scan.landmarks[0, 0]))


def project(points: np.ndarray, rotation: np.ndarray, scale: float, centre: np.ndarray) -> np.ndarray:
    """Posed BFM-frame points (mm) → image pixels (x col, y row, z toward the camera), orthographic, with
    the posed ``centre`` at FACE_CENTRE of the image (the face a little low, so the hair fits)."""
    p = (points - centre) @ rotation.T * scale
    cx, cy = FACE_CENTRE[0] * IMAGE_SIZE, FACE_CENTRE[1] * IMAGE_SIZE
    return np.stack([cx + p[:, 0], cy - p[:, 1], p[:, 2]], 1).astype(np.float32)


def texture_colours(scan: Scan, raster: render.Raster) -> np.ndarray:
    """The scan's texture at every pixel of ``raster`` (h,w,3) float32 BGR (OBJ UVs: v up)."""
    h, w = scan.texture.shape[:2]
    uv_px = np.stack([scan.corner_uv[:, 0] * w - 0.5, (1.0 - scan.corner_uv[:, 1]) * h - 0.5], 1)
    maps = render.interpolate(raster, scan.render_triangles, uv_px)
    return render.remap_at(scan.texture, maps).astype(np.float32)


def shading(scan: Scan, raster: render.Raster, rotation: np.ndarray, light: Lighting) -> np.ndarray:
    """Lambert + ambient of the posed scan at every pixel (h,w) for a light fixed to the camera."""
    normals = render.vertex_normals(scan.vertices, scan.triangles)[scan.corner_vertex] @ rotation.T
    n = render.interpolate(raster, scan.render_triangles, normals)
    n /= np.maximum(np.linalg.norm(n, axis=2, keepdims=True), 1e-6)
    d = np.asarray(light.direction, np.float64)
    return (light.ambient + light.diffuse * np.clip(n @ (d / np.linalg.norm(d)), 0, None)).astype(np.float32)


def background(seed: int = BACKGROUND_SEED, skip: int = 0) -> np.ndarray:
    """A blurred IMAGE_SIZE² backdrop: a seeded square crop of the lower 30 % (shoulders, clothes, the
    studio wall) of a seeded choice of London-set photo; ``skip`` steps to later choices."""
    photos = sorted(BACKGROUND_DIR.glob("*.jpg"))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    img = cv2.imread(str(photos[order[skip % len(photos)]]), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    side = min(int(h * 0.3), w)
    x0 = int(rng.integers(0, w - side + 1))
    crop = cv2.resize(img[h - side :, x0 : x0 + side], (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(crop, (0, 0), BACKGROUND_BLUR)


def render_view(scan: Scan, yaw: float, pitch: float, light: Lighting, backdrop: np.ndarray) -> np.ndarray:
    """The textured, shaded scan at (yaw, pitch) over ``backdrop``: IMAGE_SIZE² uint8 BGR."""
    rot = pose_rotation(yaw, pitch)
    iv = project(scan.vertices[scan.corner_vertex], rot, px_per_mm(scan), scan.landmarks.mean(0))
    ras = render.rasterize(iv, scan.render_triangles, IMAGE_SIZE, IMAGE_SIZE)
    colour = texture_colours(scan, ras) * shading(scan, ras, rot, light)[:, :, None]
    out = np.where(ras.mask[:, :, None], colour, backdrop.astype(np.float32))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def landmarks_in_view(scan: Scan, yaw: float, pitch: float) -> np.ndarray:
    """The scan's 68 landmarks projected into ``render_view``'s image (68,2)."""
    iv = project(scan.landmarks, pose_rotation(yaw, pitch), px_per_mm(scan), scan.landmarks.mean(0))
    return iv[:, :2]


# ---- reconstruction, alignment, distance -----------------------------------------------------------


def reconstruct(rec: Reconstructor, image: np.ndarray, refine: bool, refit: bool) -> Optional[np.ndarray]:
    """The product's shape (mm, BFM frame) of the face its default takes (the largest found; the same
    detection as ``Reconstructor.reconstruct``), or None when none is found."""
    faces = rec.faces(image, largest=True)
    if not faces:
        return None
    fit = rec.fit(image, faces[0].landmarks, refit=refit)
    return rec.refined_shape(image, fit)[0] if refine else fit.vertices


def align_to_scan(
    vertices: np.ndarray,
    landmarks: np.ndarray,
    scan_landmarks: np.ndarray,
    targets: np.ndarray,
    iterations: int = ICP_ITERATIONS,
) -> np.ndarray:
    """``vertices`` moved onto the scan: the similarity of the mesh's inner 51 ``landmarks`` (68,3) onto
    the scan's, then rigid+scale ICP pairing each scan point of ``targets`` with its nearest vertex."""
    v = np.asarray(vertices, np.float64)
    s, r, t = similarity_transform(np.asarray(landmarks, np.float64)[INNER], scan_landmarks[INNER])
    tree = cKDTree(v)
    for _ in range(iterations):
        _, nearest = tree.query((targets - t) @ r / s)  # the targets in the mesh's own frame
        s, r, t = similarity_transform(v[nearest], targets)
    return s * v @ r.T + t


def scan_to_mesh(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Distance (mm) from each point to the mesh surface: exact point–triangle distances to the
    CANDIDATES triangles nearest each point."""
    return closest_points_on_mesh(points, vertices, triangles, k=CANDIDATES)[0]


def measure(vertices: np.ndarray, landmarks: np.ndarray, triangles: np.ndarray, scan: Scan, face: np.ndarray):
    """(aligned vertices, scan-to-mesh distances of the scan's vertices ``face``) of one mesh."""
    targets = scan.vertices[face]
    aligned = align_to_scan(vertices, landmarks, scan.landmarks, targets)
    return aligned, scan_to_mesh(targets, aligned, triangles)


def views(n_lightings: int) -> List[Tuple[str, int, int, Lighting]]:
    """(name, yaw, pitch, lighting) of every render."""
    return [
        (f"yaw{y:+d}_pitch{p:+d}_{light.name}", y, p, light)
        for light in LIGHTINGS[:n_lightings]
        for y in YAWS
        for p in PITCHES
    ]


def clean_background(detector) -> np.ndarray:
    """The first seeded backdrop in which ``detector`` (a Reconstructor or a detect.Detector) finds no
    face."""
    for k in range(20):
        bg = background(skip=k)
        if not detector.faces(bg):
            return bg
    raise RuntimeError("no backdrop without a detectable face")


def run(args) -> dict:
    t0 = time.perf_counter()
    refine, refit = not args.no_refine, not args.no_refit
    rec = Reconstructor()
    fm = rec.face_model
    kp, tris = fm.keypoints, fm.triangles
    scan = load_scan(args.dir, fm.mean_mm[kp].astype(np.float64))
    face = scan.face_region()
    if refine and rec.refiner is None:
        raise RuntimeError("no FGNet weights installed: run with --no-refine")
    backdrop = clean_background(rec)
    medians: Dict[str, float] = {}
    means: Dict[str, float] = {}
    yaw_of: Dict[str, int] = {}
    shapes, missed = [], []
    for name, yaw, pitch, light in views(args.lightings):
        verts = reconstruct(rec, render_view(scan, yaw, pitch, light, backdrop), refine, refit)
        if verts is None:
            missed.append(name)
            continue
        aligned, d = measure(verts, verts[kp], tris, scan, face)
        medians[name], means[name], yaw_of[name] = float(np.median(d)), float(d.mean()), abs(yaw)
        shapes.append(aligned[fm.face_region])
    _, d_mean = measure(fm.mean_mm, fm.mean_mm[kp], tris, scan, face)
    spread = shape_consistency(shapes) if len(shapes) > 1 else np.zeros(len(shapes))
    by_yaw = {
        str(y): round(float(np.median([m for n, m in medians.items() if yaw_of[n] == y])), 3)
        for y in sorted(set(yaw_of.values()))
    }
    return {
        "median_mm": round(float(np.median(list(medians.values()))), 3) if medians else None,
        "mean_mm": round(float(np.mean(list(means.values()))), 3) if means else None,
        "by_yaw": by_yaw,
        "spread_mm": round(float(spread.mean()), 3) if len(spread) else None,
        "mean_face_median_mm": round(float(np.median(d_mean)), 3),
        "mean_face_mean_mm": round(float(d_mean.mean()), 3),
        "n": len(medians),
        "n_missed": len(missed),
        "missed": missed,
        "refine": refine,
        "refit": refit,
        "lightings": [light.name for light in LIGHTINGS[: args.lightings]],
        "scan_points": int(len(face)),
        "per_render": {n: round(m, 3) for n, m in medians.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
