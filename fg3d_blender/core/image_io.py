"""Stage 1 — load a photo into 8-bit BGR, whatever the file holds.

JPEG: EXIF orientation is applied; a truncated file (or one whose data ends early) is refused, while
data appended after the end-of-image marker (phone "motion photos") is ignored.  Other formats:
16-bit → 8-bit, grayscale → BGR, alpha composited over white.  The C decoders' own messages (libjpeg,
libpng print them on stderr) are captured, so a bad file gives one clear line and nothing else.
Photos up to ``MAX_PIXELS`` are accepted; detection works on a downscaled copy (see ``detect``) while
the texture is sampled from full resolution.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import List, Tuple, Union

import cv2
import numpy as np

from .errors import FG3DError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}  # what a folder of photos holds
MAX_PIXELS = 150_000_000  # 12 000 × 12 000 fits; larger photos are refused with a clear line
MIN_SIDE = 16


def list_photos(folder: Union[str, os.PathLike]) -> List[Path]:
    """The image files of a folder (by suffix, ``IMAGE_EXTS``), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def load_image(source: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
    """Return a C-contiguous uint8 BGR image (h, w, 3).  Accepts a path or an array (BGR/gray/BGRA)."""
    if isinstance(source, np.ndarray):
        return to_bgr8(source, "array")
    path = Path(source)
    if not path.exists():
        raise FG3DError(f"{path}: no such file")
    if path.is_dir():
        raise FG3DError(f"{path}: is a directory, not a photo")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # works for non-ASCII paths on every platform
    except OSError as exc:
        raise FG3DError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise FG3DError(f"{path}: the file is empty")
    is_jpeg = data.size > 3 and data[0] == 0xFF and data[1] == 0xD8
    _check_header_size(data, path)
    flags = cv2.IMREAD_COLOR if is_jpeg else cv2.IMREAD_UNCHANGED
    img, messages = _decode(data, flags)
    if img is None:
        if is_jpeg and b"\xff\xd9" not in data.tobytes():
            raise FG3DError(f"{path}: the JPEG is truncated (no end-of-image marker)")
        detail = f" ({messages[0]})" if messages else ""
        raise FG3DError(f"{path}: not a readable image (JPEG, PNG, BMP, TIFF, WebP …){detail}")
    if is_jpeg:
        early = [m for m in messages if "premature end" in m.lower()]
        if early:
            raise FG3DError(f"{path}: the JPEG is truncated or damaged ({early[0]})")
    return to_bgr8(img, str(path))


_decode_lock = threading.Lock()


def _decode(data: np.ndarray, flags: int) -> Tuple[object, List[str]]:
    """``cv2.imdecode`` with whatever the C decoders print on stderr captured and returned as lines."""
    with _decode_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable stderr (some GUI hosts): decode without capturing
            return cv2.imdecode(data, flags), []
        with tempfile.TemporaryFile() as cap:
            try:
                os.dup2(cap.fileno(), 2)
                img = cv2.imdecode(data, flags)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            cap.seek(0)
            text = cap.read().decode("utf-8", "replace")
    return img, [line.strip() for line in text.splitlines() if line.strip()]


def _check_header_size(data: np.ndarray, path: Path) -> None:
    """Refuse absurdly large images before decoding them (PNG and JPEG headers are read)."""
    head = data[: 1 << 22].tobytes()  # JPEG APPn segments (EXIF, ICC, XMP) can push the SOF far in
    w = h = 0
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    elif head[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                i += 1
                continue
            marker = head[i + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = int.from_bytes(head[i + 5 : i + 7], "big"), int.from_bytes(head[i + 7 : i + 9], "big")
                break
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
    if w * h > MAX_PIXELS:
        raise FG3DError(
            f"{path}: {w}×{h} is larger than the {MAX_PIXELS // 1_000_000} MP limit; "
            "downscale the photo first"
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
    if img.shape[0] * img.shape[1] > MAX_PIXELS:
        raise FG3DError(f"{name}: larger than the {MAX_PIXELS // 1_000_000} MP limit; downscale it first")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise FG3DError(f"{name}: unsupported pixel type {img.dtype}")
    c = img.shape[2]
    if c == 1:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif c == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(img)
