"""Every stage of the reconstruction core on real photos: detection, 3DMM fit, renders, texture, result."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import scipy.io as sio

from fg3d_blender.core import detect, morphable, render, texture
from fg3d_blender.core.assets import asset_path
from fg3d_blender.core.errors import FG3DError, NoFaceError
from fg3d_blender.core.geometry import nme
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import Options, default_reconstructor  # noqa: E402

pytestmark = pytest.mark.slow  # integration tier: whole reconstructions of real photos

REC = default_reconstructor()

# a spread of the paper's examples: FRGC, AFW and HELEN crops, frontal and turned
NME_PHOTOS = [
    "test.jpg",
    "AFW_2122067003_1_0.jpg",
    "AFW_2312639559_1_0.jpg",
    "AFW_448291547_1_0.jpg",
    "HELEN_1238081332_1_0.jpg",
    "HELEN_1344304961_1_0.jpg",
    "02463d453_-3_13.jpg",
]
TURNED = "02463d453_57_-3.jpg"  # frgc_multipose: yaw 57°, face turned toward the photo's left


@pytest.fixture(scope="module")
def examples(photos_dir):
    return photos_dir / "fg3d_examples"


@pytest.fixture(scope="module")
def multipose(photos_dir):
    return photos_dir / "frgc_multipose"


@pytest.fixture(scope="module")
def frontal(reconstructed, example_photo):
    return reconstructed(example_photo, texture_size=512)


@pytest.fixture(scope="module")
def turned(reconstructed, multipose):
    return reconstructed(multipose / TURNED, texture_size=512)


# ---- stage 2: detection ---------------------------------------------------------------------------


def test_faces_found_on_every_example_photo_with_landmarks_in_the_box(examples):
    photos = sorted(examples.glob("*.jpg"))
    assert len(photos) == 17
    for p in photos:
        img = load_image(p)
        faces = REC.faces(img)
        assert len(faces) >= 1, p.name
        f = faces[0]
        assert f.landmarks.shape == (68, 2) and f.landmarks.dtype == np.float32
        x0, y0, x1, y1 = f.box
        assert 0 <= x0 < x1 <= img.shape[1] and 0 <= y0 < y1 <= img.shape[0], p.name
        size = x1 - x0
        assert 0.15 * img.shape[1] < size, p.name
        # dlib boxes crop brow and chin a little: allow a margin of a quarter box
        lm = f.landmarks
        m = 0.25 * size
        assert (lm[:, 0] > x0 - m).all() and (lm[:, 0] < x1 + m).all(), p.name
        assert (lm[:, 1] > y0 - m).all() and (lm[:, 1] < y1 + m).all(), p.name
        cx, cy = lm.mean(0)
        assert x0 < cx < x1 and y0 < cy < y1, p.name
        # anatomy: eyes above nose tip above mouth above chin, left eye on the photo's left
        assert lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean() < lm[8, 1], p.name
        assert lm[36:42, 0].mean() < lm[42:48, 0].mean(), p.name


def test_hog_misses_the_profile_but_the_cnn_fallback_finds_it(multipose):
    img = load_image(multipose / "02463d453_85_14.jpg")
    assert REC.faces(img, use_cnn=False) == []
    faces = REC.faces(img)
    assert len(faces) == 1 and faces[0].detector == "cnn"
    x0, y0, x1, y1 = faces[0].box
    assert x1 - x0 > 80
    lm = faces[0].landmarks
    assert (lm[:, 0] > x0 - 40).all() and (lm[:, 0] < x1 + 40).all()
    # a frontal photo is found by HOG (the CNN is only the fallback)
    assert REC.faces(load_image(multipose / "02463d453_-1_-2.jpg"))[0].detector == "hog"


def test_the_largest_profile_face_is_found_on_a_small_copy_first_and_a_small_one_still_found(multipose):
    """HOG misses this profile.  For the largest face alone the CNN runs first on a copy at most
    ``CNN_QUICK_SIDE`` wide (2.6× fewer pixels here); a face too small for that copy is found by the
    full-size pass after it."""
    img = cv2.resize(load_image(multipose / "02463d453_85_14.jpg"), (512, 512), interpolation=cv2.INTER_CUBIC)
    alone, every = REC.faces(img, largest=True), REC.faces(img)
    assert len(alone) == 1 and alone[0].detector == "cnn" and every[0].detector == "cnn"
    a, b = alone[0].box, every[0].box  # the same face, the box of a coarser pyramid (so not equal)
    assert not np.array_equal(a, b)
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    assert inter / (alone[0].area + every[0].area - inter) > 0.6
    canvas = np.full((2048, 2048, 3), 128, np.uint8)  # the face shrinks to a sixth of the photo's side
    canvas[512:1024, 512:1024] = img
    assert detect._cnn_faces(REC.detector, canvas[:, :, ::-1].copy(), detect.CNN_QUICK_SIDE, False)[0] == []
    small = REC.faces(canvas, largest=True)
    assert len(small) == 1 and small[0].detector == "cnn"
    x0, y0, x1, y1 = small[0].box
    assert 512 <= x0 < x1 <= 1024 and 512 <= y0 < y1 <= 1024


def test_no_face_in_a_real_photo_without_a_face(photos_dir):
    img = load_image(photos_dir / "london_faces" / "001_03_neutral.jpg")[620:, :]  # neck and shirt only
    assert REC.faces(img) == []
    with pytest.raises(NoFaceError, match="no face found"):
        detect.select_face([], None, "shirt.jpg")


def test_a_small_face_in_a_12_megapixel_photo_is_found_with_accurate_landmarks(photos_dir):
    """A real portrait shrunk to a 100 px face and pasted into a 4032×3024 photo: at the 1280 px
    detection copy it is ~32 px, too small for HOG; the larger second copy finds it."""
    a = load_image(photos_dir / "london_faces" / "002_03_neutral.jpg")
    ref = REC.faces(a)[0]
    s = 100.0 / (ref.box[2] - ref.box[0])
    small = cv2.resize(a, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    big = np.full((3024, 4032, 3), 127, np.uint8)
    big[1200 : 1200 + small.shape[0], 1800 : 1800 + small.shape[1]] = small
    faces = REC.faces(big)
    assert len(faces) == 1 and faces[0].detector == "hog"
    err = np.linalg.norm(faces[0].landmarks - (ref.landmarks * s + [1800, 1200]), axis=1).mean()
    assert err < 2.5


def two_faces(photos_dir):
    """Two real London-set portraits side by side, the left one larger."""
    a = load_image(photos_dir / "london_faces" / "001_03_neutral.jpg")
    b = cv2.resize(
        load_image(photos_dir / "london_faces" / "002_03_neutral.jpg"),
        (500, 500),
        interpolation=cv2.INTER_AREA,
    )
    b = np.pad(b, ((150, 150), (0, 0), (0, 0)), mode="edge")
    return np.ascontiguousarray(np.concatenate([a, b], axis=1))


def test_several_faces_sorted_largest_first_and_selectable(photos_dir):
    img = two_faces(photos_dir)
    faces = REC.faces(img)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].landmarks[:, 0].max() < 800 < faces[1].landmarks[:, 0].min()
    assert detect.select_face(faces, None) is faces[0]
    assert detect.select_face(faces, 1) is faces[1]
    for bad in (2, -1):
        with pytest.raises(FG3DError, match=r"face index .* 2 face\(s\) found"):
            detect.select_face(faces, bad, "two.jpg")


def test_the_largest_face_alone_is_the_full_searchs_first_face_on_real_photos(shared_dir, photos_dir):
    """``largest=True`` (the default reconstruction's detection) scans only the high levels of HOG's
    pyramid; on real photos it gives the very face, box, score and landmarks the full search puts first,
    and it does take the short path on most of them (else it would save nothing)."""
    aflw = sorted((shared_dir / "benchmarks" / "aflw2000_3d" / "images").glob("*.jpg"))[:40]
    paths = aflw + sorted((photos_dir / "london_faces").glob("*.jpg"))[:10]
    paths += sorted((photos_dir / "fg3d_examples").glob("*.jpg"))
    paths += sorted((photos_dir / "frgc_multipose").glob("*.jpg"))[::10]
    det, short = REC.detector, 0
    for p in paths:
        img = load_image(p)
        full, alone = det.faces(img, use_cnn=False), det.faces(img, use_cnn=False, largest=True)
        assert len(alone) == min(1, len(full)), p.name
        if full:
            a, b = full[0], alone[0]
            assert np.array_equal(a.box, b.box) and np.array_equal(a.landmarks, b.landmarks), p.name
            assert a.score == b.score, p.name
            gray, s, _ = detect.working_gray(img)
            short += detect.quick_largest(img, det.hog, gray, s) is not None
    print(len(paths), "photos", short, "by the short search")
    assert short >= 0.6 * len(paths)


@pytest.mark.parametrize("name", ["image03561", "image03174"])
def test_every_face_includes_a_turned_face_beside_the_one_hog_finds(shared_dir, name):
    """AFLW2000-3D photos where HOG finds only another face: the frontal friend beside a face turned
    38° (03561), or an ear beside a face turned 83° (03174).  Asked for every face, the CNN also runs
    and adds the labelled face; the face HOG found stays first (the default's face), and the CNN's
    duplicate of it is not added; the fit from the added face's landmarks finds the labelled face."""
    root = shared_dir / "benchmarks" / "aflw2000_3d"
    labels = np.load(root / "labels.npz", allow_pickle=False)
    gt = labels["pt3d_68"][list(labels["names"]).index(name)][:2].T
    img = load_image(root / "images" / f"{name}.jpg")
    hog_only = REC.faces(img, use_cnn=False)
    faces = REC.faces(img)
    assert len(hog_only) == 1 and nme(hog_only[0].landmarks, gt) > 0.5  # HOG's face is not the labelled one
    assert len(faces) == 2 and faces[0].detector == "hog" and faces[1].detector == "cnn"
    assert np.array_equal(faces[0].landmarks, REC.faces(img, largest=True)[0].landmarks)
    assert not detect.same_face(faces[0].box, faces[1].box)
    fit = REC.fit(img, faces[1].landmarks)  # dlib's 68 points on a turned face are coarse; the fit is not
    assert nme(fit.project(fit.vertices[REC.face_model.keypoints])[:, :2], gt) < 0.06  # measured 0.02, 0.04


def test_the_default_takes_the_largest_face_and_an_index_still_sees_every_face(photos_dir):
    img = two_faces(photos_dir)
    faces = REC.faces(img)
    alone = REC.faces(img, largest=True)
    assert len(alone) == 1 and np.array_equal(alone[0].landmarks, faces[0].landmarks)
    # a face the short search cannot see (below ~150 px) is found when asked for by index
    b = cv2.resize(img[:, 800:], None, fx=0.45, fy=0.45, interpolation=cv2.INTER_AREA)
    small = img.copy()
    small[:, 800:] = 127
    small[100 : 100 + b.shape[0], 900 : 900 + b.shape[1]] = b
    assert len(REC.faces(small)) == 2
    assert REC.reconstruct(small, Options(face_index=1, refine=False)).face_box[0] > 800
    assert REC.reconstruct(small, Options(refine=False)).face_box[2] < 800
    assert REC.reconstruct(small, Options(face_index=0, refine=False)).face_box[2] < 800  # the add-on's


# ---- stage 3: the 3DMM fit ------------------------------------------------------------------------


def test_the_refits_landmark_target_moves_less_with_the_crop_than_one_crops_head(shared_dir):
    """The refit's target is the landmark head averaged over ``HEAD_SHIFTS`` crops: moving the crop
    (the start landmarks shifted by up to 3 % of the box) moves it less than it moves one crop's head,
    on every photo (AFLW2000-3D, labels as the start; measured ~0.6× over 20 photos)."""
    root = shared_dir / "benchmarks" / "aflw2000_3d"
    labels = np.load(root / "labels.npz", allow_pickle=False)
    rng = np.random.default_rng(0)
    ratios = []
    for i in range(0, 1000, 100):
        img = load_image(root / "images" / f"{labels['names'][i]}.jpg")
        gt = labels["pt3d_68"][i, :2].T.astype(np.float32)
        side = float(np.ptp(morphable.roi_from_landmarks(gt)[::2]))
        one, averaged = [], []
        for _ in range(6):
            start = gt + rng.uniform(-0.03, 0.03, 2).astype(np.float32) * side
            averaged.append(REC.fit(img, start, passes=1).head_landmarks)
            roi = morphable.roi_from_landmarks(start)
            _, lm = morphable.regress(morphable.crop_resize(img, roi)[None], REC.face_model, REC.regressor)
            one.append(morphable.in_image(lm[0], roi))
        moved = [np.linalg.norm(x - x.mean(0), axis=2).mean() for x in (np.array(one), np.array(averaged))]
        ratios.append(moved[1] / moved[0])
    print("averaged / one crop:", np.round(ratios, 2))
    assert max(ratios) < 1.0 and np.mean(ratios) < 0.75


@pytest.mark.parametrize("name", NME_PHOTOS)
def test_fitted_landmarks_agree_with_dlib(reconstructed, examples, name):
    r = reconstructed(examples / name, texture_size=256)
    err = nme(r.landmarks_2d, r.detected_landmarks)
    assert err < 0.06, f"{name}: NME {err:.4f}"


def seed_fit(fm):
    """The seed's own fit of fg3d_examples/test.jpg (test_3D.mat) as image-space landmarks and pose."""
    m = sio.loadmat(asset_path("beyond3dmm/test_3D.mat"))
    R, t = m["R"].astype(np.float64), m["t3d"].ravel().astype(np.float64)
    verts_um = fm.mean_um + fm.basis_um @ m["alpha_shape"].ravel().astype(np.float32)
    img = verts_um[fm.keypoints] @ R.T + t
    lm = np.column_stack([img[:, 0], 256.0 - img[:, 1]])  # image height 256, y = 256 − y
    A = np.diag([1.0, -1.0, 1.0]) @ R * 1000.0  # µm → mm, y down
    b = np.array([t[0], 256.0 - t[1], t[2]])
    return lm, morphable.Fit(params=None, roi_box=None, vertices=None, A=A, b=b)


def test_fit_agrees_with_the_seed_fit_of_the_same_photo(frontal):
    fm = REC.face_model
    seed_lm, seed = seed_fit(fm)
    assert frontal.image.shape[0] == 256
    # the seed's landmarks are themselves near dlib's (the file matches this photo)
    assert nme(seed_lm, frontal.detected_landmarks) < 0.06
    assert nme(frontal.landmarks_2d, seed_lm) < 0.04
    ours, theirs = frontal.pose, seed.pose_degrees
    for k in ("yaw", "pitch", "roll"):
        assert abs(ours[k] - theirs[k]) < 5.0, (k, ours, theirs)
    assert abs(frontal.camera["scale"] / seed.scale - 1) < 0.1


def test_yaw_sign_follows_the_documented_convention(reconstructed, multipose, turned, tmp_path):
    """yaw + = face turned toward the photo's right side; a mirrored photo flips the sign."""
    lm = turned.detected_landmarks
    jaw_mid = (lm[0, 0] + lm[16, 0]) / 2
    assert lm[30, 0] < jaw_mid  # the nose points to the photo's left …
    assert turned.pose["yaw"] < -40  # … so the yaw is strongly negative
    flipped = tmp_path / "flipped.png"
    cv2.imwrite(str(flipped), turned.image[:, ::-1])
    mirrored = reconstructed(flipped, texture_size=256)
    assert mirrored.pose["yaw"] > 40
    assert abs(mirrored.pose["yaw"] + turned.pose["yaw"]) < 8
    assert abs(mirrored.pose["pitch"] - turned.pose["pitch"]) < 5
    # the frgc_multipose yaws (file name ID_YAW_PITCH) order the fitted |yaw| the same way
    yaws = []
    for name in (
        "02463d453_-1_-2.jpg",
        "02463d453_15_-2.jpg",
        "02463d453_28_-3.jpg",
        "02463d453_44_11.jpg",
        TURNED,
    ):
        yaws.append(reconstructed(multipose / name, texture_size=256).pose["yaw"])
    assert abs(yaws[0]) < 6
    assert all(a > b for a, b in zip(yaws, yaws[1:])), yaws


def test_pitch_sign_and_roll(reconstructed, multipose, tmp_path):
    down = reconstructed(multipose / "02463d453_-1_-28.jpg", texture_size=256).pose  # head tilted down
    up = reconstructed(multipose / "02463d453_-3_13.jpg", texture_size=256).pose  # chin up
    level = reconstructed(multipose / "02463d453_-1_-2.jpg", texture_size=256)
    assert down["pitch"] > 10 and up["pitch"] < -4 and abs(level.pose["pitch"]) < 6
    # in-plane rotation of the photo shows up as roll of the same size, opposite signs both ways
    rolls = []
    for angle in (15, -15):
        h, w = level.image.shape[:2]
        M = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        p = tmp_path / f"roll{angle}.png"
        cv2.imwrite(str(p), cv2.warpAffine(level.image, M, (w, h), borderMode=cv2.BORDER_REPLICATE))
        rolls.append(reconstructed(p, texture_size=256).pose["roll"] - level.pose["roll"])
    assert 10 < abs(rolls[0]) < 20 and 10 < abs(rolls[1]) < 20
    assert np.sign(rolls[0]) == -np.sign(rolls[1])


# ---- stage 4: renders -----------------------------------------------------------------------------


def test_depth_is_nearer_at_the_nose_than_at_the_cheeks(frontal):
    r = frontal
    lm = r.landmarks_2d

    def d(p):
        x, y = np.rint(p).astype(int)
        return r.depth[y, x]

    nose = d(lm[30])
    cheeks = [d((lm[2] + lm[31]) / 2), d((lm[14] + lm[35]) / 2)]
    assert np.isfinite(nose) and np.all(np.isfinite(cheeks))
    assert nose - max(cheeks) > 15 * r.camera["scale"]  # ≥ 15 mm in pixels
    assert np.isnan(r.depth[~r.mask]).all() and np.isfinite(r.depth[r.mask]).all()
    assert r.depth.dtype == np.float32 and r.depth.shape == r.image.shape[:2]


def test_pncc_colours_are_the_mean_shape_code(frontal):
    r = frontal
    assert r.pncc.dtype == np.uint8 and r.pncc.shape == r.image.shape
    assert (r.pncc[~r.mask] == 0).all()
    on = r.pncc[r.mask].reshape(-1, 3)
    assert on.min() >= 0 and on.max() <= 255 and on.max(0).min() > 150  # the code spans each channel
    fm = REC.face_model
    code = render.pncc_colors(fm.mean_mm)
    assert code.min() == 0.0 and code.max() == 1.0
    x, y = np.rint(r.landmarks_2d[30]).astype(int)
    expected_bgr = code[fm.keypoints[30]][::-1] * 255
    assert np.abs(r.pncc[y, x].astype(float) - expected_bgr).max() < 20


def test_mask_area_is_plausible(frontal, turned):
    for r in (frontal, turned):
        box = r.face_box
        box_area = (box[2] - box[0]) * (box[3] - box[1])
        ratio = r.mask.sum() / box_area
        assert 0.8 < ratio < 3.5, ratio
        ys, xs = np.nonzero(r.mask)
        assert box[0] - 40 < np.median(xs) < box[2] + 40 and box[1] - 40 < np.median(ys) < box[3] + 40


def test_visibility_hides_the_far_side_of_a_turned_face(reconstructed, multipose, turned):
    level = reconstructed(multipose / "02463d453_-1_-2.jpg", texture_size=256)  # yaw ≈ 0
    fm = REC.face_model
    x = fm.mean_mm[:, 0] - fm.mean_mm[:, 0].mean()

    def side_visible(r):
        return r.vertex_visible[x < -30].mean(), r.vertex_visible[x > 30].mean()

    fl, fr = side_visible(level)
    print("visible fraction left/right: level", fl, fr, "turned", *side_visible(turned))
    assert abs(fl - fr) < 0.15 and min(fl, fr) > 0.4
    # the face turned toward the photo's left shows its left side (model +x) and hides the other
    tl, tr = side_visible(turned)
    assert tr > 0.6 and tl < 0.3
    assert turned.vertex_visible[fm.keypoints[30]]


# ---- stage 5: texture -----------------------------------------------------------------------------


def recompute_texture(r, size):
    """The texture stage run on the Result's own data, in the window the pipeline renders."""
    fm = REC.face_model
    face = render.render_face(r.image_vertices, fm.triangles, *r.image.shape[:2])
    facing = (r.normals @ r.camera["rotation"].T)[:, 2]
    tol = render.occlusion_tolerance(r.camera["scale"])
    geo = fm.uv_raster(texture.geometry_size(size))
    tex, weight8 = texture.make_texture(
        r.image[face.slices], face.vertices, facing, geo, fm.triangles, face.raster.depth, tol, size
    )
    return tex, weight8 / 255.0


def test_visible_texels_carry_the_photo_colour(frontal):
    r = frontal
    size = r.texture.shape[0]
    tex, weight = recompute_texture(r, size)
    np.testing.assert_array_equal(tex, r.texture)  # the pipeline's texture is this stage's output
    vis = weight >= 1.0  # texels coloured by the photo alone
    fm = REC.face_model
    uvpix = render.uv_pixel_coords(fm.uvs, size)[:, :2]
    vi = np.rint(uvpix).astype(int).clip(0, size - 1)
    sel = r.vertex_visible & vis[vi[:, 1], vi[:, 0]]
    assert sel.sum() > 10000
    from_tex = render.sample(r.texture.astype(np.float32), uvpix[sel])
    from_photo = render.sample(r.image.astype(np.float32), r.image_vertices[sel, :2])
    diff = np.abs(from_tex - from_photo)
    assert np.median(diff) < 6 and np.percentile(diff, 90) < 25
    # and a photo that is not this one would not match (the comparison can fail)
    other = render.sample(r.image[::-1].astype(np.float32), r.image_vertices[sel, :2])
    assert np.median(np.abs(from_tex - other)) > 2 * np.median(diff)


def test_hidden_side_is_filled_from_its_mirror(turned):
    r = turned
    size = r.texture.shape[0]
    tex, weight = recompute_texture(r, size)
    np.testing.assert_array_equal(tex, r.texture)
    vis, solid = weight > 0, weight >= 1.0
    mirrored = ~vis & solid[:, ::-1]
    assert mirrored.mean() > 0.1  # a turned face has a large hidden side with a visible twin
    np.testing.assert_array_equal(tex[mirrored], tex[:, ::-1][mirrored])
    # the BFM UV layout really is left-right symmetric (u ↔ 1 − u for mirrored vertices)
    from scipy.spatial import cKDTree

    fm = REC.face_model
    m = fm.mean_mm.astype(np.float64)
    mir = m.copy()
    mir[:, 0] = 2 * m[:, 0].mean() - mir[:, 0]
    _, j = cKDTree(m).query(mir)
    err = np.abs(np.column_stack([1 - fm.uvs[j, 0], fm.uvs[j, 1]]) - fm.uvs)
    assert np.percentile(err, 99) < 0.01
    # nothing is left black: texels neither visible nor mirrored are filled smoothly
    rest = ~vis & ~mirrored
    assert rest.any()
    assert (tex[rest].max(1) > 10).mean() > 0.99
    # grazing texels blend: the weight ramps instead of jumping, so there is a band of partial weights
    partial = (weight > 0) & (weight < 1)
    assert partial.mean() > 0.005


@pytest.mark.parametrize("which", ["frontal", "turned"])
@pytest.mark.parametrize("size", [1024, 2048])
def test_fast_texture_matches_the_full_size_computation(request, which, size):
    """The texture's geometry and fill are computed at ``geometry_size`` and upsampled; computing every
    map at full size instead (the stage as it was before) gives the same texture within a small
    tolerance: mean difference ≤ 1.5 levels, 99th percentile ≤ 24, ≤ 2 % of texels off by more than 16
    (occlusion edges and the smooth fill of hidden parts)."""
    r = request.getfixturevalue(which)
    fm = REC.face_model
    face = render.render_face(r.image_vertices, fm.triangles, *r.image.shape[:2])
    facing = (r.normals @ r.camera["rotation"].T)[:, 2]
    tol = render.occlusion_tolerance(r.camera["scale"])
    args = (r.image[face.slices], face.vertices, facing)
    rest = (fm.triangles, face.raster.depth, tol, size)
    fast, w_fast = texture.make_texture(*args, fm.uv_raster(texture.geometry_size(size)), *rest)
    full, w_full = texture.make_texture(*args, render.uv_raster(fm.uvs, fm.triangles, size), *rest)
    assert texture.geometry_size(size) < size and fast.shape == full.shape == (size, size, 3)
    d = np.abs(fast.astype(int) - full).max(-1)
    print(which, size, "mean", d.mean(), "p99", np.percentile(d, 99), ">16", (d > 16).mean())
    assert d.mean() <= 1.5 and np.percentile(d, 99) <= 24 and (d > 16).mean() <= 0.02
    assert np.abs(w_fast.astype(int) - w_full).mean() / 255.0 < 0.02
    # the comparison can fail: the texture of the mirrored photo is far from it
    other, _ = texture.make_texture(args[0][:, ::-1].copy(), *args[1:], fm.uv_raster(size // 4), *rest)
    assert np.abs(other.astype(int) - full).max(-1).mean() > 10


def test_push_pull_fill_keeps_known_pixels_and_fills_the_rest():
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64, 3), np.float32)
    img[:, :, 0] = np.linspace(0, 255, 64)[None, :]
    img[:, :, 1] = 100
    for frac, tol in ((0.2, 4.0), (0.05, 8.0)):  # no-information baseline (global mean): ~65
        known = rng.uniform(size=(64, 64)) < frac
        out = texture.push_pull_fill(img, known)
        np.testing.assert_array_equal(out[known], img[known])
        assert np.abs(out[~known, 1] - 100).max() < 1e-3  # a constant stays constant
        assert np.abs(out[~known, 0] - img[~known, 0]).mean() < tol  # a ramp is continued locally


# ---- the Result object ----------------------------------------------------------------------------


def test_result_fields_and_shapes(frontal):
    r = frontal
    n = 53215
    assert r.vertices.shape == (n, 3) and r.vertices.dtype == np.float32
    assert r.vertices_coarse.shape == (n, 3)
    assert r.triangles.shape == (105954, 3) and r.triangles.dtype == np.int32
    assert r.triangles.min() == 0 and r.triangles.max() == n - 1
    assert r.uvs.shape == (n, 2) and r.uvs.min() >= 0 and r.uvs.max() <= 1
    assert r.texture.shape == (512, 512, 3) and r.texture.dtype == np.uint8
    assert r.landmarks_2d.shape == (68, 2) and r.landmarks_3d.shape == (68, 3)
    assert r.detected_landmarks.shape == (68, 2) and r.face_box.shape == (4,)
    assert r.params.shape == (62,)
    assert r.image_vertices.shape == (n, 3) and r.normals.shape == (n, 3)
    np.testing.assert_allclose(np.linalg.norm(r.normals, axis=1), 1, atol=1e-4)
    assert r.vertex_visible.shape == (n,) and r.vertex_visible.dtype == bool
    assert r.mask.shape == r.image.shape[:2]
    assert set(r.pose) == {"yaw", "pitch", "roll"}
    assert set(r.camera) >= {"A", "b", "rotation", "scale"}
    np.testing.assert_allclose(r.camera["rotation"] @ r.camera["rotation"].T, np.eye(3), atol=1e-6)
    # millimetres: jaw-to-jaw width and whole-mesh extent of an adult head
    width = np.linalg.norm(r.landmarks_3d[0] - r.landmarks_3d[16])
    assert 120 < width < 170, width
    assert 150 < np.ptp(r.vertices[:, 0]) < 210
    # the camera maps the mesh onto the photo: landmarks_2d are the projected 3D landmarks
    proj = r.landmarks_3d @ r.camera["A"].T + r.camera["b"]
    np.testing.assert_allclose(proj[:, :2], r.landmarks_2d, atol=1e-2)
    assert r.refined is False or not np.array_equal(r.vertices, r.vertices_coarse)
    assert set(r.timings) >= {"load", "detect", "3dmm", "render", "texture", "total"}


def test_progress_reports_every_stage_in_order(example_photo):
    """A first run shows the model loading as its own stage (the slow part), a later one starts at the
    photo."""
    from fg3d_blender.core.pipeline import Options, Reconstructor

    rec = Reconstructor()
    for first in (True, False):
        seen: list = []
        rec.reconstruct(
            example_photo, Options(texture_size=256), progress=lambda s, f, seen=seen: seen.append((s, f))
        )
        stages = [s for s, _ in seen]
        assert stages[0] == ("models" if first else "load") and stages[-1] == "done"
        assert {"load", "detect", "3dmm", "render", "texture"} <= set(stages)
        fr = [f for _, f in seen]
        assert fr == sorted(fr) and fr[-1] == 1.0


def test_reconstruct_accepts_an_array_and_face_index(photos_dir, reconstructed):
    from fg3d_blender.core.pipeline import reconstruct

    img = two_faces(photos_dir)
    big = reconstruct(img, texture_size=256)
    small = reconstruct(img, face_index=1, texture_size=256)
    assert big.landmarks_2d[:, 0].max() < 800 < small.landmarks_2d[:, 0].min()
    assert big.camera["scale"] > small.camera["scale"]
    with pytest.raises(FG3DError, match="face index 2"):
        reconstruct(img, face_index=2, texture_size=256)


@pytest.mark.parametrize("crop", ["none", "cut_left"])
def test_renders_equal_a_full_photo_rasterization(reconstructed, photos_dir, tmp_path_factory, crop):
    """The pipeline renders only the window the mesh covers; that must equal rendering the whole photo,
    also when the face runs off the photo's edge."""
    src = photos_dir / "london_faces" / "001_03_neutral.jpg"
    if crop == "cut_left":
        p = tmp_path_factory.mktemp("cut") / "cut_left.png"
        cv2.imwrite(str(p), cv2.imread(str(src))[:, 290:])
        src = p
    r = reconstructed(src, texture_size=256)
    h, w = r.image.shape[:2]
    iv = r.image_vertices
    if crop == "cut_left":
        assert iv[:, 0].min() < 0  # the mesh really leaves the photo
    assert (iv[:, 0].max() - iv[:, 0].min()) * (iv[:, 1].max() - iv[:, 1].min()) < 0.7 * h * w
    fm = REC.face_model
    ras = render.rasterize(iv, fm.triangles, h, w)
    np.testing.assert_array_equal(r.mask, ras.mask)
    np.testing.assert_array_equal(r.depth[r.mask], ras.depth[ras.mask])
    pncc = render.interpolate(ras, fm.triangles, render.pncc_colors(fm.mean_mm))
    np.testing.assert_array_equal(r.pncc, (np.clip(pncc[:, :, ::-1], 0, 1) * 255 + 0.5).astype(np.uint8))
    tol = render.occlusion_tolerance(r.camera["scale"])
    np.testing.assert_array_equal(r.vertex_visible, render.visible_vertices(ras, iv, tol))
    facing = (r.normals @ r.camera["rotation"].T)[:, 2]
    tex, _ = texture.make_texture(r.image, iv, facing, fm.uv_raster(256), fm.triangles, ras.depth, tol)
    diff = np.abs(tex.astype(int) - r.texture)
    assert diff.max() <= 3 and (diff > 0).mean() < 1e-3  # float rounding of the window offset only
