"""The pipeline façade: photo → detections → 3DMM → (FGNet refinement) → renders → textured mesh.

``Reconstructor`` owns the models (dlib detector, face model, regressor, FGNet), loaded on first use,
and runs one function per stage (each in its own module), timing them into a ``Result``.  The two
networks run on onnxruntime (``onnx_models``): the pipeline never imports torch.
``reconstruct()`` is a thin convenience over one shared default instance.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from . import assets, detect, morphable, render, texture
from . import threads as thread_policy
from .choices import TEXTURE_SIZES
from .errors import FG3DError
from .image_io import load_image
from .morphable import ExpressionModes, FaceModel, Fit, RefitPriors
from .refine import FGNetRefiner

ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True)
class Options:
    """What one reconstruction does: which face (None = the largest; checked against the faces found),
    FGNet on or off, the texture size (one of ``TEXTURE_SIZES``) and the regressor passes."""

    face_index: Optional[int] = None
    refine: bool = True
    texture_size: int = 1024
    passes: int = 2

    def check(self) -> Options:
        """FG3DError (one line) for a value out of range or of the wrong type."""
        if not _is_int(self.texture_size) or self.texture_size not in TEXTURE_SIZES:
            raise FG3DError(
                f"texture size {self.texture_size!r} is not one of {', '.join(map(str, TEXTURE_SIZES))}"
            )
        if self.face_index is not None and (not _is_int(self.face_index) or self.face_index < 0):
            raise FG3DError(f"face index {self.face_index!r} is not a whole number ≥ 0 (0 = largest face)")
        if not _is_int(self.passes) or not 1 <= self.passes <= 8:
            raise FG3DError(f"passes {self.passes!r} is not a whole number in 1…8")
        return self


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass
class Result:
    vertices: np.ndarray  # (53215,3) float32 mm, BFM frame (x right, y up, z toward viewer)
    vertices_coarse: np.ndarray  # the 3DMM shape before refinement (same as vertices if unrefined)
    vertices_neutral: np.ndarray  # the 3DMM identity alone, without expression (mm)
    expression: Dict[str, float]  # the fitted weight of each expression blendshape (ARKit names), [0, 1]
    triangles: np.ndarray  # (105954,3) int32, 0-based
    uvs: np.ndarray  # (53215,2) float32, OpenGL convention (v up)
    texture: np.ndarray  # (S,S,3) uint8 BGR
    landmarks_2d: np.ndarray  # (68,2) image pixels, from the mesh
    landmarks_3d: np.ndarray  # (68,3) mm, canonical frame
    pose: Dict[str, float]  # yaw, pitch, roll in degrees
    camera: Dict[str, np.ndarray]  # A (3,3), b (3,): image = vertices @ A.T + b; rotation; scale px/mm
    image_vertices: np.ndarray  # (53215,3) posed in photo pixels (x col, y row, z toward camera)
    depth: np.ndarray  # (h,w) float32, NaN off the face; larger = nearer, pixels
    pncc: np.ndarray  # (h,w,3) uint8 BGR PNCC image
    mask: np.ndarray  # (h,w) bool, face pixels
    vertex_visible: np.ndarray  # (53215,) bool
    normals: np.ndarray  # (53215,3) unit, canonical frame
    image: np.ndarray  # the photo, uint8 BGR
    face_box: np.ndarray  # (4,) detector box
    detected_landmarks: np.ndarray  # (68,2) dlib landmarks
    params: np.ndarray  # (62,) 3DMM parameters
    refined: bool
    source: str
    timings: Dict[str, float] = field(default_factory=dict)
    blendshapes: Optional[ExpressionModes] = None  # the model's modes (names, (K,N,3) mm), shared

    @property
    def expression_weights(self) -> np.ndarray:
        """The weights in ``blendshapes.names`` order (K,)."""
        names = self.blendshapes.names if self.blendshapes is not None else []
        return np.array([self.expression.get(n, 0.0) for n in names], np.float32)


@dataclass
class Renders:
    """The render stage's output for one posed mesh over its photo."""

    face: render.FaceRender  # the windowed raster
    image_vertices: np.ndarray  # (N,3) photo pixels
    normals: np.ndarray  # (N,3) canonical frame
    facing: np.ndarray  # (N,) cosine to the camera
    tolerance: float  # z-buffer tolerance, px

    def depth(self) -> np.ndarray:
        ras = self.face.raster
        return self.face.in_photo(np.where(ras.mask, ras.depth, np.nan).astype(np.float32), np.nan)

    def mask(self) -> np.ndarray:
        return self.face.in_photo(self.face.raster.mask, False)

    def pncc(self, fm: FaceModel) -> np.ndarray:
        rgb = render.interpolate(self.face.raster, fm.triangles, fm.pncc_colors)
        return self.face.in_photo((np.clip(rgb[:, :, ::-1], 0, 1) * 255 + 0.5).astype(np.uint8), 0)

    def visible(self) -> np.ndarray:
        return render.visible_vertices(self.face.raster, self.face.vertices, self.tolerance)


