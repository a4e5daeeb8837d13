"""MobileNet-v1 (width 0.5) that regresses 3DMM parameters from a 120×120 face crop.

Own implementation of the architecture whose weights 3DDFA_V2 publishes (``mb05_120x120.pth``): a
3×3/2 stem and 13 depthwise-separable blocks, global average pooling, a 62-d parameter head
(``fc_param``: 12 pose + 40 shape + 10 expression, whitened) and a 136-d landmark head (``fc_lm``).

The pipeline runs this network on onnxruntime (``onnx_models.Regressor``, graph written from this module
by ``export-onnx``); the torch module is for the export and for checking the two agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .checkpoint import load_state, read_checkpoint
from .pth_reader import strip_module_prefix

# (name, in, out, stride) for width multiplier 0.5
_BLOCKS = [
    ("dw2_1", 16, 32, 1),
    ("dw2_2", 32, 64, 2),
    ("dw3_1", 64, 64, 1),
    ("dw3_2", 64, 128, 2),
    ("dw4_1", 128, 128, 1),
    ("dw4_2", 128, 256, 2),
    ("dw5_1", 256, 256, 1),
    ("dw5_2", 256, 256, 1),
    ("dw5_3", 256, 256, 1),
    ("dw5_4", 256, 256, 1),
    ("dw5_5", 256, 256, 1),
    ("dw5_6", 256, 512, 2),
    ("dw6", 512, 512, 1),
]


class DepthwiseSeparable(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn_dw = nn.BatchNorm2d(c_in)
        self.conv_sep = nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False)
        self.bn_sep = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = torch.relu(self.bn_dw(self.conv_dw(x)))
        return torch.relu(self.bn_sep(self.conv_sep(x)))


class MobileNetV1(nn.Module):
    def __init__(self, num_params: int = 62, num_landmarks: int = 136):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        for name, c_in, c_out, stride in _BLOCKS:
            setattr(self, name, DepthwiseSeparable(c_in, c_out, stride))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc_param = nn.Linear(512, num_params)
        self.fc_lm = nn.Linear(512, num_landmarks)

    def features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for name, *_ in _BLOCKS:
            x = getattr(self, name)(x)
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.fc_param(self.features(x))

    def predict(self, x: np.ndarray):
        """Normalised crops (B,3,120,120) → (params (B,62), landmarks (B,136)), numpy in and out, like
        ``onnx_models.Regressor.predict``."""
        with torch.inference_mode():
            feat = self.features(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            return self.fc_param(feat).numpy(), self.fc_lm(feat).numpy()


def load_regressor(path) -> MobileNetV1:
    """Load 3DDFA_V2's checkpoint (``{'state_dict': {'module.…': …}}``) safely and strictly."""
    ckpt = read_checkpoint(path, "3DMM regressor weights file")
    state = strip_module_prefix(ckpt.get("state_dict", ckpt))
    model = MobileNetV1()
    load_state(model, state, path, "MobileNet regressor")
    return model.eval()
