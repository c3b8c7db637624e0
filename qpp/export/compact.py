"""Rewrites of an exported ONNX QDQ graph that keep its function and make it faster or smaller.

- ``ReduceMean`` over the spatial axes of a 4-D tensor (``torch.mean(x, (2, 3), keepdim=True)``,
  e.g. a squeeze-excite block) becomes ``GlobalAveragePool``, the op that ORT's QDQ optimizer
  turns into its integer ``QLinearGlobalAveragePool`` (same average, in integers).
- ``x * clip(x + 3, 0, 6) / 6`` becomes one ``HardSwish``: one pass over the tensor instead of
  four (ORT computes the same values; in PP-OCR these float ops cost more than the gap to ORT's
  own int8 model).
- ``DequantizeLinear`` zero points that are all zero are dropped where ONNX's default (0) means
  the same: int8 weights and int32 biases of convs (a uint8 zero point must stay, it sets the
  type; ORT fuses Gemm into QGemm only with the zero point given).
- Intermediate values and initializers get short names (``v1f``, ``i2a``) and nodes none: the
  exporter's names (``dequantize_per_channel_55``) are stored once per use and weigh as much as
  a small model's per-channel scales.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

_ZERO_POINT_FREE_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.INT32)


def _ranks(proto: Any) -> dict[str, int]:
    """Value name -> rank, from the exporter's shape annotations."""
    graph = proto.graph
    ranks = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks


def _constant_ints(proto: Any, name: str) -> list[int] | None:
    for initializer in proto.graph.initializer:
        if initializer.name == name:
            return [int(v) for v in numpy_helper.to_array(initializer).reshape(-1)]
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return [int(v) for v in numpy_helper.to_array(node.attribute[0].t).reshape(-1)]
    return None


def global_average_pools(proto: Any) -> int:
    """Replace spatial ``ReduceMean`` of 4-D tensors (keepdims) by ``GlobalAveragePool``; must run
    before the shape annotations are stripped. Returns how many were replaced."""
    ranks = _ranks(proto)
    replaced = 0
    for node in proto.graph.node:
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = attributes.get("axes")
        if axes is None and len(node.input) > 1:
            axes = _constant_ints(proto, node.input[1])
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        if attributes.get("keepdims", 1) != 1:
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        replaced += 1
    return replaced


def _scalar(values: dict[str, np.ndarray], name: str) -> float | None:
    value = values.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def hard_swishes(proto: Any) -> int:
    """Replace ``x * clip(x + 3, 0, 6) / 6`` (four float ops, as torch and Paddle write
    hardswish) by ONNX's one ``HardSwish`` op (opset 14+). Returns how many were replaced."""
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 14:
        return 0
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    graph_outputs = {value.name for value in graph.output}

    def sole_user(node: Any, op_type: str) -> Any | None:
        found = users.get(node.output[0], [])
        if node.output[0] in graph_outputs or len(found) != 1 or found[0].op_type != op_type:
            return None
        return found[0]

    replaced, removed = 0, []
    for add in graph.node:
        if add.op_type != "Add" or _scalar(values, add.input[1]) != 3.0:
            continue
        clip = sole_user(add, "Clip")
        mul = clip and sole_user(clip, "Mul")
        div = mul and sole_user(mul, "Div")
        if not (clip and mul and div) or len(clip.input) != 3:
            continue
        x = add.input[0]
        if (_scalar(values, clip.input[1]), _scalar(values, clip.input[2])) != (0.0, 6.0):
            continue
        if sorted(mul.input) != sorted([x, clip.output[0]]) or div.input[0] != mul.output[0]:
            continue
        if _scalar(values, div.input[1]) != 6.0:
            continue
        swish = onnx.helper.make_node("HardSwish", [x], [div.output[0]])
        div.CopyFrom(swish)
        removed += [add, clip, mul]
        replaced += 1
    for node in removed:
        graph.node.remove(node)
    return replaced


def drop_zero_zero_points(proto: Any) -> int:
    """Remove all-zero zero points of int8/int32 ``DequantizeLinear`` inputs (ONNX's default is
    0 of the input's type). Returns how many were removed."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    dropped = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        if consumers.get(node.output[0]) != {"Conv"}:
            continue  # ORT's QGemm / MatMul fusions want the zero point given
        values, zero_point = initializers.get(node.input[0]), initializers.get(node.input[2])
        if values is None or zero_point is None or values.data_type not in _ZERO_POINT_FREE_TYPES:
            continue
        if np.any(numpy_helper.to_array(zero_point) != 0):
            continue
        del node.input[2]
        dropped += 1
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for initializer in unused:
        graph.initializer.remove(initializer)
    return dropped


def short_value_names(proto: Any) -> None:
    """Rename intermediate values and initializers to short names and clear node names (graph
    inputs and outputs keep theirs)."""
    graph = proto.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return  # subgraphs may read outer names
    kept = {v.name for v in [*graph.input, *graph.output]}
    renamed: dict[str, str] = {}
    for initializer in graph.initializer:
        if initializer.name not in kept:
            renamed[initializer.name] = f"i{len(renamed):x}"
            initializer.name = renamed[initializer.name]
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        for index, name in enumerate(node.output):
            if name and name not in kept:
                renamed[name] = f"v{len(renamed):x}"
                node.output[index] = renamed[name]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    for value in graph.value_info:
        if value.name in renamed:
            value.name = renamed[value.name]
