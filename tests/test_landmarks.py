"""dlib's 68-point model run by landmark_ext against dlib's own shape_predictor, and the saved HOG
detector against dlib's built-in one, on real photos; the cached arrays and their checks."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
dlib = pytest.importorskip("dlib")

from fg3d_blender.core import assets, detect, landmarks  # noqa: E402
from fg3d_blender.landmark_ext import predict, read_shape_predictor  # noqa: E402


@pytest.fixture(scope="module")
def dlib_predictor():
    return dlib.shape_predictor(str(assets.dlib_model_path(landmarks.MODEL_FILE)))


@pytest.fixture(scope="module")
def ours():
    return landmarks.LandmarkPredictor()


@pytest.fixture(scope="module")
def grey_photos(photos_dir):
    paths = sorted((photos_dir / "fg3d_examples").glob("*.jpg"))
    paths += sorted((photos_dir / "london_faces").glob("*.jpg"))[:24]
    paths += sorted((photos_dir / "frgc_multipose").rglob("*.jpg"))[:24]
    assert len(paths) >= 40
    return [(p.name, np.ascontiguousarray(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE))) for p in paths]


def _dlib_points(pred, gray, rect):
    return np.array([[p.x, p.y] for p in pred(gray, rect).parts()], np.int64)


def test_the_same_68_points_as_dlib_on_every_face_of_real_photos(grey_photos, dlib_predictor, ours):
    hog = dlib.get_frontal_face_detector()
    faces = 0
    for name, gray in grey_photos:
        for rect in hog(gray, 0):
            faces += 1
            np.testing.assert_array_equal(
                ours(gray, rect), _dlib_points(dlib_predictor, gray, rect), err_msg=name
            )
    assert faces >= 30


def test_the_same_points_for_boxes_off_the_photo_tiny_and_huge(grey_photos, dlib_predictor, ours):
    """Feature pixels outside the photo read 0, as dlib reads them; odd boxes follow dlib too."""
    for name, gray in grey_photos[::4]:
        h, w = gray.shape
        for rect in (
            dlib.rectangle(-w // 3, -h // 4, w // 2, h // 2),  # partly off the top left
            dlib.rectangle(w // 2, h // 2, w + w // 3, h + h // 5),  # partly off the bottom right
            dlib.rectangle(w // 3, h // 3, w // 3 + 9, h // 3 + 9),  # a 10 px box
            dlib.rectangle(-w, -h, 2 * w, 2 * h),  # far larger than the photo
        ):
            np.testing.assert_array_equal(
                ours(gray, rect), _dlib_points(dlib_predictor, gray, rect), err_msg=name
            )


def test_the_saved_hog_detector_finds_what_dlibs_built_in_one_finds(grey_photos):
    detect.frontal_detector()  # saves it into the cache (frontal_detector falls back quietly: load it here)
    saved = dlib.fhog_object_detector(
        str(assets.derived_path(f"frontal_face_detector.dlib-{dlib.__version__}.svm"))
    )
    built_in = dlib.get_frontal_face_detector()
    for name, gray in grey_photos:
        for upsample in (0, 1) if max(gray.shape) <= 500 else (0,):
            a, b = saved.run(gray, upsample, 0.0), built_in.run(gray, upsample, 0.0)
            assert list(a[0]) == list(b[0]) and list(a[1]) == list(b[1]) and list(a[2]) == list(b[2]), name


def test_the_arrays_are_memory_mapped_from_the_cache_and_rebuilt_when_damaged(
    tmp_path, monkeypatch, grey_photos, dlib_predictor
):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    first = landmarks.LandmarkPredictor()
    files = sorted((tmp_path / "derived").glob("shape_predictor_68_face_landmarks.*.npy"))
    assert {f.name.split(".")[-2] for f in files} == set(landmarks.KEYS)
    again = landmarks.LandmarkPredictor()
    assert isinstance(again.arrays["leaves"], np.memmap)
    name, gray = grey_photos[0]
    rect = dlib.get_frontal_face_detector()(gray, 0)[0]
    want = _dlib_points(dlib_predictor, gray, rect)
    np.testing.assert_array_equal(first(gray, rect), want)
    np.testing.assert_array_equal(again(gray, rect), want)  # from the mapped files

    del again  # (a mapped file must not shrink under its map)
    leaves = next(f for f in files if f.name.endswith(".leaves.npy"))
    with open(leaves, "r+b") as f:  # a half-written file: numpy's size check refuses it
        f.truncate(leaves.stat().st_size // 2)
    rebuilt = landmarks.LandmarkPredictor()
    assert leaves.stat().st_size > 60_000_000
    np.testing.assert_array_equal(rebuilt(gray, rect), want)

    splits = next(f for f in files if f.name.endswith(".splits.npy"))
    bad = np.load(splits)
    bad[3, 7, 0, 1] = 10**6  # an index past the feature pixels: refused, never followed
    np.save(splits, bad)
    assert not landmarks._valid({f.name.split(".")[-2]: np.load(f, mmap_mode="r") for f in files})
    np.testing.assert_array_equal(landmarks.LandmarkPredictor()(gray, rect), want)
    assert np.load(splits).max() < 500


def test_a_file_that_is_not_a_shape_predictor_is_refused():
    data = assets.dlib_model_path(landmarks.MODEL_FILE).read_bytes()
    for bad, needle in (
        (data[: len(data) // 3], "ends early"),
        (data + b"\x01\x00", "bytes after the model"),
        (b"\x01\x02" + data[2:], "version"),
        (b"", "ends early"),
        (b"\x01\x01\xff\xff", "does not start a dlib integer"),
    ):
        with pytest.raises(ValueError, match=needle):
            read_shape_predictor(bad)


def test_a_read_only_cache_still_gives_dlibs_points_and_detector(
    unwritable_dir, monkeypatch, grey_photos, dlib_predictor
):
    """Nothing can be cached: the arrays are read into memory each time, and dlib's built-in detector
    is used; the points and the boxes are the same."""
    monkeypatch.setenv(assets.CACHE_ENV, str(unwritable_dir))
    pred, hog = landmarks.LandmarkPredictor(), detect.frontal_detector()
    assert not isinstance(pred.arrays["leaves"], np.memmap) and not any(unwritable_dir.iterdir())
    name, gray = grey_photos[1]
    rects = hog(gray, 0)
    assert list(rects) == list(dlib.get_frontal_face_detector()(gray, 0)) and len(rects)
    np.testing.assert_array_equal(pred(gray, rects[0]), _dlib_points(dlib_predictor, gray, rects[0]))


def test_damaged_arrays_are_refused_and_a_failing_writer_falls_back(tmp_path, monkeypatch, ours, grey_photos):
    """What the compiled predictor relies on is checked: shapes, layout, dimensions, and it refuses
    arrays that do not fit together instead of reading past them; a cache file that cannot be written
    (dlib raising) leaves dlib's built-in detector."""
    a = dict(ours.arrays)
    assert landmarks._valid(a)
    for key, bad in (
        ("anchors", np.ascontiguousarray(a["anchors"]).ravel()),  # 1-D
        ("leaves", np.asfortranarray(a["leaves"])),  # not C order
        ("initial", np.float32(0.0)),  # 0-d
        ("splits", np.asarray(a["splits"]).astype(np.int64)),  # another type
    ):
        assert not landmarks._valid(dict(a, **{key: bad})), key
    name, gray = grey_photos[0]
    args = [ours.arrays[k] for k in landmarks.KEYS]
    args[3] = np.ascontiguousarray(args[3][:, :10])  # fewer trees' leaves than splits
    with pytest.raises(ValueError, match="do not fit together"):
        predict(gray, 10, 10, 100, 100, *args)

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))

    def failing(tmp):
        raise RuntimeError("Error serializing object")  # what dlib raises on a full disk

    assert assets.derived_file("x.svm", failing) is None and not (tmp_path / "derived" / "x.svm").exists()
