"""Writes tests/fixtures/onnx/pointwise_head.onnx: the smallest model with the inference contract
(input `image` float32 [N,4,X,Y,Z], dynamic N and spatial dims; output `logits` [N,3,X,Y,Z]):
one 1x1x1 Conv 4->3 with bias, as SegResNet's head, with fixed weights w[o,i] = (o+1)/10 - i/20,
b[o] = o/4 - 0.25. Used by brats-inference's ONNX Runtime smoke test.

Run: tests/monai/.venv/bin/python tests/monai/make_onnx_smoke_fixture.py
"""
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

w = np.array([[(o + 1) / 10 - i / 20 for i in range(4)] for o in range(3)], dtype=np.float32).reshape(3, 4, 1, 1, 1)
b = np.array([o / 4 - 0.25 for o in range(3)], dtype=np.float32)
graph = helper.make_graph(
    [helper.make_node("Conv", ["image", "head.weight", "head.bias"], ["logits"], kernel_shape=[1, 1, 1])],
    "pointwise_head",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, "X", "Y", "Z"])],
    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, "X", "Y", "Z"])],
    [numpy_helper.from_array(w, "head.weight"), numpy_helper.from_array(b, "head.bias")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="brats-tests")
model.ir_version = 8
onnx.checker.check_model(model, full_check=True)
out = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "onnx" / "pointwise_head.onnx"
out.write_bytes(model.SerializeToString())
print(out, out.stat().st_size, "bytes")
