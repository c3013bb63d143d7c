"""Writes tests/fixtures/onnx/pointwise_head.onnx: the smallest model with the inference contract
(input `image` float32 [N,4,X,Y,Z], dynamic N and spatial dims; output `logits` [N,3,X,Y,Z]):
one 1x1x1 Conv 4->3 with bias, as SegResNet's head, with fixed weights w[o,i] = (o+1)/10 - i/20,
b[o] = o/4 - 0.25. Used by brats-inference's ONNX Runtime smoke test. Also
pointwise_head_2ch.onnx, the same with 2 output channels: a model that breaks the contract.

Run: tests/monai/.venv/bin/python tests/monai/make_onnx_smoke_fixture.py
"""
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

def build(out_channels, name):
    w = np.array([[(o + 1) / 10 - i / 20 for i in range(4)] for o in range(out_channels)], dtype=np.float32).reshape(out_channels, 4, 1, 1, 1)
    b = np.array([o / 4 - 0.25 for o in range(out_channels)], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "head.weight", "head.bias"], ["logits"], kernel_shape=[1, 1, 1])],
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, "X", "Y", "Z"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_channels, "X", "Y", "Z"])],
        [numpy_helper.from_array(w, "head.weight"), numpy_helper.from_array(b, "head.bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="brats-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


fixtures = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "onnx"
for channels, name in [(3, "pointwise_head"), (2, "pointwise_head_2ch")]:
    out = fixtures / f"{name}.onnx"
    out.write_bytes(build(channels, name).SerializeToString())
    print(out, out.stat().st_size, "bytes")
