"""Synthetic novel views for FGNet training: a real photo's face turned away from the camera."""

from __future__ import annotations

import numpy as np

from fg3d_blender.core import detect
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import default_reconstructor
from training import novel_view

REC = default_reconstructor()


def test_turned_face_is_found_and_fitted_at_the_new_pose(photos_dir):
    fm = REC.face_model
    image = load_image(sorted((photos_dir / "london_faces").glob("*.jpg"))[0])
    fit = REC.fit(image, detect.select_face(REC.faces(image), None).landmarks)
    drawn = fit.project(fit.vertices)
    yaw0 = fit.pose_degrees["yaw"]
    turn = novel_view.away_yaw(yaw0, 25.0, np.random.default_rng(0))
    assert abs(turn) == 25.0 and (abs(yaw0) <= 8.0 or np.sign(turn) == np.sign(yaw0))
    moved = novel_view.turned(drawn, turn)
    # a rotation about the centroid: shape and centroid kept
    assert np.allclose(moved.mean(0), drawn.mean(0), atol=1e-3)
    assert np.allclose(
        np.linalg.norm(moved - moved.mean(0), axis=1),
        np.linalg.norm(drawn - drawn.mean(0), axis=1),
        atol=1e-2,
    )
    view, mask = novel_view.render_view(image, drawn, moved, fm.triangles)
    assert view.shape == image.shape and view.dtype == np.uint8 and 0.02 < mask.mean() < 0.9
    # drawn without a turn, the face comes back as it was in the photo (colours resampled at the vertices)
    same, same_mask = novel_view.render_view(image, drawn, drawn, fm.triangles)
    diff = np.abs(same.astype(np.float32) - image.astype(np.float32))
    assert diff[same_mask].mean() < 6.0 and diff[~same_mask].mean() > diff[same_mask].mean()
    faces = REC.faces(view, use_cnn=False)
    assert faces, "HOG finds no face in the turned render"
    face = detect.nearest_face(faces, moved[fm.keypoints, :2].mean(0))
    refit = REC.fit(view, face.landmarks)
    # the pipeline sees the new pose: yaw changed by about the turn, in its direction
    change = refit.pose_degrees["yaw"] - yaw0
    assert abs(change - turn) < 10.0, (yaw0, refit.pose_degrees["yaw"], turn)
    # and its landmarks land near the drawn mesh's keypoints (the view's exact landmarks)
    err = np.linalg.norm(refit.project(refit.vertices[fm.keypoints])[:, :2] - moved[fm.keypoints, :2], axis=1)
    size = np.ptp(moved[fm.keypoints, 0])
    assert err.mean() < 0.04 * size
