"""The command line on good, odd and bad photos, run as users run it: ``python -m fg3d_blender …``.

Every case must end in a correct result, or in exit status ≠ 0 with exactly one ``fg3d: error:`` line on
stderr, no traceback and no file left in the output folder.  Test photos are built in ``tmp_path`` from
the real photos in ../shared (never committed).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, check_one_error_line

from fg3d_blender.core.geometry import nme

pytestmark = pytest.mark.slow  # integration tier: the CLI in subprocesses on real photos

# ---- building test photos -------------------------------------------------------------------------


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert a minimal EXIF APP1 segment (big-endian TIFF, one IFD0 entry: Orientation) after SOI."""
    assert jpeg[:2] == b"\xff\xd8"
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def jpeg_bytes(img: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def upright(photos_dir):
    return cv2.imread(str(photos_dir / "london_faces" / "003_03_neutral.jpg"))


@pytest.fixture(scope="module")
def good_photos(tmp_path_factory, upright, example_photo):
    """Unusual but valid photos of the same face, and the upright JPEG they must agree with."""
    d = tmp_path_factory.mktemp("good")
    p = {"upright": write_bytes(d / "upright.jpg", jpeg_bytes(upright))}
    # EXIF 6: stored turned 90° counter-clockwise, to be shown turned 90° clockwise (and 8 the reverse)
    p["exif6"] = write_bytes(
        d / "exif6.jpg",
        with_exif_orientation(jpeg_bytes(cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)), 6),
    )
    p["exif8"] = write_bytes(
        d / "exif8.jpg", with_exif_orientation(jpeg_bytes(cv2.rotate(upright, cv2.ROTATE_90_CLOCKWISE)), 8)
    )
    p["png16"] = d / "sixteen_bit.png"
    cv2.imwrite(str(p["png16"]), upright.astype(np.uint16) * 257)
    rgba = np.dstack([upright, np.full(upright.shape[:2], 255, np.uint8)])
    rgba[:40, :, 3] = 0  # a transparent strip composited over white
    p["rgba"] = d / "rgba.png"
    cv2.imwrite(str(p["rgba"]), rgba)
    p["gray"] = write_bytes(d / "gray.jpg", jpeg_bytes(cv2.cvtColor(upright, cv2.COLOR_BGR2GRAY)))
    # data after the end-of-image marker, as phones append to "motion photos"
    junk = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    p["trailer"] = write_bytes(d / "motion_photo.jpg", jpeg_bytes(upright) + junk)
    return d, p


# ---- bad input: one clear line, nothing written ---------------------------------------------------


