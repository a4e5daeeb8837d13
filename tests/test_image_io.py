"""Loading photos from hostile files: every bad file is refused with one line, in bounded memory.

The files are real: small photos encoded by OpenCV, or files written byte by byte below (TIFF, BMP,
WebP containers), then cut, patched and mutated in ``tmp_path``.  Refusals of over-limit files are
measured in a subprocess that imports only ``fg3d_blender.core.image_io``: its peak RSS must stay under
``MEMORY_LIMIT_MB`` (before the header guard, the TIFF and JPEG below took 5.2 GB, the WebP 1.6 GB).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.image_header import read_header
from fg3d_blender.core.image_io import MAX_ASPECT, list_photos, load_image, to_bgr8

REPO = Path(__file__).resolve().parent.parent
MEMORY_LIMIT_MB = 300

# ---- writing image files byte by byte -------------------------------------------------------------


def encoded(img: np.ndarray, ext: str, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok, ext
    return buf.tobytes()


def patched(data: bytes, at: int, raw: bytes) -> bytes:
    return data[:at] + raw + data[at + len(raw) :]


TIFF_TYPES = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8 (BigTIFF)


def tiff_bytes(pages, big: bool = False, endian: str = "<") -> bytes:
    """A TIFF file (classic or BigTIFF, either byte order): strips first, then each page's IFD.  A page
    is a dict: ``width``, ``height``, ``strips`` (payloads, top to bottom) and optionally ``spp``
    (samples per pixel, 3), ``bps`` (bits per sample, 8), ``compression`` (1 none, 8 deflate),
    ``sample_format`` (1 uint, 3 float) and ``dims_type`` (3 SHORT or 4 LONG)."""
    field, off_code, cnt_code = (8, "Q", "Q") if big else (4, "I", "H")
    out = bytearray(16 if big else 8)
    ifds = []
    for page in pages:
        spp, strips = page.get("spp", 3), page["strips"]
        offsets = []
        for s in strips:
            offsets.append(len(out))
            out += s
        off_type = 16 if big else 4
        entries = [
            (256, page.get("dims_type", 4), [page["width"]]),
            (257, page.get("dims_type", 4), [page["height"]]),
            (258, 3, [page.get("bps", 8)] * spp),
            (259, 3, [page.get("compression", 1)]),
            (262, 3, [2 if spp >= 3 else 1]),
            (273, off_type, offsets),
            (277, 3, [spp]),
            (278, 4, [-(-page["height"] // len(strips))]),
            (279, off_type, [len(s) for s in strips]),
            (284, 3, [1]),
            (339, 3, [page.get("sample_format", 1)] * spp),
        ]
        if spp in (2, 4):
            entries.append((338, 3, [2]))  # ExtraSamples: unassociated alpha
        packed = []
        for tag, typ, values in sorted(entries):
            raw = struct.pack(f"{endian}{len(values)}{TIFF_TYPES[typ]}", *values)
            if len(raw) <= field:
                value = raw.ljust(field, b"\0")
            else:
                out += b"\0" * (len(out) % 2)
                value = struct.pack(endian + off_code, len(out))
                out += raw
            packed.append(struct.pack(endian + ("HHQ" if big else "HHI"), tag, typ, len(values)) + value)
        out += b"\0" * (len(out) % 2)
        ifds.append(len(out))
        out += struct.pack(endian + cnt_code, len(packed)) + b"".join(packed) + bytes(field)
    for here, nxt in zip(ifds, ifds[1:]):
        n = struct.unpack_from(endian + cnt_code, out, here)[0]
        at = here + struct.calcsize(cnt_code) + n * (20 if big else 12)
        out[at : at + field] = struct.pack(endian + off_code, nxt)
    magic = b"II" if endian == "<" else b"MM"
    if big:
        out[:16] = magic + struct.pack(endian + "HHHQ", 43, 8, 0, ifds[0])
    else:
        out[:8] = magic + struct.pack(endian + "HI", 42, ifds[0])
    return bytes(out)


def tiff_page(img: np.ndarray, rows_per_strip: int = 16, compression: int = 1) -> dict:
    """A page for ``tiff_bytes`` holding a real image (BGR or gray; uint8, uint16 or float32)."""
    rgb = img[:, :, ::-1] if img.ndim == 3 else img[:, :, None]
    h, w, spp = rgb.shape
    strips = [
        np.ascontiguousarray(rgb[y : y + rows_per_strip]).tobytes() for y in range(0, h, rows_per_strip)
    ]
    if compression == 8:
        strips = [zlib.compress(s, 6) for s in strips]
    return {
        "width": w,
        "height": h,
        "strips": strips,
        "spp": spp,
        "bps": img.dtype.itemsize * 8,
        "compression": compression,
        "sample_format": 3 if img.dtype.kind == "f" else 1,
    }


def deflate_strips(width: int, height: int, rows: int = 100) -> list:
    """Deflate strips of an all-black RGB image: deflate packs ~1000:1, so 30000² fits in 2.7 MB."""
    one = zlib.compress(bytes(width * 3 * rows), 9)
    return [one] * (-(-height // rows))


def bmp_bytes(img: np.ndarray, core: bool = False, top_down: bool = False) -> bytes:
    """A 24-bit uncompressed BMP: BITMAPINFOHEADER (40 bytes) or the OS/2 core header (12 bytes)."""
    h, w = img.shape[:2]
    stride = (w * 3 + 3) // 4 * 4
    rows = img if top_down else img[::-1]
    pixels = b"".join(np.ascontiguousarray(r).tobytes().ljust(stride, b"\0") for r in rows)
    if core:
        info = struct.pack("<IHHHH", 12, w, h, 1, 24)
    else:
        height = -h if top_down else h
        info = struct.pack("<IiiHHIIiiII", 40, w, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    off = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off) + info + pixels


def bmp_rle8_bytes(width: int, height: int, rle: bytes = b"\x00\x01") -> bytes:
    """An 8-bit run-length-encoded BMP (BI_RLE8): a grey palette and ``rle`` (default: end of bitmap
    at once, which the decoder fills with colour 0), so a few bytes can declare any size."""
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    off = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", off + len(rle), 0, 0, off) + info + palette + rle


def png_with_size(data: bytes, w: int, h: int) -> bytes:
    """A PNG with IHDR's width and height replaced (and its CRC recomputed, as a real writer would)."""
    data = patched(data, 16, struct.pack(">II", w & 0xFFFFFFFF, h & 0xFFFFFFFF))
    return patched(data, 29, struct.pack(">I", zlib.crc32(data[12:29])))


