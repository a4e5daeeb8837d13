"""Stage 1 — load a photo into 8-bit BGR, whatever the file holds.

Before a file is read it must be a regular file (a FIFO named ``x.jpg`` would block forever, a link to
``/dev/zero`` never end) of at most ``MAX_FILE_BYTES``, in one of the supported formats by its magic
bytes, and its header (``image_header``, read in small pieces) must declare at most ``MAX_PIXELS`` and an
aspect ratio of at most ``MAX_ASPECT``, and no more data than the file holds.  So a refused file costs
a few kB of memory, whatever it claims.
JPEG: EXIF orientation is applied; a truncated file (or one whose data ends early) is refused, while
data appended after the end-of-image marker (phone "motion photos") is ignored.  Other formats:
16-bit → 8-bit, float [0, 1] → 8-bit, grayscale → BGR, alpha composited over white.  The C decoders'
own messages (libjpeg, libpng print them on stderr) and OpenCV's exceptions are captured, so a bad file
gives one clear line and nothing else.  Detection works on a downscaled copy (see ``detect``) while the
texture is sampled from full resolution.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, List, Tuple, Union

import cv2
import numpy as np

from .errors import FG3DError
from .image_header import read_header

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}  # what a folder of photos holds
MAX_PIXELS = 150_000_000  # 12 000 × 12 000 fits; larger photos are refused with a clear line
MAX_FILE_BYTES = 1_250_000_000  # a 150 MP photo in any layout read here (16-bit RGBA TIFF: 1.2 GB) fits
MAX_ASPECT = 20  # long side / short side: panoramas reach ~10; thin strips crash dlib's CNN detector
MIN_SIDE = 16


def list_photos(folder: Union[str, os.PathLike]) -> List[Path]:
    """The entries of a folder named like images (by suffix, ``IMAGE_EXTS``), sorted by name.  Folders
    are skipped; anything else named ``*.jpg`` (a FIFO, a broken link …) is listed, so that loading it
    says what is wrong instead of it being silently left out."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError as exc:
        raise FG3DError(_os_error(Path(folder), exc, "cannot be listed")) from None
    return sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTS and not _is_dir(p))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, no permission …: loading it says so
        return False


