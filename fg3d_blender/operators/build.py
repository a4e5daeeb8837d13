"""Turn a pipeline ``Result`` into Blender data: mesh object, material, shape keys, images, camera.

Main thread only.  Everything is created new (Blender picks free names, existing data is never renamed
or edited); if anything fails half-way every datablock made so far is removed again, so the file is left
exactly as it was.

Frames: the pipeline works in millimetres in the canonical BFM frame (x right, y up, z toward the
viewer).  Blender gets metres with Z up and the face looking toward -Y, so the Front view (numpad 1)
looks straight at it: ``(X, Y, Z) = (x, -z, y) / 1000``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, cast

import bpy
import numpy as np
from mathutils import Matrix, Vector

from ..core.export import depth_image, png_bytes

#: BFM (x right, y up, z to the viewer) → Blender (X right, Y away from the viewer, Z up); det = +1.
BFM_TO_BLENDER = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
MM = 0.001
CAMERA_DISTANCE_MM = 600.0

PROP_SOURCE = "fg3d_source_photo"
PROP_YAW, PROP_PITCH, PROP_ROLL = "fg3d_yaw", "fg3d_pitch", "fg3d_roll"
PROP_REFINED = "fg3d_refined"
PROP_DEPTH, PROP_PNCC, PROP_PHOTO = "fg3d_depth", "fg3d_pncc", "fg3d_photo"
KEY_BASIS, KEY_FGNET = "Basis", "FGNet"
# 1 / core.refine.REFINE_GAIN (a test checks they agree; core.refine is not imported here: it loads
# onnxruntime): the FGNet key at its top gives the network's whole difference where the photo sees it
FGNET_SLIDER_MAX = 2.0


@dataclass
class BuildOptions:
    add_images: bool = True  # depth + PNCC as packed images
    add_camera: bool = True  # orthographic camera matching the photo, photo as background
    name: Optional[str] = None  # base name; default "FG3D_<photo stem>"


@dataclass
class Built:
    obj: Any
    camera: Any = None
    images: List[Any] = field(default_factory=list)
    collection: Any = None  # the result's own collection (face and camera)


GAP_M = 0.05  # between a new result and an earlier one it would overlap


def to_blender(vertices_mm: np.ndarray, centre_mm: np.ndarray) -> np.ndarray:
    """(N,3) BFM millimetres → (N,3) Blender metres about ``centre_mm``."""
    return ((np.asarray(vertices_mm, np.float64) - centre_mm) @ BFM_TO_BLENDER.T * MM).astype(np.float32)


def _packed_image(name: str, img_bgr: np.ndarray, created: list, non_color: bool = False):
    """A new image datablock holding ``img_bgr`` as an embedded PNG (saved inside the .blend)."""
    h, w = img_bgr.shape[:2]
    data = png_bytes(img_bgr)
    im = bpy.data.images.new(name, w, h)
    created.append(im)
    im.pack(data=data, data_len=len(data))
    im.source = "FILE"
    im.filepath_raw = f"//{im.name}.png"
    if non_color and im.colorspace_settings is not None:
        try:
            setattr(im.colorspace_settings, "name", "Non-Color")  # noqa: B010 - the stubs type this enum too narrowly
        except TypeError:  # a colour-management config without that name
            pass
    return im


def _fill_mesh(me, verts: np.ndarray, tris: np.ndarray, uvs: np.ndarray) -> None:
    n, nt = len(verts), len(tris)
    me.vertices.add(n)
    me.vertices.foreach_set("co", verts.ravel())
    me.loops.add(3 * nt)
    me.loops.foreach_set("vertex_index", tris.astype(np.int32).ravel())
    me.polygons.add(nt)
    me.polygons.foreach_set("loop_start", np.arange(0, 3 * nt, 3, dtype=np.int32))
    try:  # Blender 3.x needs the loop counts; 4.0+ derives them (read-only there)
        me.polygons.foreach_set("loop_total", np.full(nt, 3, dtype=np.int32))
    except (AttributeError, TypeError, RuntimeError):
        pass
    uv = me.uv_layers.new(name="UVMap")
    uv.data.foreach_set("uv", uvs[tris.ravel()].astype(np.float32).ravel())
    me.update(calc_edges=True)
    if me.validate(verbose=False):
        raise RuntimeError("the generated mesh failed Blender's validation")
    if hasattr(me, "shade_smooth"):
        me.shade_smooth()
    else:
        me.polygons.foreach_set("use_smooth", np.ones(nt, dtype=bool))


def _material(name: str, texture_img, created: list):
    mat = bpy.data.materials.new(name)
    created.append(mat)
    if mat.node_tree is None:  # Blender < 5.0: node trees are opt-in (5.0 always has one)
        mat.use_nodes = True
    tree = mat.node_tree
    if tree is None:
        raise RuntimeError("Blender did not give the new material a node tree")
    nodes, links = tree.nodes, tree.links
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)
    out = next((n for n in nodes if n.type == "OUTPUT_MATERIAL"), None)
    if bsdf is None:
        bsdf = nodes.new("ShaderNodeBsdfPrincipled")
    if out is None:
        out = nodes.new("ShaderNodeOutputMaterial")
        out.location = (300, 300)
    if not bsdf.outputs[0].is_linked:
        links.new(bsdf.outputs[0], out.inputs["Surface"])
    tex = cast(Any, nodes.new("ShaderNodeTexImage"))
    tex.name = tex.label = "Face texture"
    tex.image = texture_img
    tex.location = (bsdf.location.x - 400, bsdf.location.y)
    links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    if "Roughness" in bsdf.inputs:
        cast(Any, bsdf.inputs["Roughness"]).default_value = 0.6
    return mat


def _camera_pose(result, centre_mm: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
    """Orthographic camera matching the photo: (location m, 3×3 rotation, ortho_scale m) in the object frame.

    The fit projects ``image_px = A @ v_mm + b`` (weak perspective).  The camera looks along -r3 of the head
    rotation, its X/Y axes are the image's right/up directions (r1, r2), and its centre ray passes
    through the photo's centre pixel.
    """
    h, w = result.image.shape[:2]
    A = np.asarray(result.camera["A"], np.float64)
    b = np.asarray(result.camera["b"], np.float64)
    R = np.asarray(result.camera["rotation"], np.float64)
    s = float(result.camera["scale"])
    centre_px = np.array([(w - 1) / 2.0, (h - 1) / 2.0])  # pixel centres sit on integer coordinates
    p0 = np.linalg.lstsq(A[:2], centre_px - b[:2], rcond=None)[0]
    p0 = p0 - R[2] * float(R[2] @ p0) + R[2] * CAMERA_DISTANCE_MM
    loc = to_blender(p0[None], centre_mm)[0].astype(np.float64)
    rot = BFM_TO_BLENDER @ R.T  # columns: camera X (image right), Y (image up), Z (toward the camera)
    return loc, rot, max(w, h) / s * MM


def _camera(name: str, result, centre_mm: np.ndarray, face, photo_img, collection, created: list):
    """The photo camera, parented to the face (moving the face moves its camera)."""
    loc, rot, ortho = _camera_pose(result, centre_mm)
    cam = bpy.data.cameras.new(name)
    created.append(cam)
    cam.type = "ORTHO"
    cam.ortho_scale = ortho
    cam.clip_start = 0.01
    cam.clip_end = 2.0 * CAMERA_DISTANCE_MM * MM
    cam.show_background_images = True
    bg = cam.background_images.new()
    bg.image = photo_img
    bg.alpha = 1.0
    bg.frame_method = "FIT"
    bg.display_depth = "BACK"
    ob = bpy.data.objects.new(name, cam)
    created.append(ob)
    m = Matrix([list(r) for r in rot]).to_4x4()
    m.translation = Vector(loc.tolist())
    ob.parent = face
    ob.matrix_parent_inverse = Matrix.Identity(4)
    ob.matrix_basis = m  # in the face's frame
    collection.objects.link(ob)
    return ob


def _restore(created: list) -> None:
    """Remove every datablock in ``created`` (newest first)."""
    for block in reversed(created):
        try:
            if isinstance(block, bpy.types.Object):
                bpy.data.objects.remove(block, do_unlink=True)
            elif isinstance(block, bpy.types.Mesh):
                bpy.data.meshes.remove(block)
            elif isinstance(block, bpy.types.Camera):
                bpy.data.cameras.remove(block)
            elif isinstance(block, bpy.types.Material):
                bpy.data.materials.remove(block)
            elif isinstance(block, bpy.types.Image):
                bpy.data.images.remove(block)
            elif isinstance(block, bpy.types.Collection):
                bpy.data.collections.remove(block)
        except ReferenceError:  # already gone with its owner
            pass


def _add_shape_keys(ob, result, neutral, coarse, refined, centre) -> None:
    """``Basis`` = the neutral identity; one key per expression blendshape (ARKit names, values the
    fitted weights, so any ARKit capture can drive them); ``FGNet`` on top = the refinement's
    difference.  All keys together reproduce the reconstructed mesh.  The pipeline applies
    ``REFINE_GAIN`` (a half) of the network's difference, so FGNet's slider goes to 1 / gain: at its top
    it gives the network's whole difference where the photo sees the surface."""
    basis = ob.shape_key_add(name=KEY_BASIS, from_mix=False)
    basis.interpolation = "KEY_LINEAR"
    shapes = result.blendshapes
    if shapes is not None:
        for name, mode in zip(shapes.names, shapes.modes):
            key = ob.shape_key_add(name=name, from_mix=False)
            key.data.foreach_set("co", to_blender(neutral + mode, centre).ravel())
            key.slider_min, key.slider_max = 0.0, 1.0
            key.value = float(result.expression.get(name, 0.0))
    key = ob.shape_key_add(name=KEY_FGNET, from_mix=False)
    key.data.foreach_set("co", to_blender(neutral + (refined - coarse), centre).ravel())
    key.slider_min, key.slider_max, key.value = 0.0, FGNET_SLIDER_MAX, 1.0