def webp_vp8x(canvas_w: int, canvas_h: int, simple: bytes) -> bytes:
    """A simple WebP's image chunk wrapped in an extended file (VP8X) declaring a canvas size."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4)
    vp8x += (canvas_w - 1).to_bytes(3, "little") + (canvas_h - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + simple[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def app_segments(total: int, marker: int = 0xE2) -> bytes:
    """APPn segments (ICC profiles, XMP, MPF … are such data) of about ``total`` bytes in all."""
    seg = bytes([0xFF, marker]) + struct.pack(">H", 65535) + bytes(65533)
    return seg * (total // len(seg))


# A real lossless WebP of 16383×16383 uniform grey: 10 308 bytes that decode to 805 MB.  Made with
# cv2.imencode(".webp", np.full((16383, 16383, 3), 128, np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101]),
# which takes 7 s and 2.4 GB, so it is stored here, zlib-compressed.
HUGE_WEBP = zlib.decompress(
    base64.b64decode(
        "eNrtxj0KgmAcwOEXCRrFpaEGP4c2VwdBkhIEhZcGG6OrdBGv4OZoHcG5QzhX9P7tGsJveXjOZVGke6Uup1w3Oqni/2MziL3WD2vTyS31"
        "D3fpX2Ewbp9RLXLdOb9WeaUROz+uPpm8p0HMFwAAAAAAAAAAAAAAAAAAAAAAAACWhKtmbIxMKw=="
    )
)
GREY = np.full((64, 64, 3), 128, np.uint8)


def _huge_deflate_tiff():
    page = {"width": 30000, "height": 30000, "strips": deflate_strips(30000, 30000), "compression": 8}
    return tiff_bytes([page])


def _huge_jpeg_behind_app():
    data = encoded(GREY, ".jpg")
    data = patched(data, data.index(b"\xff\xc0") + 5, struct.pack(">HH", 30000, 30000))
    return data[:2] + app_segments(4_200_000) + data[2:]


def _huge_webp_lossy():
    data = encoded(GREY, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 90])
    at = data.index(b"VP8 ") + 8 + 6  # frame tag (3 bytes), start code (3), then 14-bit width, height
    return patched(data, at, struct.pack("<HH", 16383, 16383))


def _huge_bigtiff_mm_short():
    strips = deflate_strips(30000, 30000, 1000)
    page = {"width": 30000, "height": 30000, "strips": strips, "compression": 8, "dims_type": 3}
    return tiff_bytes([page], big=True, endian=">")


def _huge_second_page():
    page = {"width": 30000, "height": 30000, "strips": deflate_strips(30000, 30000), "compression": 8}
    return tiff_bytes([tiff_page(GREY), page])


OVER_LIMIT = {  # file name → builder: each declares more than MAX_PIXELS in its header
    "deflate_30000x30000.tif": _huge_deflate_tiff,
    "bigtiff_mm_short_30000x30000.tif": _huge_bigtiff_mm_short,
    "second_page_30000x30000.tif": _huge_second_page,
    "app_segments_then_30000x30000.jpg": _huge_jpeg_behind_app,
    "ihdr_20000x20000.png": lambda: png_with_size(encoded(GREY, ".png"), 20000, 20000),
    "lossless_16383x16383.webp": lambda: HUGE_WEBP,
    "vp8_16383x16383.webp": _huge_webp_lossy,
    "vp8x_canvas_20000x20000.webp": lambda: webp_vp8x(20000, 20000, encoded(GREY, ".webp")),
    "info_20000x20000.bmp": lambda: patched(bmp_bytes(GREY), 18, struct.pack("<ii", 20000, 20000)),
    "rle8_20000x20000.bmp": lambda: bmp_rle8_bytes(20000, 20000),
    "core_30000x30000.bmp": lambda: patched(bmp_bytes(GREY, core=True), 18, struct.pack("<HH", 30000, 30000)),
}

LOADER = """
import json, resource, sys
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.image_io import load_image
out = {}
for p in sys.argv[1:]:
    try:
        img = load_image(p)
        out[p] = "loaded %dx%d" % img.shape[1::-1]
    except FG3DError as exc:
        out[p] = "FG3DError: " + str(exc)
    except BaseException as exc:
        out[p] = "%s: %s" % (type(exc).__name__, exc)
