"""Training data — a photo's face re-rendered at a new pose, with its true geometry known.

Single photos teach FGNet nothing about how a shape looks from another side, so the refinement it
learns from them alone follows each view's own 2D evidence and differs from view to view.  This stage
makes views whose geometry is known: a photo's face mesh (its coarse fit plus a refinement) is coloured
from the photo and drawn turned further away from the camera, over a blurred copy of the photo.
Turning away only hides surface; it reveals none the photo did not show, so the render has no
invented texture.  The pipeline's coarse fit of the render, compared with the mesh that was drawn,
gives a 3D error that FGNet can be trained to remove (``views``, ``trainer``).
"""

from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np

from fg3d_blender.core import render

BACKGROUND_BLUR_PX = 6.0  # the photo behind the turned face, blurred so no second face shows


def rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Rotation in the image frame (x right, y down, z toward the viewer): yaw about the vertical axis
    (positive moves the nose toward +x), then pitch about the horizontal axis."""
    cy, sy = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    cp, sp = np.cos(np.radians(pitch_deg)), np.sin(np.radians(pitch_deg))
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return ry @ rx


def turned(image_vertices: np.ndarray, yaw_deg: float, pitch_deg: float = 0.0) -> np.ndarray:
    """Image-space vertices (N,3) rotated about their centroid."""
    v = np.asarray(image_vertices, np.float64)
    c = v.mean(0)
    return ((v - c) @ rotation(yaw_deg, pitch_deg).T + c).astype(np.float32)


def away_yaw(face_yaw_deg: float, amount_deg: float, rng: np.random.Generator) -> float:
    """A yaw change of ``amount_deg`` that turns the face further from the camera (either way when the
    face is within 8° of frontal).  ``face_yaw_deg`` uses ``Fit.pose_degrees``' sign."""
    side = np.sign(face_yaw_deg) if abs(face_yaw_deg) > 8.0 else rng.choice([-1.0, 1.0])
    return float(side * amount_deg)


def render_view(
    image: np.ndarray, image_vertices: np.ndarray, new_vertices: np.ndarray, triangles: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """The face at ``image_vertices`` in the uint8 photo, redrawn at ``new_vertices`` (same vertex
    order) over the blurred photo.  Colours are the photo's at each vertex's original position.
    Returns (uint8 image like ``image``, mask of the face pixels)."""
    h, w = image.shape[:2]
    colours = render.sample(image.astype(np.float32), image_vertices[:, :2])
    r = render.rasterize(new_vertices, triangles, h, w)
    face = render.interpolate(r, triangles, colours)
    background = cv2.GaussianBlur(image.astype(np.float32), (0, 0), BACKGROUND_BLUR_PX)
    out = np.where(r.mask[..., None], face, background)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), r.mask