def load_image(source: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
    """Return a C-contiguous uint8 BGR image (h, w, 3).  Accepts a path or an array (BGR/gray/BGRA)."""
    if isinstance(source, np.ndarray):
        return to_bgr8(source, "array")
    path = Path(source)
    with _open_photo(path) as (f, size):
        header = read_header(f, size, str(path))
        _check_shape(*header.largest, str(path), aspect=False)  # e.g. a TIFF's larger second page
        _check_shape(header.width, header.height, str(path))
        if header.truncated:
            raise FG3DError(
                f"{path}: not a readable image, the {header.format} is truncated ({header.truncated})"
            )
        data = _read_all(f, size, path)
    is_jpeg = header.format == "JPEG"
    flags = cv2.IMREAD_COLOR if header.as_color else cv2.IMREAD_UNCHANGED
    img, messages = _decode(data, flags)
    if img is None:
        if is_jpeg and b"\xff\xd9" not in data.tobytes():
            raise FG3DError(f"{path}: the JPEG is truncated (no end-of-image marker)")
        detail = f": {messages[0]}" if messages else ""
        raise FG3DError(f"{path}: not a readable image (the {header.format} decoder refused it{detail})")
    if is_jpeg:
        early = [m for m in messages if "premature end" in m.lower()]
        if early:
            raise FG3DError(f"{path}: the JPEG is truncated or damaged ({early[0]})")
    return to_bgr8(img, str(path))


def _os_error(path: Path, exc: OSError, doing: str = "cannot be read") -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"{path}: no such file"
    if exc.errno == errno.ENAMETOOLONG:
        return f"{path}: the path is too long (a name over 255 bytes, or the path over the system's limit)"
    if exc.errno == errno.ELOOP:
        return f"{path}: too many levels of symbolic links (a link loop?)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: {doing}: permission denied"
    return f"{path}: {doing} ({exc.strerror or exc})"


def _check_file(st: os.stat_result, path: Path) -> None:
    """Refuse what is not a regular file of plausible size, before a byte of it is read."""
    if stat.S_ISDIR(st.st_mode):
        raise FG3DError(f"{path}: is a directory, not a photo")
    if not stat.S_ISREG(st.st_mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
        what = kind.get(stat.S_IFMT(st.st_mode), "a socket or other special file")
        raise FG3DError(f"{path}: is {what}, not a regular file; photos must be files")
    if st.st_size == 0:
        raise FG3DError(f"{path}: the file is empty")
    if st.st_size > MAX_FILE_BYTES:
        raise FG3DError(
            f"{path}: {st.st_size / 1e9:.1f} GB is larger than any photo read here "
            f"({MAX_FILE_BYTES / 1e9:.2f} GB limit)"
        )


@contextmanager
def _open_photo(path: Path) -> Iterator[Tuple[BinaryIO, int]]:
    """(open file, size) of a regular file: checked by ``os.stat`` before opening, and again by ``fstat``
    after (opened non-blocking, so a FIFO swapped in between cannot hang the open)."""
    try:
        _check_file(os.stat(path), path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise FG3DError(_os_error(path, exc)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _check_file(st, path)
        try:
            yield f, st.st_size
        except OSError as exc:
            raise FG3DError(_os_error(path, exc)) from None


def _read_all(f: BinaryIO, size: int, path: Path) -> np.ndarray:
    """The whole file into one uint8 array (no intermediate copy)."""
    data = np.empty(size, np.uint8)
    f.seek(0)
    n = f.readinto(memoryview(data))
    if n != size:
        raise FG3DError(f"{path}: cannot be read (it changed size while being read)")
    return data


_decode_lock = threading.Lock()
# What OpenCV puts around its messages: the log prefix ("[ WARN:0@0.3] global file.cpp:12 function ") and
# a cv::Exception's ("OpenCV(4.11.0) /path/file.cpp:59: error: (-2:Unspecified error) ").
_CV_NOISE = re.compile(
    r"\[\s*[A-Z]+:\d+@[\d.]+\]\s*global\s+\S+\s+\S+\s+"
    r"|OpenCV\([\d.]+\)\s+\S+:\d+:\s*error:\s*\(-?\d+:[^)]*\)\s*"
)


def _clean(message: str) -> str:
    return " ".join(_CV_NOISE.sub("", message).split())


def _decode(data: np.ndarray, flags: int) -> Tuple[object, List[str]]:
    """``cv2.imdecode`` with whatever the C decoders print on stderr captured and returned as lines (and
    a ``cv2.error`` returned as the message of a failed decode)."""
    with _decode_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable stderr (some GUI hosts): decode without capturing
            return _imdecode(data, flags)
        with tempfile.TemporaryFile() as cap:
            try:
                os.dup2(cap.fileno(), 2)
                img, errors = _imdecode(data, flags)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            cap.seek(0)
            text = cap.read().decode("utf-8", "replace")
    lines = [_clean(line) for line in text.splitlines()]
    return img, errors + [line for line in lines if line]


def _imdecode(data: np.ndarray, flags: int) -> Tuple[object, List[str]]:
    try:
        return cv2.imdecode(data, flags), []
    except cv2.error as exc:  # e.g. OPENCV_IO_MAX_IMAGE_PIXELS set lower than our limit
        return None, [_clean(str(exc))]


def _check_shape(w: int, h: int, name: str, aspect: bool = True) -> None:
    """Refuse sizes over ``MAX_PIXELS`` and aspect ratios over ``MAX_ASPECT`` (no photo of a face)."""
    if w * h > MAX_PIXELS:
        raise FG3DError(
            f"{name}: {w}×{h} is larger than the {MAX_PIXELS // 1_000_000} MP limit; "
            "downscale the photo first"
        )
    if aspect and max(w, h) > MAX_ASPECT * min(w, h):
        raise FG3DError(
            f"{name}: {w}×{h} is a strip, not a photo of a face "
            f"(the long side is more than {MAX_ASPECT}× the short side)"
        )


def to_bgr8(img: np.ndarray, name: str = "image") -> np.ndarray:
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise FG3DError(f"{name}: unsupported image layout {img.shape}")
    if img.shape[0] < MIN_SIDE or img.shape[1] < MIN_SIDE:
        raise FG3DError(
            f"{name}: {img.shape[1]}×{img.shape[0]} is too small to hold a face "
            f"(at least {MIN_SIDE}×{MIN_SIDE}, better 200×200)"
        )
    _check_shape(img.shape[1], img.shape[0], name)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype.kind == "f":
        img = _float_to_8bit(img)
    elif img.dtype != np.uint8:
        raise FG3DError(f"{name}: unsupported pixel type {img.dtype}")
    c = img.shape[2]
    if c == 1:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif c == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(img)


def _float_to_8bit(img: np.ndarray) -> np.ndarray:
    """Float pixels are taken as [0, 1], the convention of float TIFF/EXR, unless more than 1 % of them
    (in a sample) exceed 2: then as 0–255.  Not the maximum: a lossy float TIFF (OpenCV writes LogLuv)
    overshoots 1.0 by a few %, and HDR highlights go far beyond; either made the photo black.  Values
    outside the range are clipped, NaN is black; the result is rounded, not truncated."""
    step = max(1, img.shape[0] // 512), max(1, img.shape[1] // 512)
    sample = img[:: step[0], :: step[1]]
    sample = sample[np.isfinite(sample)]
    scale = 255.0 if not sample.size or float(np.percentile(sample, 99)) <= 2.0 else 1.0
    out = img.astype(np.float32)  # one copy, worked on in place
    np.nan_to_num(out, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    out *= scale
    np.clip(out, 0, 255, out=out)
    return np.rint(out, out=out).astype(np.uint8)