# VmHWM is this process's own peak: ru_maxrss would carry the parent's (pytest's) peak across fork + exec
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"results": out, "maxrss_mb": peak}))
"""


def load_in_subprocess(paths, timeout=120, env=None) -> dict:
    """``load_image`` on each path in a fresh interpreter that imports only the loader: ``results``
    (path → "loaded WxH" / "FG3DError: …" / "OtherError: …") and ``maxrss_mb``, its peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # the decoders' own messages are captured
    return json.loads(proc.stdout.strip().splitlines()[-1])


def refusal(path) -> str:
    """The one-line FG3DError that loading ``path`` raises, without the path (tmp_path holds the test's
    name: "truncated", "strip" … would match there)."""
    with pytest.raises(FG3DError) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg[len(str(path)) :]


@pytest.fixture(scope="module")
def photo(photos_dir) -> np.ndarray:
    return cv2.imread(str(photos_dir / "fg3d_examples" / "test.jpg"))


# ---- 1. the size guard reads every format's header, in bounded memory -----------------------------


def test_over_limit_headers_are_refused_before_decoding_in_bounded_memory(tmp_path):
    paths = []
    for name, build in OVER_LIMIT.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(build())
    assert 2_000_000 < paths[0].stat().st_size < 3_000_000  # the 2.7 MB deflate TIFF of the issue
    report = load_in_subprocess(paths)
    for p in paths:
        msg = report["results"][str(p)]
        size = p.stem.rsplit("_", 1)[-1]
        assert msg.startswith("FG3DError: ") and "MP limit" in msg and size.replace("x", "×") in msg, msg
    assert report["maxrss_mb"] < MEMORY_LIMIT_MB, report


def test_file_larger_than_any_photo_is_refused_before_reading(tmp_path):
    p = tmp_path / "sparse.jpg"  # a valid small JPEG, then 1.3 GB of (sparse) zeros after its end
    with open(p, "wb") as f:
        f.write(encoded(GREY, ".jpg"))
        f.truncate(1_300_000_000)
    report = load_in_subprocess([p])
    assert "GB limit" in report["results"][str(p)], report
    assert report["maxrss_mb"] < MEMORY_LIMIT_MB, report


