"""``reconstruct()``: photo → detections → 3DMM → renders → (FGNet refinement) → textured mesh.

One function per stage lives in its own module; this one chains them, times them and collects the
outputs in a ``Result``.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from . import detect, morphable, render, texture
from .image_io import load_image

ProgressFn = Callable[[str, float], None]


@dataclass
class Result:
    vertices: np.ndarray          # (53215,3) float32 mm, BFM frame (x right, y up, z toward viewer)
    vertices_coarse: np.ndarray   # the 3DMM shape before refinement (same as vertices if unrefined)
    triangles: np.ndarray         # (105954,3) int32, 0-based
    uvs: np.ndarray               # (53215,2) float32, OpenGL convention (v up)
    texture: np.ndarray           # (S,S,3) uint8 BGR
    landmarks_2d: np.ndarray      # (68,2) image pixels, from the mesh
    landmarks_3d: np.ndarray      # (68,3) mm, canonical frame
    pose: Dict[str, float]        # yaw, pitch, roll in degrees
    camera: Dict[str, np.ndarray] # A (3,3), b (3,): image = vertices @ A.T + b; rotation; scale px/mm
    image_vertices: np.ndarray    # (53215,3) posed in photo pixels (x col, y row, z toward camera)
    depth: np.ndarray             # (h,w) float32, NaN off the face; larger = nearer, pixels
    pncc: np.ndarray              # (h,w,3) uint8 BGR PNCC image
    mask: np.ndarray              # (h,w) bool, face pixels
    vertex_visible: np.ndarray    # (53215,) bool
    normals: np.ndarray           # (53215,3) unit, canonical frame
    image: np.ndarray             # the photo, uint8 BGR
    face_box: np.ndarray          # (4,) detector box
    detected_landmarks: np.ndarray  # (68,2) dlib landmarks
    params: np.ndarray            # (62,) 3DMM parameters
    refined: bool
    source: str
    timings: Dict[str, float] = field(default_factory=dict)


def refined_shape(image: np.ndarray, fit) -> Tuple[np.ndarray, bool]:
    """The FGNet stage: (refined vertices, True), or (the fit's vertices, False) without FGNet weights."""
    from .refine import refine as fgnet_refine
    out = fgnet_refine(image, fit)
    return (fit.vertices, False) if out is None else (out, True)


@contextmanager
def _timed(timings: Dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + (time.perf_counter() - t0) * 1000.0


def reconstruct(photo: Union[str, os.PathLike, np.ndarray], face_index: Optional[int] = None,
                refine: bool = True, texture_size: int = 1024, passes: int = 2,
                progress: Optional[ProgressFn] = None) -> Result:
    """Reconstruct the (largest, or ``face_index``-th) face of a photo.  Raises FG3DError on bad input."""
    t: Dict[str, float] = {}
    say = progress or (lambda stage, frac: None)
    name = str(photo) if not isinstance(photo, np.ndarray) else "image"
    say("load", 0.0)
    with _timed(t, "load"):
        image = load_image(photo)
    say("detect", 0.1)
    with _timed(t, "detect"):
        face = detect.select_face(detect.detect_faces(image), face_index, name)
    say("3dmm", 0.35)
    with _timed(t, "3dmm"):
        fit = morphable.fit_3dmm(image, face.landmarks, passes=passes)
        fm = morphable.face_model()
    coarse = fit.vertices
    vertices, refined = coarse, False
    if refine:
        say("refine", 0.5)
        with _timed(t, "refine"):
            vertices, refined = refined_shape(image, fit)
    say("render", 0.7)
    h, w = image.shape[:2]
    with _timed(t, "render"):
        iv = fit.project(vertices)
        # render in the window the mesh covers (window coordinates = iv - off), then place it in the photo
        x0, y0, x1, y1 = render.bounding_window(iv, h, w)
        win = (slice(y0, y1), slice(x0, x1))
        iv_win = iv - np.array([x0, y0, 0], dtype=np.float32)
        ras = render.rasterize(iv_win, fm.triangles, y1 - y0, x1 - x0)
        mask = np.zeros((h, w), dtype=bool)
        mask[win] = ras.mask
        depth = np.full((h, w), np.nan, dtype=np.float32)
        depth[win] = np.where(ras.mask, ras.depth, np.nan)
        pncc_rgb = render.interpolate(ras, fm.triangles, render.pncc_colors(fm.mean_mm))
        pncc = np.zeros((h, w, 3), dtype=np.uint8)
        pncc[win] = (np.clip(pncc_rgb[:, :, ::-1], 0, 1) * 255 + 0.5).astype(np.uint8)
        tol = render.occlusion_tolerance(fit.scale)
        visible = render.visible_vertices(ras, iv_win, tol)
        normals = render.vertex_normals(vertices, fm.triangles)
        facing = (normals @ fit.rotation.T)[:, 2]
    say("texture", 0.85)
    with _timed(t, "texture"):
        tex, _ = texture.make_texture(image[win], iv_win, facing, fm.uvs, fm.triangles, ras.depth, texture_size,
                                      tol)
    t["total"] = sum(v for k, v in t.items())
    say("done", 1.0)
    kp = fm.keypoints
    return Result(
        vertices=vertices, vertices_coarse=coarse, triangles=fm.triangles, uvs=fm.uvs, texture=tex,
        landmarks_2d=iv[kp, :2].copy(), landmarks_3d=vertices[kp].copy(), pose=fit.pose_degrees,
        camera={"A": fit.A, "b": fit.b, "rotation": fit.rotation, "scale": fit.scale},
        image_vertices=iv, depth=depth, pncc=pncc, mask=mask, vertex_visible=visible, normals=normals,
        image=image, face_box=face.box, detected_landmarks=face.landmarks, params=fit.params,
        refined=refined, source=name, timings=t)
