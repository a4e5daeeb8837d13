"""``export-onnx``: the ONNX graphs the pipeline runs on onnxruntime, written from our torch modules.

The graphs hold no weights.  Every parameter is an initializer named as in the torch state dict
(``dw2_1.conv_dw.weight``, ``down_conv_1.main.0.weight`` …) and marked as external data, which the
runtime (``fg3d_blender.core.onnx_models``) supplies from the weight files themselves, read without torch.
So the regressor's graph, our own artifact, carries none of the third-party (BFM-bound) numbers and can be
committed, and the FGNet graph serves any weights of its width.  BatchNorm stays a node with its four
tensors; onnxruntime folds it into the convolution when the session is made.

The graphs are built with the onnx helper API from the modules' own layers (kernel, stride, padding,
groups, eps are read from them), mirroring each ``forward``; ``tests/test_onnx_models.py`` checks that the
committed files are what this writes and that onnxruntime's outputs equal torch's.  Dev only: needs
torch and onnx.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper
from torch import nn

from fg3d_blender.core.assets import bundled, models_dir, sha256_of, write_bundled
from fg3d_blender.core.fgnet import FGNet, ResBlock, UpBlock
from fg3d_blender.core.mobilenet import _BLOCKS, MobileNetV1
from fg3d_blender.core.onnx_models import FGNET_GRAPH_ROLE, REGRESSOR_GRAPH_ROLE, REGRESSOR_WEIGHTS

OPSET = 17
IR_VERSION = 8  # opset 17's; read by every onnxruntime since 1.13
GRAPH_LICENCE = "BSD-2-Clause (this project's own graph; it holds no weights)"


class _Graph:
    """Nodes and weight-less initializers of one graph, named after the torch state dict."""

    def __init__(self, state: Dict[str, np.ndarray], location: str):
        self.state, self.location = state, location
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[TensorProto] = []
        self._used: set = set()
        self._offset = 0
        self._count = 0

    def weight(self, name: str) -> str:
        if name in self._used:
            return name
        value = self.state[name]
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(value.shape))
        t.data_location = TensorProto.EXTERNAL
        length = int(value.size) * 4
        for key, val in (("location", self.location), ("offset", str(self._offset)), ("length", str(length))):
            t.external_data.add(key=key, value=val)
        self._offset += length
        self.initializers.append(t)
        self._used.add(name)
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        """A small constant that is part of the graph itself (pads), not a weight."""
        self.initializers.append(helper.make_tensor(name, TensorProto.INT64, value.shape, value.ravel()))
        return name

    def node(self, op: str, inputs: List[str], **attrs) -> str:
        self._count += 1
        out = f"{op.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _conv_node(g: _Graph, name: str, m, x: str, op: str, **extra) -> str:
    """A Conv or ConvTranspose node with the module's weights, kernel, strides, padding and dilation."""
    inputs = [x, g.weight(f"{name}.weight")] + ([g.weight(f"{name}.bias")] if m.bias is not None else [])
    ph, pw = m.padding
    return g.node(
        op,
        inputs,
        kernel_shape=list(m.kernel_size),
        strides=list(m.stride),
        pads=[ph, pw, ph, pw],
        dilations=list(m.dilation),
        **extra,
    )


def _conv(g: _Graph, name: str, m: nn.Conv2d, x: str) -> str:
    if not isinstance(m.padding, tuple) or m.padding_mode != "zeros":
        raise ValueError(f"{name}: only explicit zero padding is exported")
    return _conv_node(g, name, m, x, "Conv", group=m.groups)


def _tconv(g: _Graph, name: str, m: nn.ConvTranspose2d, x: str) -> str:
    if any(m.output_padding) or m.groups != 1:
        raise ValueError(f"{name}: output padding and groups are not exported")
    return _conv_node(g, name, m, x, "ConvTranspose")


