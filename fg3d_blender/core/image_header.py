"""Image headers, read from an open file in small pieces before any pixel data is read.

``read_header(f, size, name)`` names the format by its magic bytes (JPEG, PNG, BMP, TIFF, WebP; anything
else is refused) and returns a ``Header``: the size of the image the decoder will produce, the largest
size any part of the file declares, and what is missing when the file is shorter than its own structure
says (a PNG without IEND, BMP pixel rows or TIFF strips past the end, a WebP shorter than its RIFF size).
One reader per format; each seeks and reads a few bytes at a time (at most a TIFF's strip table), so a
header is checked in bounded memory whatever the file claims.  A header that cannot be parsed (cut
short, a zero or negative size, a marker missing) raises the one-line ``FG3DError``.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, NamedTuple, Optional, Tuple

import numpy as np

from .errors import FG3DError

FORMATS = "JPEG, PNG, BMP, TIFF or WebP"
MAX_PNG_CHUNKS = 1_000_000  # a 1 GB PNG in libpng's 8 kB IDAT chunks has 130 000
MAX_JPEG_SEGMENTS = 10_000  # before the frame header: EXIF, ICC, XMP, MPF … are a few dozen
MAX_TIFF_PAGES = 64  # IFDs followed along the chain
MAX_TIFF_STRIPS = 4_000_000  # strips or tiles of the first page (a 150 MP image in 16×16 tiles: 590 000)
MAX_WEBP_CHUNKS = 64  # chunks before the image data (VP8X, ICCP, ANIM, EXIF …)

# Formats OpenCV would decode (with no size guard) or that photos are often mistaken for: named in the
# refusal.
_OTHER_MAGIC = [
    (b"v/1\x01", "an OpenEXR image"),
    (b"#?RADIANCE", "a Radiance HDR image"),
    (b"#?RGBE", "a Radiance HDR image"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"GIF8", "a GIF"),
    (b"Y\xa6j\x95", "a Sun raster image"),
    (b"8BPS", "a Photoshop document"),
    (b"%PDF", "a PDF document"),
]


class Header(NamedTuple):
    format: str  # "JPEG", "PNG", "BMP", "TIFF" or "WebP"
    width: int  # of the image the decoder produces (a TIFF's first page)
    height: int
    largest: Tuple[int, int]  # (width, height) of the largest image declared anywhere in the file
    truncated: str = ""  # what is missing when the file ends early ("" when it is complete)
    as_color: bool = False  # decode as 8-bit colour, not as stored (see ``image_io.load_image``)


class _Damaged(Exception):
    """A header that cannot be parsed; the message says what is wrong."""


class _CutShort(_Damaged):
    """A header structure (or what it points to) runs past the end of the file."""


class _Unsupported(Exception):
    """A valid file that the decoder would get wrong; the message says what to do."""


def sniff(head: bytes) -> Optional[str]:
    """The format of a file from its first 12 bytes (magic numbers), or None."""
    if head[:2] == b"\xff\xd8":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _other_format(head: bytes) -> str:
    for magic, what in _OTHER_MAGIC:
        if head.startswith(magic):
            return what
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"heim"):
        return "a HEIF/AVIF image"
    if head[:1] == b"P" and head[1:2] in b"1234567fF" and head[2:3] in (b"\n", b"\r", b" ", b"\t"):
        return "a Netpbm/PFM image"
    return ""


def read_header(f: BinaryIO, size: int, name: str) -> Header:
    """The ``Header`` of the open file ``f`` of ``size`` bytes; refuses unsupported or damaged files."""
    f.seek(0)
    head = f.read(16)
    fmt = sniff(head)
    if fmt is None:
        what = _other_format(head)
        what = f"{what}, which is not supported" if what else "unknown format"
        raise FG3DError(f"{name}: not a readable image ({what}; photos must be {FORMATS})")
    try:
        return _READERS[fmt](f, size)
    except _CutShort as exc:
        raise FG3DError(f"{name}: not a readable image, the {fmt} is truncated or damaged ({exc})") from None
    except _Damaged as exc:
        raise FG3DError(f"{name}: not a readable image (the {fmt} header is damaged: {exc})") from None
    except _Unsupported as exc:
        raise FG3DError(f"{name}: not a readable image ({exc})") from None


def _read(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) < n:
        raise _CutShort(f"its header reaches byte {offset + n}, past the end of the file")
    return data


def _positive(w: int, h: int) -> Tuple[int, int]:
    if w <= 0 or h <= 0:
        raise _Damaged(f"it declares a {w}×{h} image")
    return w, h


def png_header(f: BinaryIO, size: int) -> Header:
    """IHDR's size, then a walk over the chunks (lengths and types only) that must reach IEND."""
    length, kind, w, h = struct.unpack(">I4sii", _read(f, 8, 16))
    if kind != b"IHDR" or length != 13:
        raise _Damaged("the first chunk is not IHDR")
    w, h = _positive(w, h)
    pos, truncated = 8, ""
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 12 > size:
            truncated = "it ends before the IEND chunk"
            break
        length, kind = struct.unpack(">I4s", _read(f, pos, 8))
        if length > 0x7FFFFFFF:
            raise _Damaged(f"a chunk at byte {pos} declares {length} bytes")
        if kind == b"IEND":
            break
        if pos + 12 + length > size:
            truncated = f"the {kind.decode('latin-1')!r} chunk at byte {pos} runs past the end of the file"
            break
        pos += 12 + length
    else:
        raise _Damaged(f"more than {MAX_PNG_CHUNKS} chunks")
    return Header("PNG", w, h, (w, h), truncated)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _next_marker(f: BinaryIO, pos: int, size: int) -> Tuple[int, int]:
    """(marker code, position after it) of the next JPEG marker at or after ``pos``.  Like libjpeg, bytes
    that are not 0xFF before a marker and 0xFF fill bytes are skipped; the scan reads 64 kB blocks."""
    after_ff = False
    while pos < size:
        f.seek(pos)
        block = f.read(1 << 16)
        if not block:
            break
        if not after_ff:
            i = block.find(b"\xff")
            if i < 0:
                pos += len(block)
                continue
            block, pos, after_ff = block[i + 1 :], pos + i + 1, True
        rest = block.lstrip(b"\xff")
        pos += len(block) - len(rest)
        if rest:
            if rest[0] == 0:  # a stuffed zero byte, not a marker
                after_ff, pos = False, pos + 1
                continue
            return rest[0], pos + 1
    raise _Damaged("the file ends before the frame header (SOF)")


