"""Make ``docs/blender_render.png``: the public-domain astronaut photo (scikit-image) beside Workbench
renders of what the add-on builds from it, headless with the bpy module:

    FG3D_ASSET_MIRROR=../shared/models .venv/bin/python benchmarks/make_blender_render.py [OUT.png]

Panels: the photo · the bare shape seen through the camera the add-on adds, over the photo (it lines
up) · the textured face from a three-quarter view · the bare shape from the same view.
"""

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bpy  # noqa: E402
from mathutils import Matrix, Vector  # noqa: E402

import fg3d_blender  # noqa: E402

SIZE = 512


def render(scene, camera, color_type: str, path: str, transparent: bool = False) -> np.ndarray:
    scene.camera = camera
    scene.display.shading.color_type = color_type
    scene.render.film_transparent = transparent
    scene.render.image_settings.color_mode = "RGBA" if transparent else "RGB"
    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)
    return cv2.imread(path, cv2.IMREAD_UNCHANGED)


def main(out: Path) -> None:
    import skimage.data  # the demo photo; imported after bpy has started

    tmp = Path(tempfile.mkdtemp(prefix="fg3d-render-"))
    photo = tmp / "astronaut.png"
    cv2.imwrite(str(photo), skimage.data.astronaut()[:, :, ::-1])
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
    fg3d_blender.register()
    t0 = time.perf_counter()
    bpy.ops.fg3d.reconstruct(filepath=str(photo), add_camera=True, texture_size="1024")
    print(f"reconstruct operator: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    scene = bpy.context.scene
    face = bpy.context.view_layer.objects.active
    cam = bpy.data.objects[face.name + "_camera"]

    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.film_transparent = False
    scene.display.shading.light = "STUDIO"
    scene.display.shading.show_specular_highlight = False
    world = bpy.data.worlds.new("grey")
    world.color = (0.18, 0.18, 0.2)
    scene.world = world
    h, w = cv2.imread(str(photo)).shape[:2]
    scene.render.resolution_x, scene.render.resolution_y = w, h
    scene.render.resolution_percentage = 100
    overlay = render(scene, cam, "SINGLE", str(tmp / "front.png"), transparent=True)
    alpha = overlay[:, :, 3:4].astype(np.float32) / 255.0 * 0.85
    front = (overlay[:, :, :3] * alpha + cv2.imread(str(photo)) * (1.0 - alpha)).astype(np.uint8)

    # a three-quarter view: orthographic camera 40° around the face, looking at its centre
    centre = face.matrix_world @ (sum((Vector(c) for c in face.bound_box), Vector()) / 8.0)
    direction = Matrix.Rotation(math.radians(-40.0), 3, "Z") @ Vector((0.0, -1.0, 0.05))
    cam_data = bpy.data.cameras.new("three_quarter")
    cam_data.type, cam_data.ortho_scale, cam_data.clip_end = "ORTHO", 0.30, 5.0
    side = bpy.data.objects.new("three_quarter", cam_data)
    scene.collection.objects.link(side)
    side.location = centre + direction.normalized() * 1.0
    side.rotation_euler = (-direction).to_track_quat("-Z", "Y").to_euler()
    scene.render.resolution_x = scene.render.resolution_y = SIZE
    textured = render(scene, side, "TEXTURE", str(tmp / "side_tex.png"))
    shape = render(scene, side, "SINGLE", str(tmp / "side_shape.png"))

    panels = [cv2.imread(str(photo)), front, textured, shape]
    panels = [
        cv2.resize(p, (SIZE * p.shape[1] // p.shape[0], SIZE), interpolation=cv2.INTER_AREA) for p in panels
    ]
    gap = np.full((SIZE, 8, 3), 255, np.uint8)
    strip = np.concatenate(sum(([p, gap] for p in panels), [])[:-1], axis=1)
    strip = cv2.resize(
        strip, (strip.shape[1] * 3 // 4, strip.shape[0] * 3 // 4), interpolation=cv2.INTER_AREA
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", strip)
    assert ok
    part = out.with_name(f".{out.name}.part")
    part.write_bytes(buf.tobytes())
    os.replace(part, out)
    print(f"{out} ({strip.shape[1]}×{strip.shape[0]})", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "blender_render.png")
    os._exit(0)
