"""FGNet network: seed-compatible state dict, checkpoint loading, shapes; UV inputs on a real photo."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fg3d_blender.core import detect, fgnet_inputs, render
from fg3d_blender.core.errors import FG3DError
from fg3d_blender.core.fgnet import FGNet, load_checkpoint
from fg3d_blender.core.image_io import load_image
from fg3d_blender.core.pipeline import default_reconstructor

REC = default_reconstructor()

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTO = SHARED / "photos" / "fg3d_examples" / "test.jpg"


def seed_state_dict_spec(size: int = 16) -> dict:
    """Names and shapes of the paper's released ``PRNet_PAF_Vis_Shape`` state dict (in_channels=3,
    out_channels=3, PAF kernel 3), written out from the paper network's layer table — independently of
    our module code — so that a real checkpoint's keys are pinned."""
    spec = {}

    def bn(prefix, c):
        spec.update(
            {
                f"{prefix}.weight": (c,),
                f"{prefix}.bias": (c,),
                f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,),
                f"{prefix}.num_batches_tracked": (),
            }
        )

    spec["mask_conv.0.weight"] = (3, 1, 3, 3)
    bn("mask_conv.1", 3)
    spec["paf_conv.0.weight"] = (3, 3, 3, 3)
    spec["input_conv.1.weight"] = (size, 6, 4, 4)  # index 0 is the asymmetric zero padding
    bn("input_conv.2", size)
    chans = [
        size,
        2 * size,
        2 * size,
        4 * size,
        4 * size,
        8 * size,
        8 * size,
        16 * size,
        16 * size,
        32 * size,
        32 * size,
    ]
    for i in range(10):
        ci, co, stride = chans[i], chans[i + 1], (2 if i % 2 == 0 else 1)
        p = f"down_conv_{i + 1}"
        if ci != co:
            spec[f"{p}.shortcut.weight"] = (co, ci, 1, 1)
        spec[f"{p}.main.0.weight"] = (co // 2, ci, 1, 1)
        bn(f"{p}.main.1", co // 2)
        j = 3 if stride == 2 else 4  # stride 1: a padding layer comes first
        spec[f"{p}.main.{j}.weight"] = (co // 2, co // 2, 4, 4)
        bn(f"{p}.main.{j + 1}", co // 2)
        spec[f"{p}.main.{j + 3}.weight"] = (co, co // 2, 1, 1)
        bn(f"{p}.activate.0", co)
    spec["center_conv.1.weight"] = (32 * size, 32 * size, 4, 4)
    bn("center_conv.2", 32 * size)
    for name, ci, co, convs in (
        ("up_conv_5", 32, 16, 2),
        ("up_conv_4", 16, 8, 2),
        ("up_conv_3", 8, 4, 2),
        ("up_conv_2", 4, 2, 1),
        ("up_conv_1", 2, 1, 1),
    ):
        spec[f"{name}.main.0.weight"] = (ci * size, co * size, 4, 4)
        bn(f"{name}.main.1", co * size)
        for t in range(convs):
            spec[f"{name}.main.{4 + 4 * t}.weight"] = (co * size, co * size, 4, 4)
            bn(f"{name}.main.{5 + 4 * t}", co * size)
    spec["output_conv.0.weight"] = (3, size, 1, 1)
    spec["output_conv.0.bias"] = (3,)
    return spec


def test_state_dict_matches_seed_network():
    got = {k: tuple(v.shape) for k, v in FGNet().state_dict().items()}
    want = seed_state_dict_spec()
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    assert got == want
    assert (
        sum(
            np.prod(s)
            for k, s in want.items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
        == 13_353_477
    )


def test_seed_format_checkpoint_loads_strict(tmp_path):
    torch.manual_seed(1)
    src = FGNet()
    for m in src.modules():  # non-trivial running statistics, so eval outputs depend on them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    src.eval()
    path = tmp_path / "_checkpoint_epoch_22.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 22}, path)
    net = load_checkpoint(path)
    assert net.width == 16 and not net.training
    x = (torch.rand(1, 3, 192, 192), torch.rand(1, 1, 64, 64), torch.rand(1, 3, 64, 64))
    with torch.inference_mode():
        assert torch.equal(net(*x), src(*x))
    # a checkpoint of another architecture must not load silently
    bad = {"state_dict": {"module." + k: v for k, v in list(src.state_dict().items())[:-1]}}
    torch.save(bad, tmp_path / "bad.pth.tar")
    with pytest.raises(FG3DError, match="does not hold FGNet weights"):
        load_checkpoint(tmp_path / "bad.pth.tar")


def test_paper_sizes_full_width():
    net = FGNet().eval()
    with torch.inference_mode():
        out = net(torch.rand(1, 3, 768, 768), torch.rand(1, 1, 256, 256), torch.rand(1, 3, 256, 256))
    assert out.shape == (1, 3, 256, 256)


@pytest.mark.parametrize("width,size", [(8, 128), (4, 64)])
def test_narrow_widths_are_fully_convolutional(width, size):
    net = FGNet(width=width).eval()
    with torch.inference_mode():
        out = net(
            torch.rand(2, 3, 3 * size, 3 * size), torch.rand(2, 1, size, size), torch.rand(2, 3, size, size)
        )
    assert out.shape == (2, 3, size, size)
    assert net.state_dict()["down_conv_10.activate.0.weight"].shape == (32 * width,)


def test_fgnet_inputs_on_real_photo():
    image = load_image(PHOTO)
    face = detect.select_face(REC.faces(image), None)
    fit = REC.fit(image, face.landmarks)
    fm = REC.face_model
    shape_range = fgnet_inputs.load_shape_range()
    inp = fgnet_inputs.fgnet_inputs(image, fit, fm, 128, shape_range)
    assert inp.paf.shape == (384, 384, 3) and inp.visibility.shape == (128, 128)
    assert inp.shape.shape == (128, 128, 3)
    assert 0.15 < float((inp.visibility > 0).mean()) < 0.9  # a frontal face: about half the layout seen
    assert inp.shape.min() >= 0.0 and inp.shape.max() <= 1.0
    # the mean shape sits in the middle of the normalisation range
    mid = fgnet_inputs.shape_offset_map(fm.mean_mm, fm, 64, shape_range)
    lo, hi = shape_range
    assert np.allclose(mid, -lo / (hi - lo), atol=1e-4)
    # the centre sample of each PAF block is the photo at the texel's projected position
    r, c = 64, 64
    x, y = inp.positions[r, c, :2] / 1.0
    rgb = image[:, :, ::-1].astype(np.float32) / 255
    want = render.sample(rgb, np.array([[x, y]], np.float32))[0] if inp.scale == 1.0 else None
    if want is not None:
        assert np.allclose(inp.paf[3 * r + 1, 3 * c + 1], want, atol=2 / 255)
    # the texel at a nose-tip vertex's UV lies where that vertex projects
    tip = fm.keypoints[30]
    iv = fit.project(fit.vertices)[tip, :2] * inp.scale
    uvpos = render.from_uv(inp.positions, fm.uvs[[tip]])[0, :2]
    assert np.linalg.norm(uvpos - iv) < 1.5
    t = inp.tensors()
    assert [tuple(a.shape) for a in t] == [(1, 3, 384, 384), (1, 1, 128, 128), (1, 3, 128, 128)]


def test_large_photo_is_sampled_at_the_canonical_scale():
    image = load_image(PHOTO)
    big = cv2.resize(image, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    face = detect.select_face(REC.faces(big), None)
    fit = REC.fit(big, face.landmarks)
    inp = fgnet_inputs.fgnet_inputs(big, fit, REC.face_model, 64, fgnet_inputs.load_shape_range())
    assert inp.scale < 1.0
    assert abs(fit.scale * inp.scale - fgnet_inputs.PAF_PX_PER_MM) < 0.05