def jpeg_header(f: BinaryIO, size: int) -> Header:
    """The frame header's size: every segment is walked (by its length, with seeks) until SOFn, however
    much metadata comes first.  The end of the data is checked after decoding (see ``image_io``)."""
    pos = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        marker, pos = _next_marker(f, pos, size)
        if marker in _SOF:
            h, w = struct.unpack(">3xHH", _read(f, pos, 7))  # length (2), precision (1), height, width
            w, h = _positive(w, h)
            return Header("JPEG", w, h, (w, h), as_color=True)  # colour decoding applies EXIF orientation
        if marker in (0xDA, 0xD9):
            raise _Damaged("the image data starts before any frame header (SOF)")
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        (length,) = struct.unpack(">H", _read(f, pos, 2))
        if length < 2:
            raise _Damaged(f"a segment at byte {pos} declares {length} bytes")
        pos += length
    raise _Damaged(f"more than {MAX_JPEG_SEGMENTS} segments before the frame header")


_TIFF_TYPES = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8 (BigTIFF)


def tiff_header(f: BinaryIO, size: int) -> Header:
    """ImageWidth and ImageLength of every IFD along the chain (at most ``MAX_TIFF_PAGES``; classic and
    BigTIFF, either byte order, SHORT or LONG values), and the first page's strips or tiles checked to
    lie inside the file."""
    head = _read(f, 0, 16)
    e = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\0", b"\0+")
    if big:
        bytesize, _, ifd = struct.unpack_from(e + "HHQ", head, 4)
        if bytesize != 8:
            raise _Damaged(f"BigTIFF offsets of {bytesize} bytes")
    else:
        (ifd,) = struct.unpack_from(e + "I", head, 4)
    count_fmt, entry_fmt, entry_len, field = ("Q", "HHQ", 20, 8) if big else ("H", "HHI", 12, 4)
    pages, seen, truncated = [], set(), ""
    while ifd and ifd not in seen and len(pages) < MAX_TIFF_PAGES:
        seen.add(ifd)
        count_len = struct.calcsize(count_fmt)
        (n,) = struct.unpack(e + count_fmt, _read(f, ifd, count_len))
        if not 0 < n <= 65535:
            raise _Damaged(f"an IFD at byte {ifd} with {n} entries")
        raw = _read(f, ifd + count_len, n * entry_len + field)
        tags = {}
        for k in range(n):
            tag, typ, count = struct.unpack_from(e + entry_fmt, raw, k * entry_len)
            value = raw[k * entry_len + entry_len - field : (k + 1) * entry_len]
            tags[tag] = (typ, count, value)
        w, h = (_tiff_scalar(e, tags.get(t), name) for t, name in ((256, "ImageWidth"), (257, "ImageLength")))
        pages.append(_positive(w, h))
        if len(pages) == 1:
            _tiff_check_planar(f, e, big, tags, size)
            truncated = _tiff_data_missing(f, e, big, tags, size)
        (ifd,) = struct.unpack(e + ("Q" if big else "I"), raw[-field:])
    if not pages:
        raise _Damaged("no image directory (IFD)")
    w, h = pages[0]
    return Header("TIFF", w, h, max(pages, key=lambda p: p[0] * p[1]), truncated)