def render_mesh(image_shape, fit: Fit, vertices: np.ndarray, fm: FaceModel) -> Renders:
    """The render stage: a mesh posed by ``fit`` rasterized in its window of the photo."""
    iv = fit.project(vertices)
    face = render.render_face(iv, fm.triangles, image_shape[0], image_shape[1])
    normals = render.vertex_normals(vertices, fm.triangles)
    facing = (normals @ fit.rotation.T)[:, 2]
    return Renders(
        face=face,
        image_vertices=iv,
        normals=normals,
        facing=facing,
        tolerance=render.occlusion_tolerance(fit.scale),
    )


def bake_texture(image: np.ndarray, renders: Renders, fm: FaceModel, size: int) -> np.ndarray:
    """The texture stage: the photo baked into the UV layout at size×size (uint8 BGR)."""
    face = renders.face
    tex, _ = texture.make_texture(
        image[face.slices],
        face.vertices,
        renders.facing,
        fm.uv_raster(texture.geometry_size(size)),
        fm.triangles,
        face.raster.depth,
        renders.tolerance,
        size,
    )
    return tex


@contextmanager
def _timed(timings: Dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + (time.perf_counter() - t0) * 1000.0


class Reconstructor:
    """Owns the models and runs the pipeline.  Models load on first use (thread-safe); one instance
    can serve many photos and threads.  Every stage runs with ``threads`` CPU threads (``core.threads``:
    OpenCV, BLAS, onnxruntime; 0 = automatic, one); ``backend="torch"`` runs the torch modules instead
    (comparisons and benchmarks; imports torch)."""

    def __init__(
        self, priors: RefitPriors = morphable.DEFAULT_PRIORS, threads: int = 1, backend: str = "onnxruntime"
    ):
        if backend not in morphable.BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {morphable.BACKENDS}")
        self.priors = priors  # of the landmark refit (identity, expression)
        self.threads, self.backend = thread_policy.resolve(threads), backend
        self._lock = threading.RLock()
        self._detector: Optional[detect.Detector] = None
        self._face_model: Optional[FaceModel] = None
        self._regressor = None  # onnx_models.Regressor, or the torch MobileNetV1
        self._refiner: Optional[FGNetRefiner] = None
        self._refiner_loaded = False

    @property
    def detector(self) -> detect.Detector:
        with self._lock:
            if self._detector is None:
                self._detector = detect.Detector()
            return self._detector

    @property
    def face_model(self) -> FaceModel:
        with self._lock:
            if self._face_model is None:
                self._face_model = FaceModel()
            return self._face_model

    @property
    def regressor(self):
        """The 3DMM regressor: ``predict(crops) -> (params, landmarks)``."""
        with self._lock:
            if self._regressor is None:
                self._regressor = morphable.load_face_regressor(self.threads, self.backend)
            return self._regressor

    @property
    def refiner(self) -> Optional[FGNetRefiner]:
        """The bundled FGNet, or None when no weights are installed."""
        with self._lock:
            if not self._refiner_loaded:
                self._refiner = FGNetRefiner.load(self.face_model, self.threads, self.backend)
                self._refiner_loaded = True
            return self._refiner

    def models_loaded(self, refine: bool = True) -> bool:
        with self._lock:
            have = None not in (self._detector, self._face_model, self._regressor)
            return have and (self._refiner_loaded or not refine)

    def load_models(self, refine: bool = True) -> None:
        """Load every model a run needs now (a first run's slow part: ~10 s, the dense basis once ~9 s)."""
        _ = self.detector, self.face_model, self.regressor
        if refine:
            _ = self.refiner

    # ---- stages --------------------------------------------------------------------------------

    def faces(self, image: np.ndarray, use_cnn: bool = True, largest: bool = False):
        """Every face (``detect.detect_faces``: HOG's largest first, then turned faces only the CNN finds);
        with ``largest`` the largest alone (a shorter HOG search)."""
        return self.detector.faces(image, use_cnn, largest)

    def fit(self, image: np.ndarray, landmarks: np.ndarray, passes: int = 2, refit: bool = True) -> Fit:
        return morphable.fit_3dmm(
            image, landmarks, self.face_model, self.regressor, passes=passes, refit=refit, priors=self.priors
        )

    def refined_shape(self, image: np.ndarray, fit: Fit) -> Tuple[np.ndarray, bool]:
        """The FGNet stage: (refined vertices, True), or (the fit's vertices, False) without weights."""
        refiner = self.refiner
        return (fit.vertices, False) if refiner is None else (refiner.refine(image, fit), True)

    def reconstruct(
        self,
        photo: Union[str, os.PathLike, np.ndarray],
        options: Options = Options(),
        progress: Optional[ProgressFn] = None,
    ) -> Result:
        """Reconstruct one face of a photo.  Raises FG3DError on bad input."""
        opts = options.check()
        t: Dict[str, float] = {}
        say = progress or _silent
        name = str(photo) if not isinstance(photo, np.ndarray) else "image"
        if not self.models_loaded(opts.refine):
            say("models", 0.0)
            with _timed(t, "models"):
                self.load_models(opts.refine)
        thread_policy.ensure(self.threads, torch=self.backend == "torch")  # one policy for every stage
        say("load", 0.05)
        with _timed(t, "load"):
            image = load_image(photo)
        say("detect", 0.1)
        with _timed(t, "detect"):
            # the largest face (the default, or index 0) needs HOG's upper pyramid levels only
            faces = self.faces(image, largest=opts.face_index in (None, 0))
            face = detect.select_face(faces, opts.face_index, name)
        say("3dmm", 0.35)
        with _timed(t, "3dmm"):
            fit = self.fit(image, face.landmarks, passes=opts.passes)
            fm = self.face_model
        vertices, refined = fit.vertices, False
        if opts.refine:
            say("refine", 0.5)
            with _timed(t, "refine"):
                vertices, refined = self.refined_shape(image, fit)
        say("render", 0.7)
        with _timed(t, "render"):
            r = render_mesh(image.shape, fit, vertices, fm)
            depth, mask, pncc, visible = r.depth(), r.mask(), r.pncc(fm), r.visible()
        say("texture", 0.85)
        with _timed(t, "texture"):
            tex = bake_texture(image, r, fm, opts.texture_size)
        t["total"] = sum(t.values())
        say("done", 1.0)
        kp = fm.keypoints
        iv = r.image_vertices
        return Result(
            vertices=vertices,
            vertices_coarse=fit.vertices,
            vertices_neutral=fit.vertices_neutral
            if fit.vertices_neutral is not None
            else fm.shape_mm(fit.params[12:52]),
            expression=fit.expression_named(fm),
            blendshapes=fm.expressions,
            triangles=fm.triangles,
            uvs=fm.uvs,
            texture=tex,
            landmarks_2d=iv[kp, :2].copy(),
            landmarks_3d=vertices[kp].copy(),
            pose=fit.pose_degrees,
            camera={"A": fit.A, "b": fit.b, "rotation": fit.rotation, "scale": fit.scale},
            image_vertices=iv,
            depth=depth,
            pncc=pncc,
            mask=mask,
            vertex_visible=visible,
            normals=r.normals,
            image=image,
            face_box=face.box,
            detected_landmarks=face.landmarks,
            params=fit.params,
            refined=refined,
            source=name,
            timings=t,
        )


def _silent(stage: str, fraction: float) -> None:
    """The progress callback used when none is given."""


_default_lock = threading.Lock()
_default: Optional[Tuple[Tuple[str, int], Reconstructor]] = None  # ((asset cache, threads), the instance)


def default_reconstructor(threads: int = 0) -> Reconstructor:
    """The shared instance behind ``reconstruct()`` (the CLI, the add-on and the tests use it, so the
    models load once per process).  When the asset cache folder changes (the add-on's preference) or
    the thread count does, a new instance loads, and verifies, the models from there."""
    global _default
    key = (str(assets.cache_dir()), thread_policy.resolve(threads))
    with _default_lock:
        if _default is None or _default[0] != key:
            _default = (key, Reconstructor(threads=key[1]))
        return _default[1]


def reconstruct(
    photo: Union[str, os.PathLike, np.ndarray],
    face_index: Optional[int] = None,
    refine: bool = True,
    texture_size: int = 1024,
    passes: int = 2,
    progress: Optional[ProgressFn] = None,
    threads: int = 0,
) -> Result:
    """Reconstruct the (largest, or ``face_index``-th) face of a photo.  Raises FG3DError on bad input.
    ``threads``: CPU threads for every stage (``core.threads``: 0 = automatic, one)."""
    opts = Options(face_index=face_index, refine=refine, texture_size=texture_size, passes=passes)
    return default_reconstructor(threads).reconstruct(photo, opts, progress)