def _free_spot(scene, start: Vector, verts_m: np.ndarray) -> Vector:
    """``start``, or the first place along +X where the new face's box overlaps no earlier result."""
    lo, hi = verts_m.min(0), verts_m.max(0)
    boxes = []  # (min corner, max corner) of each earlier result, world space
    for other in scene.objects:
        if other.type == "MESH" and PROP_SOURCE in other:
            corners = np.array([(other.matrix_world @ Vector(c))[:] for c in other.bound_box])
            boxes.append((corners.min(0), corners.max(0)))
    spot = np.array(start[:], np.float64)
    for _ in range(len(boxes) + 1):
        hit = [b1 for b0, b1 in boxes if np.all(b0 < spot + hi) and np.all(spot + lo < b1)]
        if not hit:
            break
        spot[0] = max(float(b1[0]) for b1 in hit) - lo[0] + GAP_M
    return Vector(spot.tolist())


def frame_in_views(context, ob) -> None:
    """Frame ``ob`` (selected and active) in each 3D view of the current window; nothing without one."""
    win = getattr(context, "window", None)
    if win is None or bpy.app.background:
        return
    for area in win.screen.areas:
        if area.type != "VIEW_3D":
            continue
        region = next((r for r in area.regions if r.type == "WINDOW"), None)
        if region is None:
            continue
        with context.temp_override(window=win, screen=win.screen, area=area, region=region):
            bpy.ops.view3d.view_selected(use_all_regions=False)