def _tiff_scalar(e: str, entry, name: str) -> int:
    if entry is None:
        raise _Damaged(f"no {name}")
    typ, count, value = entry
    if typ not in _TIFF_TYPES or count != 1:
        raise _Damaged(f"{name} of type {typ} and count {count}")
    return struct.unpack_from(e + _TIFF_TYPES[typ], value)[0]


def _tiff_array(f: BinaryIO, e: str, big: bool, entry, size: int) -> Optional[np.ndarray]:
    """The values of a SHORT/LONG/LONG8 array tag as uint64, or None where they lie outside the file."""
    typ, count, value = entry
    if typ not in _TIFF_TYPES or not 0 < count <= MAX_TIFF_STRIPS:
        raise _Damaged(f"a table of type {typ} and count {count}")
    item = struct.calcsize(_TIFF_TYPES[typ])
    dtype = np.dtype(e + {2: "u2", 4: "u4", 8: "u8"}[item])
    if count * item <= len(value):
        raw = value[: count * item]
    else:
        (offset,) = struct.unpack(e + ("Q" if big else "I"), value)
        if offset + count * item > size:
            return None
        raw = _read(f, offset, count * item)
    return np.frombuffer(raw, dtype).astype(np.uint64)


def _tiff_check_planar(f: BinaryIO, e: str, big: bool, tags: dict, size: int) -> None:
    """OpenCV 4.11 decodes planar (PlanarConfiguration 2) 16-bit and float TIFFs into garbage."""
    if 284 not in tags or _tiff_scalar(e, tags[284], "PlanarConfiguration") != 2 or 258 not in tags:
        return
    bits = _tiff_array(f, e, big, tags[258], size)
    if bits is not None and len(bits) > 1 and int(bits.max()) > 8:
        raise _Unsupported(
            f"a TIFF of {int(bits.max())}-bit samples in separate planes, which OpenCV decodes wrongly; "
            "save it with contiguous (chunky) samples"
        )


