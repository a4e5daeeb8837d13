"""Stage 1 — load a photo into 8-bit BGR, whatever the file holds.

JPEG: EXIF orientation is applied and a truncated file is refused.  Other formats: 16-bit → 8-bit,
grayscale → BGR, alpha composited over white.  Photos up to ``MAX_PIXELS`` are accepted; detection
works on a downscaled copy (see ``detect``) while the texture is sampled from full resolution.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from .errors import FG3DError

MAX_PIXELS = 150_000_000  # 12 000 × 12 000 fits; larger photos are refused with a clear line
MIN_SIDE = 16


def load_image(source: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
    """Return a C-contiguous uint8 BGR image (h, w, 3).  Accepts a path or an array (BGR/gray/BGRA)."""
    if isinstance(source, np.ndarray):
        return to_bgr8(source, "array")
    path = Path(source)
    if not path.exists():
        raise FG3DError(f"{path}: no such file")
    if path.is_dir():
        raise FG3DError(f"{path}: is a directory, not a photo")
    data = np.fromfile(str(path), dtype=np.uint8)  # works for non-ASCII paths on every platform
    if data.size == 0:
        raise FG3DError(f"{path}: the file is empty")
    is_jpeg = data.size > 3 and data[0] == 0xFF and data[1] == 0xD8
    if is_jpeg and not _jpeg_complete(data):
        raise FG3DError(f"{path}: the JPEG is truncated (no end-of-image marker)")
    _check_header_size(data, path)
    flags = cv2.IMREAD_COLOR if is_jpeg else cv2.IMREAD_UNCHANGED
    img = cv2.imdecode(data, flags)
    if img is None:
        raise FG3DError(f"{path}: not a readable image (JPEG, PNG, BMP, TIFF, WebP …)")
    return to_bgr8(img, str(path))


def _jpeg_complete(data: np.ndarray) -> bool:
    tail = data[-4096:].tobytes()
    return b"\xff\xd9" in tail


def _check_header_size(data: np.ndarray, path: Path) -> None:
    """Refuse absurdly large images before decoding them (PNG and JPEG headers are read)."""
    head = data[:65536].tobytes()
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
                h, w = int.from_bytes(head[i + 5:i + 7], "big"), int.from_bytes(head[i + 7:i + 9], "big")
                break
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            i += 2 + int.from_bytes(head[i + 2:i + 4], "big")
    if w * h > MAX_PIXELS:
        raise FG3DError(f"{path}: {w}×{h} is larger than the {MAX_PIXELS // 1_000_000} MP limit; "
                        "downscale the photo first")


def to_bgr8(img: np.ndarray, name: str = "image") -> np.ndarray:
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise FG3DError(f"{name}: unsupported image layout {img.shape}")
    if img.shape[0] < MIN_SIDE or img.shape[1] < MIN_SIDE:
        raise FG3DError(f"{name}: {img.shape[1]}×{img.shape[0]} is too small to hold a face "
                        f"(at least {MIN_SIDE}×{MIN_SIDE}, better 200×200)")
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