def _bn(g: _Graph, name: str, m: nn.BatchNorm2d, x: str) -> str:
    ins = [g.weight(f"{name}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
    return g.node("BatchNormalization", [x] + ins, epsilon=float(m.eps))


def _pad(g: _Graph, name: str, m: nn.ConstantPad2d, x: str) -> str:
    if m.value != 0.0:
        raise ValueError(f"{name}: only zero padding is exported")
    left, right, top, bottom = m.padding
    pads = g.constant(f"{name}.pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
    return g.node("Pad", [x, pads], mode="constant")


def _layer(g: _Graph, name: str, m: nn.Module, x: str) -> str:
    if isinstance(m, nn.Sequential):
        for i, child in enumerate(m):
            x = _layer(g, f"{name}.{i}", child, x)
        return x
    if isinstance(m, nn.ConvTranspose2d):
        return _tconv(g, name, m, x)
    if isinstance(m, nn.Conv2d):
        return _conv(g, name, m, x)
    if isinstance(m, nn.BatchNorm2d):
        return _bn(g, name, m, x)
    if isinstance(m, nn.ReLU):
        return g.node("Relu", [x])
    if isinstance(m, nn.ConstantPad2d):
        return _pad(g, name, m, x)
    if isinstance(m, nn.Identity):
        return x
    if isinstance(m, ResBlock):  # ResBlock.forward
        s = _layer(g, f"{name}.shortcut", m.shortcut, x)
        return _layer(
            g, f"{name}.activate", m.activate, g.node("Add", [s, _layer(g, f"{name}.main", m.main, x)])
        )
    if isinstance(m, UpBlock):
        return _layer(g, f"{name}.main", m.main, x)
    raise ValueError(f"{name}: {type(m).__name__} is not exported")


def _float_input(name: str, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _model(g: _Graph, name: str, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fg3d_blender export-onnx"
    )
    model.ir_version = IR_VERSION
    filled = onnx.ModelProto()  # the checker wants external data on disk: check a copy with zeros inline
    filled.CopyFrom(model)
    for t in filled.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            t.raw_data = bytes(4 * int(np.prod(t.dims)))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
    onnx.checker.check_model(filled, full_check=True)
    return model


def regressor_graph(net: MobileNetV1) -> onnx.ModelProto:
    """crops (N,3,120,120), normalised → params (N,62) whitened, landmarks (N,136): MobileNetV1's
    ``features`` then both heads."""
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    g = _Graph(state, Path(REGRESSOR_WEIGHTS).name)
    x = "crops"
    x = g.node("Relu", [_bn(g, "bn1", net.bn1, _conv(g, "conv1", net.conv1, x))])
    for name, *_ in _BLOCKS:  # DepthwiseSeparable.forward
        blk = getattr(net, name)
        x = g.node("Relu", [_bn(g, f"{name}.bn_dw", blk.bn_dw, _conv(g, f"{name}.conv_dw", blk.conv_dw, x))])
        x = g.node(
            "Relu", [_bn(g, f"{name}.bn_sep", blk.bn_sep, _conv(g, f"{name}.conv_sep", blk.conv_sep, x))]
        )
    feat = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    heads = []
    for head in ("fc_param", "fc_lm"):
        heads.append(g.node("Gemm", [feat, g.weight(f"{head}.weight"), g.weight(f"{head}.bias")], transB=1))
    g.nodes.append(helper.make_node("Identity", [heads[0]], ["params"], name="params"))
    g.nodes.append(helper.make_node("Identity", [heads[1]], ["landmarks"], name="landmarks"))
    return _model(
        g,
        "mobilenet_v1_05_3dmm",
        [_float_input("crops", ["N", 3, 120, 120])],
        [_float_input("params", ["N", net.fc_param.out_features]), _float_input("landmarks", ["N", 136])],
    )


def fgnet_graph(net: FGNet, location: str) -> onnx.ModelProto:
    """paf (1,3,kS,kS), visibility (1,1,S,S), shape (1,3,S,S) → difference (1,3,S,S) mm: ``FGNet.forward``."""
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    g = _Graph(state, location)
    x = g.node(
        "Mul",
        [_layer(g, "paf_conv", net.paf_conv, "paf"), _layer(g, "mask_conv", net.mask_conv, "visibility")],
    )
    x = _layer(g, "input_conv", net.input_conv, g.node("Concat", [x, "shape"], axis=1))
    for i in range(10):
        x = _layer(g, f"down_conv_{i + 1}", getattr(net, f"down_conv_{i + 1}"), x)
    x = _layer(g, "center_conv", net.center_conv, x)
    for name in ("up_conv_5", "up_conv_4", "up_conv_3", "up_conv_2", "up_conv_1"):
        x = _layer(g, name, getattr(net, name), x)
    x = _layer(g, "output_conv", net.output_conv, x)
    g.nodes.append(helper.make_node("Identity", [x], ["difference"], name="difference"))
    k = net.paf_k
    return _model(
        g,
        f"fgnet_w{net.width}",
        [
            _float_input("paf", ["N", 3, f"{k}S", f"{k}S"]),
            _float_input("visibility", ["N", 1, "S", "S"]),
            _float_input("shape", ["N", 3, "S", "S"]),
        ],
        [_float_input("difference", ["N", 3, "S", "S"])],
    )


def graph_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def export(models: Path, log=print) -> List[dict]:
    """Write the regressor's and the bundled FGNet's graphs into ``models`` and record them (roles
    ``regressor_graph``, ``fgnet_graph``) in its ``assets.json``; returns the entries."""
    fg = bundled("fgnet")
    if fg is None:
        raise SystemExit("no bundled FGNet weights in models/assets.json to export a graph for")
    width, paf_k = int(fg["meta"]["width"]), int(fg["meta"].get("paf_k", 3))
    jobs = [
        (
            REGRESSOR_GRAPH_ROLE,
            "mb05_120x120.onnx",
            regressor_graph(MobileNetV1()),
            {"weights": REGRESSOR_WEIGHTS},
        ),
        (
            FGNET_GRAPH_ROLE,
            f"fgnet_w{width}.onnx",
            fgnet_graph(FGNet(width=width, paf_k=paf_k), f"fgnet_w{width}.pt"),
            {"weights_role": "fgnet", "width": width, "paf_k": paf_k},
        ),
    ]
    entries = []
    for role, name, model, meta in jobs:
        dst = models / name
        dst.write_bytes(graph_bytes(model))
        entry = {
            "role": role,
            "path": name,
            "size": dst.stat().st_size,
            "sha256": sha256_of(dst),
            "licence": GRAPH_LICENCE,
            "meta": dict(meta, opset=OPSET),
        }
        write_bundled(models, entry)
        log(f"wrote {dst} ({entry['size']} bytes, sha256 {entry['sha256'][:12]}…)")
        entries.append(entry)
    return entries


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", metavar="DIR", help="models folder to write (default: the checkout's)")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    entries = export(Path(args.models) if args.models else models_dir())
    if args.json:
        print(json.dumps(entries))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="export-onnx", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