def _valid_files(img: np.ndarray) -> dict:
    """Unusual but valid layouts of every format: all must load, equal to what OpenCV decodes."""
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    jpeg = encoded(img, ".jpg")
    lossy = encoded(img, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 90])
    return {
        "app_segments_4mb.jpg": jpeg[:2] + app_segments(4_200_000) + jpeg[2:],
        "fill_bytes.jpg": jpeg[:2] + b"\xff\xff\xff" + jpeg[2:],
        "plain.png": encoded(img, ".png"),
        "gray16.png": encoded(gray.astype(np.uint16) * 257, ".png"),
        "info.bmp": bmp_bytes(img),
        "top_down.bmp": bmp_bytes(img, top_down=True),
        "core.bmp": bmp_bytes(img, core=True),
        "opencv.bmp": encoded(img, ".bmp"),
        "opencv.tif": encoded(img, ".tif"),
        "classic_ii.tif": tiff_bytes([tiff_page(img)]),
        "classic_mm_short_deflate.tif": tiff_bytes(
            [dict(tiff_page(img, compression=8), dims_type=3)], endian=">"
        ),
        "bigtiff_ii.tif": tiff_bytes([tiff_page(img)], big=True),
        "bigtiff_mm.tif": tiff_bytes([tiff_page(gray)], big=True, endian=">"),
        "two_pages.tif": tiff_bytes([tiff_page(img), tiff_page(gray)]),
        "lossy.webp": lossy,
        "lossless.webp": encoded(img, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
        "extended.webp": webp_vp8x(img.shape[1], img.shape[0], lossy),
    }


def test_valid_layouts_of_every_format_load(tmp_path, photo):
    h, w = photo.shape[:2]
    for name, data in _valid_files(photo).items():
        p = tmp_path / name
        p.write_bytes(data)
        with open(p, "rb") as f:
            header = read_header(f, len(data), name)
        assert (header.width, header.height, header.truncated) == (w, h, ""), (name, header)
        expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(load_image(p), expected, err_msg=name)


# ---- unsupported formats ----------------------------------------------------------------------------


def real_exr() -> bytes:
    """A real OpenEXR file: OpenCV writes one only with its EXR codec enabled, at start-up."""
    code = (
        "import cv2, numpy as np, sys; ok, b = cv2.imencode('.exr', np.full((64, 64, 3), 0.5, np.float32));"
    )
    code += "sys.stdout.buffer.write(b.tobytes())"
    env = dict(os.environ, OPENCV_IO_ENABLE_OPENEXR="1")
    data = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    assert data[:4] == b"v/1\x01"
    return data


def test_other_formats_are_refused_by_their_magic(tmp_path, photo):
    f32 = photo.astype(np.float32) / 255
    files = {
        "openexr.jpg": real_exr(),  # the loader raised a raw cv2.error on it (OpenCV's codec is disabled)
        "portable.jpg": encoded(photo, ".ppm"),
        "pfm.png": encoded(f32, ".pfm"),
        "radiance.jpg": encoded(f32, ".hdr"),
        "jpeg2000.jpg": encoded(photo, ".jp2"),
        "sunraster.png": encoded(photo, ".ras"),
        "gif.jpg": b"GIF89a" + bytes(100),
        "iphone.jpg": struct.pack(">I", 24) + b"ftypheic" + bytes(100),
        "notes.png": b"this is not a photo\n",
    }
    for name, data in files.items():
        if name.endswith((".jpg", ".png")) and name not in (
            "openexr.jpg",
            "gif.jpg",
            "iphone.jpg",
            "notes.png",
        ):
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            assert img is not None, name  # OpenCV alone decodes them, with no size guard
        (tmp_path / name).write_bytes(data)
        msg = refusal(tmp_path / name)
        assert "not a readable image" in msg and "JPEG, PNG, BMP, TIFF or WebP" in msg, msg
    assert "OpenEXR" in refusal(tmp_path / "openexr.jpg")
    assert "HEIF" in refusal(tmp_path / "iphone.jpg")


# ---- 2./3. what is not a regular file, paths the system refuses ------------------------------------


@pytest.fixture
def special_files(tmp_path):
    d = tmp_path / "special"
    d.mkdir()
    os.mkfifo(d / "fifo.jpg")
    (d / "zero.jpg").symlink_to("/dev/zero")
    (d / "loop_a.jpg").symlink_to(d / "loop_b.jpg")
    (d / "loop_b.jpg").symlink_to(d / "loop_a.jpg")
    (d / "gone.png").symlink_to(d / "nothing_here.png")
    return d


def test_non_regular_files_and_bad_paths_give_one_line(special_files, tmp_path):
    d = special_files
    long_name = tmp_path / ("x" * 300 + ".jpg")
    long_path = tmp_path.joinpath(*["d" * 200] * 25, "photo.jpg")  # 5000 bytes: over PATH_MAX
    cases = {
        d / "fifo.jpg": "FIFO",  # opening it blocked forever
        d / "zero.jpg": "character device",  # read /dev/zero until memory ran out
        d / "loop_a.jpg": "symbolic links",
        d / "gone.png": "no such file",
        long_name: "too long",  # Path.exists() raised OSError (ENAMETOOLONG)
        long_path: "too long",
        tmp_path: "is a directory",
    }
    report = load_in_subprocess(list(cases), timeout=60)  # a subprocess: the FIFO used to hang
    for p, needle in cases.items():
        msg = report["results"][str(p)]
        assert msg.startswith("FG3DError: ") and needle in msg, msg
    # a folder lists them (a FIFO named *.jpg is reported, not silently skipped); only folders are left out
    (d / "sub.jpg").mkdir()
    assert [p.name for p in list_photos(d)] == [
        "fifo.jpg",
        "gone.png",
        "loop_a.jpg",
        "loop_b.jpg",
        "zero.jpg",
    ]


@pytest.mark.slow
def test_non_regular_files_and_bad_paths_through_the_cli(special_files, tmp_path, run_cli):
    out = tmp_path / "out"
    for p in (special_files / "fifo.jpg", tmp_path / ("x" * 300 + ".jpg")):
        proc = run_cli("reconstruct", p, "-o", out, timeout=60)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fg3d: error: ") and "internal" not in lines[0], lines
    proc = run_cli("reconstruct", special_files, "-o", out, "--json", "-q", timeout=60)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 5 and summary["ok"] == 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 5 and all(ln.startswith("fg3d: error: ") for ln in lines), lines
    assert not out.exists() or not list(out.iterdir())


# ---- 4. an exception from OpenCV's decoder ----------------------------------------------------------


def test_opencv_decoder_exception_gives_one_line(tmp_path):
    """OpenCV raises (not returns None) when an image is over its own limits: here set lower than ours."""
    p = tmp_path / "grey.png"
    p.write_bytes(encoded(GREY, ".png"))
    report = load_in_subprocess([p], env={"OPENCV_IO_MAX_IMAGE_PIXELS": "1000"})
    msg = report["results"][str(p)]
    assert msg.startswith("FG3DError: ") and "not a readable image" in msg and "OpenCV(" not in msg, msg


# ---- 5. float TIFF ---------------------------------------------------------------------------------


def test_float_tiff_of_a_face_loads_like_the_8bit_photo(tmp_path, photo):
    f32 = photo.astype(np.float32) / 255
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    exact = {
        "opencv_uncompressed.tif": (encoded(f32, ".tif", [cv2.IMWRITE_TIFF_COMPRESSION, 1]), photo),
        "contiguous_rgb.tif": (tiff_bytes([tiff_page(f32)]), photo),
        "deflate_rgb.tif": (tiff_bytes([tiff_page(f32, compression=8)]), photo),
        "gray.tif": (
            tiff_bytes([tiff_page(gray.astype(np.float32) / 255)]),
            cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR),
        ),
        "opencv_gray.tif": (
            encoded(gray.astype(np.float32) / 255, ".tif"),
            cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR),
        ),
    }
    for name, (data, expected) in exact.items():
        (tmp_path / name).write_bytes(data)
        img = load_image(tmp_path / name).astype(int)
        assert np.abs(img - expected).max() <= 1, name
    # cv2.imwrite's default for 3-channel float is SGILOG (LogLuv, lossy): values overshoot 1.0 by 2 %,
    # which made the loader take the photo for 0–255 and turn it black ("no face found")
    p = tmp_path / "opencv_default.tif"
    cv2.imwrite(str(p), f32)
    raw = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.float32 and raw.max() > 1.0
    err = np.abs(load_image(p).astype(int) - photo)
    assert err.mean() < 2 and err.max() <= 6, (err.mean(), err.max())


