"""Command line: ``python -m fg3d_blender {reconstruct,demo,fetch-assets} …``, and from a checkout also
``bench …`` and ``train-fgnet …`` (the ``benchmarks`` and ``training`` packages beside this one; the
add-on zip holds neither).

User errors print one line on stderr (``fg3d: error: …``) and exit 1 (argument errors: exit 2);
nothing is left half-written, also when the run is stopped by Ctrl-C (exit 130) or SIGTERM (exit 143).
In a batch, a photo that fails, even by an unexpected internal error, does not stop the others.
Set ``FG3D_DEBUG=1`` to see tracebacks of unexpected failures.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import cv2

from .core.assets import cache_dir, fetch_assets
from .core.choices import TEXTURE_SIZES
from .core.errors import FG3DError
from .core.export import check_formats, check_output_dir, fit_stem, write_outputs
from .core.image_io import list_photos
from .operators.blend_writer import require_bpy, write_blend

#: Commands whose code lives beside the package (a checkout): name → (module, help).
CHECKOUT_COMMANDS = {
    "bench": ("benchmarks.cli", "benchmarks that print numbers (last line JSON with --json)"),
    "train-fgnet": ("training.cli", "train FGNet self-supervised on a folder of face photos"),
    "build-expressions": ("training.expressions", "carry ICT-FaceKit's expression modes onto the BFM mesh"),
    "export-onnx": (
        "training.onnx_export",
        "write the networks' ONNX graphs (models/*.onnx) from the torch code",
    ),
}


def _err(msg: str) -> None:
    print(f"fg3d: error: {' '.join(str(msg).split())}", file=sys.stderr)


def _internal(exc: BaseException) -> str:
    return f"internal error ({type(exc).__name__}: {exc}); rerun with FG3D_DEBUG=1 and report it"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``fg3d: error:`` line (exit 2) instead of the usage block."""

    def error(self, message: str):
        _err(f"{message} (see {self.prog} --help)")
        sys.exit(2)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so every ``finally`` and abort path runs (no .part left)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _int_in(lo: int, hi: int, allowed=None):
    """An argparse type: an integer in [lo, hi] (and in ``allowed`` when given), with a one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if allowed is not None and value not in allowed:
            raise argparse.ArgumentTypeError(f"{value} is not one of {', '.join(map(str, allowed))}")
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}…{hi}")
        return value

    return parse


def _expand(paths: List[str]) -> List[Path]:
    """Photos named directly, plus the image files of any folder named (sorted by name)."""
    out: List[Path] = []
    for p in map(Path, paths):
        try:
            is_dir = p.is_dir()
        except OSError:  # a name over 255 bytes, no permission …: loading it gives the one line
            is_dir = False
        if is_dir:
            found = list_photos(p)
            if not found:
                raise FG3DError(f"{p}: is a folder with no photos in it (.jpg, .png, …)")
            out.extend(found)
        else:
            out.append(p)
    return out


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled, time.perf_counter()

    def update(self, done: int, label: str):
        if not self.enabled:
            return
        width = 30
        fill = int(width * done / max(self.total, 1))
        rate = done / max(time.perf_counter() - self.t0, 1e-6)
        sys.stderr.write(
            f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} {rate:.1f}/s {label[:40]:40s}"
        )
        sys.stderr.flush()
        if done == self.total:
            sys.stderr.write("\n")


def _summary(result, files) -> dict:
    return {
        "photo": result.source,
        "ok": True,
        "files": [str(f) for f in files],
        "pose": result.pose,
        "refined": result.refined,
        "timings_ms": {k: round(v, 1) for k, v in result.timings.items()},
    }


def cmd_reconstruct(args) -> int:
    from .core.pipeline import reconstruct  # heavy (dlib, onnxruntime, scipy): only for reconstructing

    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    writers = {}
    if "blend" in formats:  # bpy lives in the operators layer, never in core
        require_bpy()
        writers["blend"] = write_blend
    extras = [] if args.no_extras else ["depth", "pncc", "preview"]
    check_formats(formats, extras, writers)  # once, before any photo is processed
    photos = _expand(args.photos)
    if not photos:
        raise FG3DError("no photos given (a folder must contain .jpg/.png/… files)")
    out_dir = Path(args.output)
    check_output_dir(out_dir)
    bar = _Progress(len(photos), enabled=len(photos) > 1 and not args.quiet)
    reports: list = []
    internal = 0

    def failed(photo: Path, exc: Exception) -> None:
        nonlocal internal
        if len(photos) == 1 or (os.environ.get("FG3D_DEBUG") and not isinstance(exc, FG3DError)):
            raise exc
        internal += not isinstance(exc, FG3DError)
        message = str(exc) if isinstance(exc, FG3DError) else f"{photo}: {_internal(exc)}"
        reports.append({"photo": str(photo), "ok": False, "error": message})
        if bar.enabled:
            sys.stderr.write("\n")
        _err(message)

    def written(i: int, photo: Path, result, files) -> None:
        """Report photo ``i`` once its files are written: ``files`` is the writer thread's Future, or
        the call that writes them here."""
        try:
            files = files.result() if isinstance(files, Future) else files()
        except Exception as exc:  # noqa: BLE001 - one photo's failure, whatever it is, ends only that photo
            failed(photo, exc)
        else:
            reports.append(_summary(result, files))
            if not args.json and not bar.enabled and not args.quiet:
                print(
                    f"{photo}: {len(files)} files in {out_dir} "
                    f"({result.timings['total']:.0f} ms, yaw {result.pose['yaw']:+.0f}°)"
                )
        bar.update(i + 1, photo.name)

    # A batch writes each photo's files on a second thread while the next photo is reconstructed (the
    # pipeline runs on one thread: the other core encodes the PNGs, formats the OBJ); one photo, or
    # .blend (bpy belongs to the main thread), is written in line.  Reports keep the photos' order.
    pool = ThreadPoolExecutor(1, "fg3d-write") if len(photos) > 1 and "blend" not in formats else None
    pending = None  # (index, photo, result, future) still being written
    used: set = set()
    try:
        for i, photo in enumerate(photos):
            stem, k = fit_stem(photo.stem or "face"), 2  # every output name fits the 255-byte limit
            while stem in used:
                stem, k = fit_stem(photo.stem or "face", f"_{k}"), k + 1
            used.add(stem)
            try:
                result = reconstruct(
                    photo,
                    face_index=args.face_index,
                    refine=not args.no_refine,
                    texture_size=args.texture_size,
                    threads=args.threads,
                )
            except Exception as exc:  # noqa: BLE001 - one photo's failure, whatever it is, ends only that photo
                if pending is not None:
                    written(*pending)
                    pending = None
                failed(photo, exc)
                bar.update(i + 1, photo.name)
                continue
            job = (out_dir, stem, formats, extras, writers)
            if pool is None:
                written(i, photo, result, lambda: write_outputs(result, *job))  # noqa: B023 - called here
                continue
            if pending is not None:
                written(*pending)  # at most one photo's files in flight: memory stays one result more
            pending = (i, photo, result, pool.submit(write_outputs, result, *job))
        if pending is not None:
            written(*pending)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # Ctrl-C or SIGTERM: the photo being written is finished whole
    n_ok = sum(r["ok"] for r in reports)
    if len(photos) > 1 and not args.quiet:
        print(
            f"{n_ok} of {len(photos)} photos reconstructed, {len(photos) - n_ok} failed; "
            f"outputs in {out_dir}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"ok": n_ok, "failed": len(photos) - n_ok, "results": reports}))
    return 0 if n_ok == len(photos) else 3 if internal else 1


def cmd_demo(args) -> int:
    import skimage.data  # the demo photo's package; nothing else needs scikit-image

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    photo = out / "astronaut.png"
    cv2.imwrite(str(photo), skimage.data.astronaut()[:, :, ::-1])
    ns = argparse.Namespace(
        photos=[str(photo)],
        output=str(out),
        format="obj,glb,ply,npz",
        face_index=None,
        no_refine=args.no_refine,
        texture_size=1024,
        no_extras=False,
        threads=0,
        json=False,
        quiet=False,
    )
    return cmd_reconstruct(ns)


def cmd_fetch_assets(args) -> int:
    n = fetch_assets(include_optional=args.optional, progress=lambda m: print(m, file=sys.stderr))
    try:  # every derived file now (dlib's arrays, the dense basis: ~10 s once), so the first photo need not
        from .core.pipeline import Reconstructor  # the models: only for this command and reconstruct

        Reconstructor().load_models()
    except Exception as exc:  # noqa: BLE001 - the assets are ready all the same; the run will say more
        print(f"note: the models are not prepared yet ({exc})", file=sys.stderr)
    print(f"assets ready in {cache_dir()} ({n} fetched now)")
    return 0


def _checkout_module(command: str):
    """The module of a checkout-only command (build_parser has checked that its package is present)."""
    return importlib.import_module(CHECKOUT_COMMANDS[command][0])  # optional package: a checkout only


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The parser.  A checkout command's module (benchmarks, training: they import torch, ~1.7 s) is
    imported only when ``argv`` runs that command; the others are listed by name and help text."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    chosen = words[0] if words else None
    p = _Parser(
        prog="python -m fg3d_blender",
        description="One photo of a face → a textured, editable 3D face mesh (FGNet).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reconstruct", help="photos or folders → textured face meshes")
    r.add_argument("photos", nargs="+", metavar="PHOTO")
    r.add_argument("-o", "--output", required=True, metavar="DIR")
    r.add_argument(
        "--format",
        default="obj,glb",
        help="comma list of obj,glb,ply,npz,blend (default obj,glb; blend needs bpy)",
    )
    r.add_argument(
        "--face-index", type=_int_in(0, 999), default=None, metavar="N", help="0 = largest face (default)"
    )
    r.add_argument("--no-refine", action="store_true", help="skip the FGNet refinement (coarse 3DMM only)")
    r.add_argument(
        "--texture-size",
        type=_int_in(min(TEXTURE_SIZES), max(TEXTURE_SIZES), TEXTURE_SIZES),
        default=1024,
        metavar="|".join(map(str, TEXTURE_SIZES)),
        help="texture width and height in pixels (default 1024)",
    )
    r.add_argument("--no-extras", action="store_true", help="skip the depth, PNCC and preview PNGs")
    r.add_argument(
        "--threads",
        type=_int_in(0, 256),
        default=0,
        metavar="N",
        help="CPU threads for every stage (default 0 = automatic: one, the fastest measured)",
    )
    r.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_reconstruct)
    d = sub.add_parser("demo", help="reconstruct the public-domain astronaut photo (scikit-image) into DIR")
    d.add_argument("-o", "--output", default="out", metavar="DIR")
    d.add_argument("--no-refine", action="store_true")
    d.set_defaults(func=cmd_demo)
    f = sub.add_parser("fetch-assets", help="download (or copy from $FG3D_ASSET_MIRROR) the model files")
    f.add_argument("--optional", action="store_true", help="also the optional Surrey Face Model files")
    f.set_defaults(func=cmd_fetch_assets)
    for command, (name, text) in CHECKOUT_COMMANDS.items():
        if importlib.util.find_spec(name.split(".")[0]) is None:  # the add-on zip: not there
            continue
        c = sub.add_parser(command, help=text)
        if command == chosen:
            module = _checkout_module(command)
            module.add_arguments(c)
            c.set_defaults(func=module.run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser(argv).parse_args(argv)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding host): its own handler stays
        pass
    try:
        return args.func(args)
    except FG3DError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except _Terminated:
        _err("terminated")
        return 143
    except Exception as exc:  # noqa: BLE001 - users get one line; FG3D_DEBUG=1 shows the traceback
        if os.environ.get("FG3D_DEBUG"):
            raise
        _err(_internal(exc))
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