def _tiff_data_missing(f: BinaryIO, e: str, big: bool, tags: dict, size: int) -> str:
    for off_tag, len_tag, what in ((273, 279, "strip"), (324, 325, "tile")):
        if off_tag not in tags:
            continue
        offsets = _tiff_array(f, e, big, tags[off_tag], size)
        if offsets is None:
            return f"its {what} table lies past the end of the file"
        counts = _tiff_array(f, e, big, tags[len_tag], size) if len_tag in tags else None
        if len_tag in tags and counts is None:
            return f"its {what} byte counts lie past the end of the file"
        if counts is None or counts.shape != offsets.shape:
            return ""  # libtiff estimates missing counts; nothing to compare
        if max(int(offsets.max()), int(counts.max())) > size:
            return f"its {what}s lie past the end of the file, at {size} bytes"
        need = int((offsets + counts).max())  # both at most the file size: no overflow
        return f"its {what}s need {need} bytes, the file has {size}" if need > size else ""
    raise _Damaged("no StripOffsets or TileOffsets")


def webp_header(f: BinaryIO, size: int) -> Header:
    """The size in the VP8 (lossy), VP8L (lossless) or VP8X (extended: canvas) chunk."""
    (riff,) = struct.unpack("<I", _read(f, 4, 4))
    truncated = "" if riff + 8 <= size else f"the RIFF header declares {riff + 8} bytes, the file has {size}"
    pos, canvas, frame = 12, None, None
    for _ in range(MAX_WEBP_CHUNKS):
        kind, length = struct.unpack("<4sI", _read(f, pos, 8))
        body = pos + 8
        if kind == b"VP8X":
            b = _read(f, body, 10)
            canvas = _positive(1 + int.from_bytes(b[4:7], "little"), 1 + int.from_bytes(b[7:10], "little"))
            if b[0] & 0x02:  # animation: frames (ANMF) are drawn on the canvas
                break
        elif kind == b"VP8 ":
            b = _read(f, body, 10)
            if b[0] & 1 or b[3:6] != b"\x9d\x01\x2a":
                raise _Damaged("the VP8 chunk does not start with a key frame")
            w, h = struct.unpack("<HH", b[6:10])
            frame = _positive(w & 0x3FFF, h & 0x3FFF)
        elif kind == b"VP8L":
            b = _read(f, body, 5)
            if b[0] != 0x2F:
                raise _Damaged("the VP8L chunk has no signature")
            bits = int.from_bytes(b[1:5], "little")
            frame = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif canvas is None:
            raise _Damaged(f"the first chunk is {kind!r}, not VP8, VP8L or VP8X")
        if frame is not None:
            if body + length > size and not truncated:
                truncated = f"the image data needs {body + length} bytes, the file has {size}"
            break
        pos = body + length + (length & 1)
    else:
        raise _Damaged(f"no image data in the first {MAX_WEBP_CHUNKS} chunks")
    sizes = [s for s in (canvas, frame) if s is not None]
    w, h = sizes[0]
    return Header("WebP", w, h, max(sizes, key=lambda s: s[0] * s[1]), truncated)


def bmp_header(f: BinaryIO, size: int) -> Header:
    """BITMAPINFOHEADER (and its later versions) or the 12-byte OS/2 core header; a negative height is a
    top-down bitmap.  Uncompressed pixel rows (and RLE data, by its declared size) must fit in the file."""
    offset, header_size = struct.unpack("<10xII", _read(f, 0, 18))
    if header_size == 12:
        w, h, _, bpp = struct.unpack("<HHHH", _read(f, 18, 8))
        compression, image_size = 0, 0
    elif header_size >= 40:
        w, h, _, bpp, compression, image_size = struct.unpack("<iiHHII", _read(f, 18, 20))
    else:
        raise _Damaged(f"a DIB header of {header_size} bytes")
    w, h = _positive(w, abs(h) if h != -(2**31) else 0)
    if compression in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS: rows of known length
        need = offset + (w * bpp + 31) // 32 * 4 * h
    else:  # run-length or embedded JPEG/PNG: only the declared data size is known
        need = offset + image_size
    truncated = "" if need <= size else f"the pixel data needs {need} bytes, the file has {size}"
    # OpenCV reads a 24-bit OS/2 (core header) bitmap as gray unless asked for colour
    return Header("BMP", w, h, (w, h), truncated, as_color=header_size == 12)


_READERS = {
    "JPEG": jpeg_header,
    "PNG": png_header,
    "BMP": bmp_header,
    "TIFF": tiff_header,
    "WebP": webp_header,
}
