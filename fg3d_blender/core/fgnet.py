"""FGNet: the paper's PRNet-style UV encoder–decoder that predicts a shape-difference map.

Inputs (batch, channels first): the Pose Adaptive Feature image (3, k·S, k·S), the visibility map
(1, S, S) and the normalised 3DMM shape-offset map (3, S, S).  A k×k/k convolution turns the PAF image
into S×S features, which a 3×3 convolution of the visibility map gates; with the shape map they go
through an encoder of ten residual blocks (five stride-2, S → S/32), a transposed-convolution centre
and five up blocks back to S×S, and a 1×1 head gives the shape difference (mm; the paper writes
"× 1e-3" of µm).  The network is fully convolutional, so any S divisible by 32 works.

``width`` is the channel count of the first stage (the paper: 16, doubling at every stride, 512 at the
bottom).  At the default width the state-dict names and shapes are those of the paper's released
checkpoint (``PRNet_PAF_Vis_Shape``), which ``load_checkpoint`` reads (``{'state_dict': …}``, keys
prefixed ``module.``) with ``strict=True``.  Our own trained weights use a narrower width.

The pipeline runs the network on onnxruntime (``onnx_models.FGNetModel``, graph written from this module
by ``export-onnx``); the torch module is for training, the export and checking the two agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .checkpoint import load_state, read_checkpoint
from .errors import FG3DError
from .pth_reader import strip_module_prefix

BN_EPS = 1e-3
SEED_BN_MOMENTUM = 1e-3  # the paper's setting (running stats move very slowly); training uses 0.1


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=SEED_BN_MOMENTUM)


def _conv_same(c_in: int, c_out: int, k: int, stride: int = 1):
    """A 'same' convolution as a list of layers: padding split low/high (odd totals pad one more at the
    bottom/right, like TensorFlow), as one module when the split is even."""
    total = max(k - stride, 0)
    if total % 2 == 0:
        return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=total // 2, bias=False)]
    lo = total // 2
    return [
        nn.ConstantPad2d((lo, lo + 1, lo, lo + 1), 0.0),
        nn.Conv2d(c_in, c_out, k, stride=stride, bias=False),
    ]


class ResBlock(nn.Module):
    """Bottleneck residual block: 1×1 (c/2) → 4×4 stride s (c/2) → 1×1 (c), BN+ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if c_in != c_out else nn.Identity()
        )
        mid = c_out // 2
        self.main = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False),
            _bn(mid),
            nn.ReLU(inplace=True),
            *_conv_same(mid, mid, 4, stride),
            _bn(mid),
            nn.ReLU(inplace=True),
            *_conv_same(mid, c_out, 1, 1),
        )
        self.activate = nn.Sequential(_bn(c_out), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.activate(self.shortcut(x) + self.main(x))


def _tconv_same(c: int):
    """4×4 stride-1 transposed convolution that keeps the size (pad 2/1 first, then crop 3)."""
    return [
        nn.ConstantPad2d((2, 1, 2, 1), 0.0),
        nn.ConvTranspose2d(c, c, 4, stride=1, padding=3, bias=False),
        _bn(c),
        nn.ReLU(inplace=True),
    ]


class UpBlock(nn.Module):
    """×2 transposed convolution followed by ``convs`` size-keeping transposed convolutions."""

    def __init__(self, c_in: int, c_out: int, convs: int = 2):
        super().__init__()
        layers = [
            nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
            _bn(c_out),
            nn.ReLU(inplace=True),
        ]
        for _ in range(convs):
            layers += _tconv_same(c_out)
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


class FGNet(nn.Module):
    """The paper's network (``PRNet_PAF_Vis_Shape``) with a configurable first-stage ``width``."""

    def __init__(self, width: int = 16, paf_k: int = 3, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        w, c = width, in_channels
        self.width, self.paf_k = width, paf_k
        self.mask_conv = nn.Sequential(*_conv_same(1, c, 3), _bn(c), nn.ReLU(inplace=True))
        self.paf_conv = nn.Sequential(*_conv_same(c, c, paf_k, paf_k))
        self.input_conv = nn.Sequential(*_conv_same(c + 3, w, 4), _bn(w), nn.ReLU(inplace=True))
        chans = [w, 2 * w, 2 * w, 4 * w, 4 * w, 8 * w, 8 * w, 16 * w, 16 * w, 32 * w, 32 * w]
        for i in range(10):
            setattr(self, f"down_conv_{i + 1}", ResBlock(chans[i], chans[i + 1], 2 if i % 2 == 0 else 1))
        self.center_conv = nn.Sequential(*_tconv_same(32 * w))
        self.up_conv_5 = UpBlock(32 * w, 16 * w)
        self.up_conv_4 = UpBlock(16 * w, 8 * w)
        self.up_conv_3 = UpBlock(8 * w, 4 * w)
        self.up_conv_2 = UpBlock(4 * w, 2 * w, 1)
        self.up_conv_1 = UpBlock(2 * w, w, 1)
        self.output_conv = nn.Sequential(nn.Conv2d(w, out_channels, 1))

    def forward(self, paf, visibility, shape):
        x = self.paf_conv(paf) * self.mask_conv(visibility)
        x = self.input_conv(torch.cat([x, shape], 1))
        for i in range(10):
            x = getattr(self, f"down_conv_{i + 1}")(x)
        x = self.center_conv(x)
        for name in ("up_conv_5", "up_conv_4", "up_conv_3", "up_conv_2", "up_conv_1"):
            x = getattr(self, name)(x)
        return self.output_conv(x)

    def predict(self, paf: np.ndarray, visibility: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """The difference map (B,3,S,S) for numpy inputs (batch first, channels first), like
        ``onnx_models.FGNetModel.predict``."""
        with torch.inference_mode():
            args = [
                torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (paf, visibility, shape)
            ]
            return self(*args).numpy()

    def set_bn_momentum(self, momentum: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum


def load_checkpoint(path: Union[str, Path], width: Optional[int] = None, paf_k: int = 3) -> FGNet:
    """An ``FGNet`` in eval mode from a checkpoint: the paper's format (``{'state_dict': {'module.…'}}``)
    or ours (``{'state_dict', 'width', 'paf_k', …}``).  Loads with ``strict=True``, on the CPU, float32;
    a file that is not FGNet weights gives one line (``FG3DError``)."""
    ck = read_checkpoint(path, "FGNet weights file")
    state = ck.get("state_dict", ck)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FG3DError(f"{path}: does not hold FGNet weights (no state_dict of tensors)")
    state = strip_module_prefix(state)
    try:
        if width is None:
            width = int(ck.get("width", 0)) or int(state["input_conv.1.weight"].shape[0])
        paf_k = int(ck.get("paf_k", paf_k))
    except (KeyError, IndexError, TypeError, ValueError):
        raise FG3DError(f"{path}: does not hold FGNet weights (no input layer)") from None
    net = FGNet(width=width, paf_k=paf_k)
    load_state(net, {k: v.float() for k, v in state.items()}, path, "FGNet")
    return net.eval()