def _truncated(d, photos_dir):
    data = (photos_dir / "fg3d_examples" / "test.jpg").read_bytes()
    return write_bytes(d / "truncated.jpg", data[: len(data) // 2])


def _truncated_png(d, photos_dir):
    ok, buf = cv2.imencode(".png", cv2.imread(str(photos_dir / "fg3d_examples" / "test.jpg")))
    return write_bytes(d / "cut.png", buf.tobytes()[: len(buf) // 2])


def _damaged_jpeg(d, photos_dir):
    """Entropy-coded data overwritten in the middle: libjpeg reports a premature end of a segment."""
    data = bytearray((photos_dir / "fg3d_examples" / "test.jpg").read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 400, 7):
        data[i] = 0xFF if data[i] != 0xFF else 0
    return write_bytes(d / "damaged.jpg", bytes(data))


def _empty(d, photos_dir):
    return write_bytes(d / "empty.jpg", b"")


def _text(d, photos_dir):
    return write_bytes(d / "notes.jpg", b"this is not a photo\n")


def _missing(d, photos_dir):
    return d / "does_not_exist.jpg"


def _empty_dir(d, photos_dir):
    (d / "no_photos").mkdir()
    (d / "no_photos" / "readme.txt").write_text("x")
    return d / "no_photos"


def _tiny(d, photos_dir):
    img = cv2.resize(
        cv2.imread(str(photos_dir / "fg3d_examples" / "test.jpg")), (32, 32), interpolation=cv2.INTER_AREA
    )
    p = d / "tiny.png"
    cv2.imwrite(str(p), img)
    return p


def _no_face(d, photos_dir):
    img = cv2.imread(str(photos_dir / "london_faces" / "001_03_neutral.jpg"))[620:]  # neck and shirt
    return write_bytes(d / "shirt.jpg", jpeg_bytes(img))


def _too_large(d, photos_dir):
    # a valid JPEG header announcing 20000×20000 (400 MP) is refused before decoding
    data = bytearray(jpeg_bytes(np.full((16, 16, 3), 128, np.uint8)))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", 20000, 20000)
    return write_bytes(d / "huge_header.jpg", bytes(data))


def _too_large_behind_metadata(d, photos_dir):
    # the same, with 120 kB of APP2 metadata (ICC profiles, XMP, … are that big) before the frame header
    data = _too_large(d, photos_dir).read_bytes()
    app = b"".join(b"\xff\xe2" + struct.pack(">H", 60000) + bytes(59998) for _ in range(2))
    return write_bytes(d / "huge_header_meta.jpg", data[:2] + app + data[2:])


BAD = {
    "truncated_jpeg": (_truncated, ["truncated.jpg", "truncated"]),
    "truncated_png": (_truncated_png, ["cut.png", "not a readable image"]),
    "damaged_jpeg": (_damaged_jpeg, ["damaged.jpg", "damaged"]),
    "zero_bytes": (_empty, ["empty.jpg", "empty"]),
    "text_named_jpg": (_text, ["notes.jpg", "not a readable image"]),
    "missing_path": (_missing, ["does_not_exist.jpg", "no such file"]),
    "folder_without_photos": (_empty_dir, ["no_photos", "no photos"]),
    "32x32": (_tiny, ["tiny.png", "no face"]),
    "no_face": (_no_face, ["shirt.jpg", "no face found"]),
    "over_150_megapixels": (_too_large, ["huge_header.jpg", "MP limit"]),
    "over_150_megapixels_behind_metadata": (
        _too_large_behind_metadata,
        ["huge_header_meta.jpg", "20000×20000", "MP limit"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_clear_line(case, tmp_path, photos_dir, run_cli):
    build, needles = BAD[case]
    photo = build(tmp_path, photos_dir)
    out = tmp_path / "out"
    proc = run_cli("reconstruct", photo, "-o", out)
    assert proc.returncode == 1
    check_one_error_line(proc, out, *needles)


def test_output_path_that_is_a_file_gives_one_line(tmp_path, example_photo, run_cli):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    proc = run_cli("reconstruct", example_photo, "-o", blocker)
    check_one_error_line(proc, tmp_path / "nothing", "taken", "not a folder")
    proc = run_cli("reconstruct", example_photo, "-o", blocker / "sub")
    check_one_error_line(proc, tmp_path / "nothing", str(blocker / "sub"), "is a file")
    assert blocker.read_text() == "x"


def test_unknown_format_gives_one_line_and_no_files(tmp_path, photos_dir, run_cli):
    """Checked once before any photo is processed: one line for a whole folder, not one per photo."""
    out = tmp_path / "out"
    proc = run_cli("reconstruct", photos_dir / "fg3d_examples", "-o", out, "--format", "obj,glb,fbx")
    check_one_error_line(proc, out, "fbx")
    proc = run_cli(
        "reconstruct", photos_dir / "fg3d_examples" / "test.jpg", "-o", out, "--format", ",", "--no-extras"
    )
    check_one_error_line(proc, out, "no output format")


# ---- unusual but valid photos ---------------------------------------------------------------------


def test_unusual_photos_reconstruct_and_match_the_upright_photo(good_photos, run_cli, tmp_path):
    """EXIF orientation 6/8, 16-bit PNG, RGBA PNG, grayscale JPEG, data after the JPEG's end: all succeed."""
    d, p = good_photos
    out = tmp_path / "out"
    proc = run_cli(
        "reconstruct", d, "-o", out, "--format", "npz", "--no-extras", "--texture-size", "256", "--json", "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] == len(p) and summary["failed"] == 0
    lms = {}
    for key, photo in p.items():
        with np.load(out / f"{photo.stem}.npz") as z:
            lms[key] = z["landmarks_2d"]
            if key == "upright":
                ref_pose = z["pose"]
            else:
                assert abs(z["pose"][0] - ref_pose[0]) < 4 and abs(z["pose"][2] - ref_pose[2]) < 4, key
    ref = lms["upright"]
    assert ref[:, 0].min() > 100 and ref[:, 1].max() < 800
    for key, lm in lms.items():
        assert nme(lm, ref) < 0.02, (key, nme(lm, ref))
    # orientation matters: the sideways pixels without the tag would give a different face position
    sideways = cv2.imdecode(
        np.frombuffer(p["exif6"].read_bytes(), np.uint8), cv2.IMREAD_IGNORE_ORIENTATION | cv2.IMREAD_COLOR
    )
    assert sideways.shape[:2] == cv2.imread(str(p["upright"])).shape[1::-1]


def test_exif_orientation_is_applied_when_loading(good_photos):
    from fg3d_blender.core.image_io import load_image

    _, p = good_photos
    up = load_image(p["upright"]).astype(np.int16)
    for key in ("exif6", "exif8"):
        img = load_image(p[key]).astype(np.int16)
        assert img.shape == up.shape, key
        assert np.abs(img - up).mean() < 3, key  # only JPEG re-encoding noise
    for key in ("png16", "rgba", "gray"):
        img = load_image(p[key])
        assert img.dtype == np.uint8 and img.shape == up.shape, key
    rgba = load_image(p["rgba"])
    assert (rgba[:40] == 255).all()  # transparent pixels over white
    raw16 = cv2.imread(str(p["png16"]), cv2.IMREAD_UNCHANGED)
    assert raw16.dtype == np.uint16
    np.testing.assert_array_equal(load_image(p["png16"]), (raw16 >> 8).astype(np.uint8))


def test_non_ascii_path_and_all_formats(tmp_path, example_photo, run_cli):
    src = tmp_path / "fötö 照片.jpg"
    src.write_bytes(example_photo.read_bytes())
    out = tmp_path / "ausgabe ü"
    proc = run_cli("reconstruct", src, "-o", out, "--format", "obj,glb,ply,npz", "--texture-size", "256")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    stem = "fötö 照片"
    names = sorted(q.name for q in out.iterdir())
    assert names == sorted(
        f"{stem}{s}"
        for s in (
            ".obj",
            ".mtl",
            "_texture.png",
            ".glb",
            ".ply",
            ".npz",
            "_depth.png",
            "_pncc.png",
            "_preview.png",
        )
    )
    assert f"mtllib {stem}.mtl" in (out / f"{stem}.obj").read_text(encoding="utf-8")
    with np.load(out / f"{stem}.npz") as z:
        assert z["vertices"].shape == (53215, 3)
    assert (out / f"{stem}.glb").read_bytes()[:4] == b"glTF"


# ---- several faces --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_faces_photo(tmp_path_factory, photos_dir):
    a = cv2.imread(str(photos_dir / "london_faces" / "001_03_neutral.jpg"))
    b = cv2.resize(
        cv2.imread(str(photos_dir / "london_faces" / "002_03_neutral.jpg")),
        (500, 500),
        interpolation=cv2.INTER_AREA,
    )
    b = np.pad(b, ((150, 150), (0, 0), (0, 0)), mode="edge")
    p = tmp_path_factory.mktemp("two") / "two_faces.jpg"
    p.write_bytes(jpeg_bytes(np.concatenate([a, b], axis=1)))
    return p


def test_several_faces_default_largest_and_face_index(two_faces_photo, run_cli, tmp_path):
    lm = {}
    for idx in (None, 1):
        out = tmp_path / f"out{idx}"
        args = [
            "reconstruct",
            two_faces_photo,
            "-o",
            out,
            "--format",
            "npz",
            "--no-extras",
            "--texture-size",
            "256",
        ]
        if idx is not None:
            args += ["--face-index", str(idx)]
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip() == ""
        with np.load(out / "two_faces.npz") as z:
            lm[idx] = z["landmarks_2d"]
    assert lm[None][:, 0].max() < 800 < lm[1][:, 0].min()  # largest = the left portrait
    out = tmp_path / "bad"
    proc = run_cli("reconstruct", two_faces_photo, "-o", out, "--face-index", "2")
    check_one_error_line(proc, out, "face index 2", "2 face(s) found")


# ---- huge photo -----------------------------------------------------------------------------------


def test_huge_photo_within_the_limit(tmp_path, photos_dir, run_cli, reconstructed):
    """12000×12000 (144 MP, under the 150 MP limit) with a real face pasted in: it must work."""
    face = cv2.imread(str(photos_dir / "london_faces" / "001_03_neutral.jpg"))
    canvas = np.full((12000, 12000, 3), 190, np.uint8)
    canvas[4000:6400, 5000:7400] = cv2.resize(face, (2400, 2400), interpolation=cv2.INTER_CUBIC)
    p = tmp_path / "huge.jpg"
    p.write_bytes(jpeg_bytes(canvas, 80))
    del canvas
    out = tmp_path / "out"
    proc = run_cli("reconstruct", p, "-o", out, "--format", "npz", "--texture-size", "256")
    assert proc.returncode == 0, proc.stderr
    with np.load(out / "huge.npz") as z:
        lm = z["landmarks_2d"]
    preview = cv2.imread(str(out / "huge_preview.png"))
    assert preview.shape == (800, 2400, 3)  # photo | overlay | shaded, downscaled to 2400 px
    assert cv2.imread(str(out / "huge_depth.png"), cv2.IMREAD_UNCHANGED).shape == (12000, 12000)
    # the face sits at x 5000–7400, y 4000–6400: the 800 px original's landmarks ×3 plus that offset
    small = reconstructed(photos_dir / "london_faces" / "001_03_neutral.jpg", texture_size=256)
    expected = small.landmarks_2d * 3.0 + np.array([5000.0, 4000.0])
    assert nme(lm, expected) < 0.03, nme(lm, expected)


# ---- batch ----------------------------------------------------------------------------------------


def test_batch_with_good_and_bad_photos(tmp_path, photos_dir, run_cli):
    d = tmp_path / "batch"
    d.mkdir()
    ex = photos_dir / "fg3d_examples"
    (d / "a_good.jpg").write_bytes((ex / "test.jpg").read_bytes())
    (d / "b_good.jpg").write_bytes((ex / "AFW_2266416332_1_0.jpg").read_bytes())
    cv2.imwrite(str(d / "b_good.png"), cv2.imread(str(ex / "HELEN_1238081332_1_0.jpg")))  # same stem
    _truncated(d, photos_dir)
    _text(d, photos_dir)
    _no_face(d, photos_dir)
    out = tmp_path / "out"
    proc = run_cli("reconstruct", d, "-o", out, "--format", "obj,npz", "--texture-size", "256", "--json")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] == 3 and summary["failed"] == 3
    by_photo = {Path(r["photo"]).name: r for r in summary["results"]}
    assert by_photo["a_good.jpg"]["ok"] and by_photo["b_good.jpg"]["ok"] and by_photo["b_good.png"]["ok"]
    for bad in ("truncated.jpg", "notes.jpg", "shirt.jpg"):
        assert not by_photo[bad]["ok"] and bad in by_photo[bad]["error"]
    err_lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith("fg3d: error:")]
    assert len(err_lines) == 3
    assert "6/6" in proc.stderr  # the progress bar reached the end
    assert "3 of 6 photos reconstructed, 3 failed" in proc.stderr
    names = sorted(q.name for q in out.iterdir())
    expected = sorted(
        f"{s}{x}"
        for s in ("a_good", "b_good")
        for x in (".obj", ".mtl", "_texture.png", ".npz", "_depth.png", "_pncc.png", "_preview.png")
    )
    expected = sorted(
        expected + [n.replace("b_good", "b_good_2") for n in expected if n.startswith("b_good")]
    )
    assert names == expected  # nothing for the bad photos, no temporaries, no name clash
    assert "mtllib b_good_2.mtl" in (out / "b_good_2.obj").read_text()


def test_demo_command(tmp_path, run_cli):
    """`make demo`: the public-domain astronaut photo → all formats and extras."""
    out = tmp_path / "demo"
    proc = run_cli("demo", "-o", out)
    assert proc.returncode == 0, proc.stderr
    names = {q.name for q in out.iterdir()}
    assert {
        "astronaut.png",
        "astronaut.obj",
        "astronaut.mtl",
        "astronaut_texture.png",
        "astronaut.glb",
        "astronaut.ply",
        "astronaut.npz",
        "astronaut_preview.png",
    } <= names
    with np.load(out / "astronaut.npz") as z:
        assert z["vertices"].shape == (53215, 3)
        lm = z["landmarks_2d"]
    assert 150 < lm[:, 0].mean() < 300 and 50 < lm[:, 1].mean() < 200  # her face, upper middle of 512²


def test_reconstruct_from_a_checkout_imports_neither_torch_nor_the_checkout_commands(
    tmp_path, example_photo, cli_env
):
    """The parser lists bench and train-fgnet by name; their modules (torch: ~1.7 s of every CLI start)
    are imported only when one of them runs; nor scipy, once the derived files exist (made here first)."""
    from fg3d_blender.core.pipeline import default_reconstructor

    default_reconstructor().load_models()
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "fg3d_blender",
            "reconstruct",
            example_photo,
            "-o",
            tmp_path,
        ],
        cwd=REPO,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "training", "benchmarks", "scipy"}, imported & {"torch", "scipy"}
    assert (
        "bench"
        in subprocess.run(
            [sys.executable, "-m", "fg3d_blender", "--help"],
            cwd=REPO,
            env=cli_env,
            capture_output=True,
            text=True,
        ).stdout
    )


def test_bench_detect_compares_the_largest_face_search_with_the_full_one(run_cli, photos_dir):
    proc = run_cli("bench", "detect", "--dir", photos_dir / "fg3d_examples", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["photos"] >= 17 and out["same_face"] >= 17 and out["different_face"] == 0, out
    assert out["decided_by_the_short_search"] >= 10, out  # the short search does run
    assert out["largest_ms_median"] > 0 and out["full_ms_median"] > 0