def test_float_arrays_are_scaled_by_their_range():
    img = np.linspace(0, 1, 64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
    np.testing.assert_array_equal(to_bgr8(img), np.rint(img * 255).astype(np.uint8))
    hdr = img.copy()
    hdr[0, :10] = 40.0  # bright highlights in a [0, 1] image
    assert (to_bgr8(hdr)[1:] == np.rint(img[1:] * 255)).all() and (to_bgr8(hdr)[0, :10] == 255).all()
    np.testing.assert_array_equal(to_bgr8(img * 255), np.rint(img * 255).astype(np.uint8))  # 0–255 floats
    nan = img.copy()
    nan[0, 0] = np.nan
    assert to_bgr8(nan)[0, 0].tolist() == [0, 0, 0]
    assert to_bgr8(img.astype(np.float16)).dtype == np.uint8


def test_tifffile_layouts_of_float_photos(tmp_path, photo):
    tifffile = pytest.importorskip("tifffile")  # scikit-image's dependency; the layouts other tools write
    rgb = photo[:, :, ::-1].astype(np.float32) / 255
    tifffile.imwrite(
        tmp_path / "planar.tif", np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate"
    )
    tifffile.imwrite(tmp_path / "tiles.tif", rgb, photometric="rgb", tile=(64, 64), compression="zlib")
    tifffile.imwrite(tmp_path / "f64.tif", rgb.astype(np.float64), photometric="rgb")
    for name in ("tiles.tif", "f64.tif"):
        assert np.abs(load_image(tmp_path / name).astype(int) - photo).max() <= 1, name
    # OpenCV decodes float (and 16-bit) samples stored in separate planes into garbage: refused
    assert "separate planes" in refusal(tmp_path / "planar.tif")


@pytest.mark.slow
def test_float_tiff_of_a_face_finds_the_face(tmp_path, photo):
    from fg3d_blender.core.detect import Detector  # dlib's models: only this test needs them

    p = tmp_path / "float.tif"
    cv2.imwrite(str(p), photo.astype(np.float32) / 255)
    det = Detector()
    faces, ref = det.faces(load_image(p)), det.faces(photo)
    assert len(faces) == len(ref) == 1
    assert np.abs(faces[0].landmarks - ref[0].landmarks).max() < 3


# ---- 6. absurd aspect ratios --------------------------------------------------------------------------


def strips(photo):
    """Real 16×2400 and 2400×16 strips (the photo squeezed), which crashed dlib's CNN detector."""
    return {
        "tall_16x2400.png": cv2.resize(photo, (16, 2400), interpolation=cv2.INTER_CUBIC),
        "wide_2400x16.png": cv2.resize(photo, (2400, 16), interpolation=cv2.INTER_AREA),
    }


def test_thin_strips_are_refused(tmp_path, photo):
    for name, img in strips(photo).items():
        cv2.imwrite(str(tmp_path / name), img)
        assert "strip" in refusal(tmp_path / name)
        with pytest.raises(FG3DError, match="strip"):
            to_bgr8(img)
    # the limit's edge: 20:1 loads, a header declaring 1 100 000×16 is refused before OpenCV sees it
    # (OpenCV raised cv2.error for widths over 2^20 in TIFF, BMP and WebP)
    assert to_bgr8(np.zeros((16, 16 * MAX_ASPECT, 3), np.uint8)).shape == (16, 320, 3)
    g = np.full((16, 16, 3), 100, np.uint8)
    wide = {
        "wide.tif": tiff_bytes(
            [
                {
                    "width": 1_100_000,
                    "height": 16,
                    "strips": deflate_strips(1_100_000, 16, 16),
                    "compression": 8,
                }
            ]
        ),
        "wide.bmp": bmp_rle8_bytes(1_100_000, 16),
        "wide.webp": webp_vp8x(1_100_000, 16, encoded(g, ".webp")),
    }
    for name, data in wide.items():
        (tmp_path / name).write_bytes(data)
        assert "1100000×16 is a strip" in refusal(tmp_path / name)


DETECT_STRIP = """
import json, sys
import numpy as np
from fg3d_blender.core import detect
from fg3d_blender.core.errors import FG3DError
h, w, guard = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "guard"
if not guard:
    detect.CNN_MIN_SIDE = 0  # the guard off: dlib's own RuntimeError must still become an FG3DError
img = np.full((h, w, 3), 120, np.uint8)
try:
    print(json.dumps(len(detect.Detector().faces(img))))
except FG3DError as exc:
    print(json.dumps(str(exc)))
"""


@pytest.mark.slow
def test_detection_on_thin_strips_never_crashes(cli_env):
    """Arrays that bypass ``to_bgr8``: the CNN is skipped on thin copies (16 wide made dlib abort the
    process, "free(): invalid size"); and dlib's RuntimeError becomes an FG3DError."""

    def run(*args):
        proc = subprocess.run(
            [sys.executable, "-c", DETECT_STRIP, *map(str, args)], env=cli_env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert run(2400, 16, "guard") == 0 and run(16, 2400, "guard") == 0
    msg = run(16, 2400, "no-guard")
    assert isinstance(msg, str) and msg.startswith("face detection failed on this 2400×16 image (dlib:"), msg


@pytest.mark.slow
def test_thin_strips_through_the_cli(tmp_path, photo, run_cli):
    for name, img in strips(photo).items():
        cv2.imwrite(str(tmp_path / name), img)
        proc = run_cli("reconstruct", tmp_path / name, "-o", tmp_path / "out")
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"fg3d: error: {tmp_path / name}: "), lines
        assert "is a strip" in lines[0].split(name)[-1], lines


# ---- 7. truncated and damaged files ------------------------------------------------------------------


def test_truncated_files_of_every_format_are_refused(tmp_path, photo):
    png = encoded(photo, ".png")
    iend = png.rindex(b"IEND") - 4
    lossy = encoded(photo, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 90])
    lossless = encoded(photo, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
    files = {
        "no_iend.png": png[:iend],
        "cut_in_idat.png": png[: len(png) * 3 // 4],
        "cut_rows.bmp": encoded(photo, ".bmp")[:-500],
        "cut_core.bmp": bmp_bytes(photo, core=True)[:-2000],
        "cut_rle.bmp": bmp_rle8_bytes(64, 64, (bytes([64, 7]) + b"\x00\x00") * 63 + b"\x40\x07\x00\x01")[
            :-40
        ],
        "cut_ifd.tif": encoded(photo, ".tif")[:-100],
        "cut_strips.tif": tiff_bytes([tiff_page(photo)])[:-400],
        "cut_lossy.webp": lossy[:-300],
        "cut_lossless.webp": lossless[: len(lossless) // 2],
        "cut.jpg": encoded(photo, ".jpg")[:-3000],
    }
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "ifd_first.tif", photo[:, :, ::-1])
    files["ifd_first_cut.tif"] = (tmp_path / "ifd_first.tif").read_bytes()[:-1000]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert "truncated" in refusal(tmp_path / name), name


def test_damaged_headers_are_refused(tmp_path, photo):
    jpeg = encoded(photo, ".jpg")
    sof = jpeg.index(b"\xff\xc0")
    lossless = encoded(photo, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
    files = {
        "zero_width.png": png_with_size(encoded(photo, ".png"), 0, 256),
        "negative.png": png_with_size(encoded(photo, ".png"), -5, 256),
        "zero_height.jpg": patched(jpeg, sof + 5, b"\0\0"),
        "no_sof.jpg": jpeg[:sof] + jpeg[sof + 2 + int.from_bytes(jpeg[sof + 2 : sof + 4], "big") :],
        "negative_width.bmp": patched(bmp_bytes(photo), 18, struct.pack("<i", -256)),
        "header_size_7.bmp": patched(bmp_bytes(photo), 14, struct.pack("<I", 7)),
        "zero_width.tif": tiff_bytes([dict(tiff_page(photo), width=0)]),
        "ifd_past_end.tif": patched(tiff_bytes([tiff_page(photo)]), 4, struct.pack("<I", 10**9)),
        "no_vp8l_signature.webp": patched(lossless, 20, b"\0"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        msg = refusal(tmp_path / name)
        assert "damaged" in msg or "truncated" in msg, (name, msg)
    (tmp_path / "canvas_mismatch.webp").write_bytes(webp_vp8x(300, 256, lossless))
    assert "the WebP decoder refused it" in refusal(tmp_path / "canvas_mismatch.webp")


# ---- fuzz: mutated headers and truncations of every format, through the CLI ---------------------------


def _size_fields(fmt: str, data: bytes) -> list:
    """(offset, byte count, byte order, signed) of the size fields of a file OpenCV wrote."""
    if fmt == "png":
        return [
            (16, 4, "big", True),
            (20, 4, "big", True),
            (8, 4, "big", False),
        ]  # width, height, IHDR length
    if fmt == "jpg":
        sof = data.index(b"\xff\xc0")
        return [
            (sof + 5, 2, "big", False),
            (sof + 7, 2, "big", False),
            (sof + 2, 2, "big", False),
            (4, 2, "big", False),
        ]
    if fmt == "bmp":
        return [
            (18, 4, "little", True),
            (22, 4, "little", True),
            (10, 4, "little", False),
            (14, 4, "little", False),
        ]
    if fmt == "tif":
        e = "<" if data[:2] == b"II" else ">"
        order = "little" if e == "<" else "big"
        (ifd,) = struct.unpack_from(e + "I", data, 4)
        (n,) = struct.unpack_from(e + "H", data, ifd)
        out = [(4, 4, order, False)]
        for k in range(n):
            tag, typ = struct.unpack_from(e + "HH", data, ifd + 2 + 12 * k)
            if tag in (256, 257, 273, 279):
                out.append((ifd + 2 + 12 * k + 8, 2 if typ == 3 else 4, order, False))
        return out
    i = data.index(b"VP8")
    if data[i : i + 4] == b"VP8L":
        return [(4, 4, "little", False), (i + 4, 4, "little", False), (i + 9, 4, "little", False)]
    return [
        (4, 4, "little", False),
        (i + 4, 4, "little", False),
        (i + 14, 2, "little", False),
        (i + 16, 2, "little", False),
    ]


def fuzz_files(folder: Path, base: np.ndarray, seed: int = 13) -> list:
    rng = np.random.default_rng(seed)
    sources = {
        "jpg": encoded(base, ".jpg"),
        "png": encoded(base, ".png"),
        "bmp": encoded(base, ".bmp"),
        "tif": encoded(base, ".tif"),
        "webp": encoded(base, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        "lossless.webp": encoded(base, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
    }
    out = []

    def add(kind, fmt, data):
        ext = fmt.split(".")[-1]
        p = folder / f"{len(out):03d}_{fmt.replace('.', '_')}_{kind}.{ext}"
        p.write_bytes(data)
        out.append(p)

    for fmt, data in sources.items():
        for cut in sorted(rng.integers(1, len(data) - 1, 10)):
            add(f"cut{cut}", fmt, data[:cut])
        for k in range(10):
            b = bytearray(data)
            for at in rng.choice(64, int(rng.integers(1, 5)), replace=False):
                b[at] = (b[at] + int(rng.integers(1, 256))) % 256
            add(f"flip{k}", fmt, bytes(b))
        for at, n, order, signed in _size_fields(fmt.split(".")[-1], data):
            big = (1 << (8 * n - 1)) - 1 if signed else (1 << (8 * n)) - 1
            values = [0, big] + ([-1, -(1 << (8 * n - 1))] if signed else [1 << (8 * n - 1)])
            for v in values:
                add(f"field{at}_{v}", fmt, patched(data, at, v.to_bytes(n, order, signed=signed)))
    return out


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory, photos_dir):
    # a 96×96 corner of a real photo with no face in it: whatever still decodes must give "no face found"
    base = cv2.imread(str(photos_dir / "fg3d_examples" / "AFW_2266416332_1_0.jpg"))[:96, -96:]
    folder = tmp_path_factory.mktemp("fuzz")
    files = fuzz_files(folder, base)
    assert 150 <= len(files) <= 200
    return folder, files


def test_fuzzed_files_load_in_bounded_memory(fuzz_folder):
    folder, files = fuzz_folder
    t0 = time.perf_counter()
    report = load_in_subprocess(files, timeout=60)
    loaded = [p for p, r in report["results"].items() if r.startswith("loaded")]
    other = {p: r for p, r in report["results"].items() if not r.startswith(("loaded", "FG3DError: "))}
    assert not other, other
    assert all("\n" not in r for r in report["results"].values())
    assert report["maxrss_mb"] < MEMORY_LIMIT_MB, report["maxrss_mb"]
    print(
        f"fuzz, load_image only: {len(files)} files, {len(loaded)} still decode, "
        f"{time.perf_counter() - t0:.1f} s, peak {report['maxrss_mb']:.0f} MB"
    )


TIMED = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
sys.exit(rc)
"""


@pytest.mark.slow
def test_fuzzed_files_through_the_cli(fuzz_folder, tmp_path, cli_env):
    """One batch over every mutated file: each fails with one line, nothing is written, no traceback."""
    folder, files = fuzz_folder
    out, peak = tmp_path / "out", tmp_path / "peak_mb"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "fg3d_blender", "reconstruct", folder, "-o", out, "--json", "-q"]
    proc = subprocess.run(
        [sys.executable, "-c", TIMED, peak, *cmd],
        env=cli_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] == 0 and summary["failed"] == len(files)
    assert sorted(r["photo"] for r in summary["results"]) == sorted(map(str, files))
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(files) and all(ln.startswith("fg3d: error: ") for ln in lines), proc.stderr[
        -3000:
    ]
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
    no_face = sum("no face found" in r["error"] for r in summary["results"])
    print(
        f"fuzz, CLI batch: {len(files)} files, {no_face} decoded (no face found), {seconds:.1f} s, "
        f"peak {float(peak.read_text()):.0f} MB"
    )
    assert seconds < 60