def add_result(
    result,
    scene,
    collection,
    view_layer=None,
    options: Optional[BuildOptions] = None,
    location=(0.0, 0.0, 0.0),
) -> Built:
    """Add the reconstruction to ``scene`` in a new collection inside ``collection``; returns the new
    objects.  The face goes to ``location``, moved along +X beside any earlier result it would overlap;
    the photo camera is parented to it and becomes the scene camera (with the photo's resolution) only
    when the scene has none.

    On any failure every datablock made here is removed and scene settings are restored before the
    exception propagates.
    """
    opts = options or BuildOptions()
    stem = os.path.splitext(os.path.basename(str(result.source)))[0] or "face"
    base = opts.name or f"FG3D_{stem}"
    created: list = []
    render = scene.render
    saved = (
        render.resolution_x,
        render.resolution_y,
        render.pixel_aspect_x,
        render.pixel_aspect_y,
        scene.camera,
    )
    try:
        coarse = np.asarray(result.vertices_coarse, np.float64)
        refined = np.asarray(result.vertices, np.float64)
        neutral = np.asarray(result.vertices_neutral, np.float64)
        centre = 0.5 * (coarse.min(0) + coarse.max(0))
        v_basis = to_blender(neutral, centre)

        me = bpy.data.meshes.new(base)
        created.append(me)
        _fill_mesh(me, v_basis, np.asarray(result.triangles), np.asarray(result.uvs))
        tex = _packed_image(f"{base}_texture", result.texture, created)
        me.materials.append(_material(base, tex, created))

        group = bpy.data.collections.new(base)
        created.append(group)
        collection.children.link(group)
        ob = bpy.data.objects.new(base, me)
        created.append(ob)
        ob.location = _free_spot(scene, Vector(tuple(location)), v_basis)
        group.objects.link(ob)
        _add_shape_keys(ob, result, neutral, coarse, refined, centre)
        if me.shape_keys is not None:
            me.shape_keys.use_relative = True

        ob[PROP_SOURCE] = str(result.source)
        ob[PROP_YAW] = float(result.pose["yaw"])
        ob[PROP_PITCH] = float(result.pose["pitch"])
        ob[PROP_ROLL] = float(result.pose["roll"])
        ob[PROP_REFINED] = bool(result.refined)

        built = Built(obj=ob, collection=group)
        photo = None
        if opts.add_camera or opts.add_images:
            photo = _packed_image(f"{base}_photo", result.image, created)
            ob[PROP_PHOTO] = photo
            built.images.append(photo)
        if opts.add_images:
            depth = _packed_image(f"{base}_depth", depth_image(result), created, non_color=True)
            pncc = _packed_image(f"{base}_pncc", result.pncc, created, non_color=True)
            ob[PROP_DEPTH], ob[PROP_PNCC] = depth, pncc  # ID properties keep them in the saved file
            built.images += [depth, pncc]
        if opts.add_camera:
            built.camera = _camera(f"{base}_camera", result, centre, ob, photo, group, created)
            if scene.camera is None:  # the scene's render settings change only with its camera
                scene.camera = built.camera
                h, w = result.image.shape[:2]
                render.resolution_x, render.resolution_y = int(w), int(h)
                render.pixel_aspect_x = render.pixel_aspect_y = 1.0

        if view_layer is not None:
            for other in view_layer.objects:
                if other.select_get(view_layer=view_layer):
                    other.select_set(False, view_layer=view_layer)
            ob.select_set(True, view_layer=view_layer)
            view_layer.objects.active = ob
        return built
    except BaseException:
        _restore(created)
        (
            render.resolution_x,
            render.resolution_y,
            render.pixel_aspect_x,
            render.pixel_aspect_y,
            scene.camera,
        ) = saved
        raise
