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
        node.ClearField("name")
        node.ClearField("doc_string")
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


def _producers(graph: Any) -> dict[str, Any]:
    return {name: node for node in graph.node for name in node.output}


def _users(graph: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _constant_array(graph: Any, producers: dict[str, Any], name: str) -> np.ndarray | None:
    for initializer in graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute:
        attribute = node.attribute[0]
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_float":
            return np.array(attribute.f, dtype=np.float32)
    return None


def _requantized(value: str, users: dict[str, list[Any]], outputs: set[str]) -> bool:
    """True when ``value`` (through Relu/Clip) goes only into QuantizeLinear nodes."""
    while value not in outputs:
        found = users.get(value, [])
        if not found:
            return False
        if all(node.op_type == "QuantizeLinear" for node in found):
            return True
        if len(found) != 1 or found[0].op_type not in ("Relu", "Clip"):
            return False
        value = found[0].output[0]
    return False


def exact_scalar_operands(proto: Any) -> int:
    """Give the scalar constant of an Add/Mul whose other operand is dequantized and whose
    result is requantized a one-value grid that holds it exactly: ``c = s (q - z)`` with
    ``s = |c|``, ``q - z = ±1``. ORT then fuses the op into QLinearAdd / QLinearMul (it needs
    every operand dequantized); the float value is unchanged. Returns how many were written."""
    graph = proto.graph
    producers, users = _producers(graph), _users(graph)
    outputs = {value.name for value in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    written = 0
    for node in list(graph.node):
        if node.op_type not in ("Add", "Mul") or len(node.input) != 2:
            continue
        dequantized = [producers.get(name) for name in node.input]
        kinds = [p is not None and p.op_type == "DequantizeLinear" for p in dequantized]
        if sum(kinds) != 1 or not _requantized(node.output[0], users, outputs):
            continue
        index = kinds.index(False)
        constant = _constant_array(graph, producers, node.input[index])
        if constant is None or constant.size != 1 or constant.dtype != np.float32:
            continue
        value = float(constant.reshape(-1)[0])
        if value == 0.0:
            continue
        source = dequantized[1 - index]
        zero_point = initializers.get(source.input[2]) if len(source.input) > 2 else None
        signed = zero_point is not None and zero_point.data_type == onnx.TensorProto.INT8
        dtype = np.int8 if signed or zero_point is None else np.uint8
        if dtype == np.int8:
            integer, zero = (1 if value > 0 else -1), 0
        else:
            integer, zero = (1, 0) if value > 0 else (0, 1)
        stem = f"{node.output[0]}_c"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.full(constant.shape, integer, dtype), f"{stem}q"),
                numpy_helper.from_array(np.array(abs(value), np.float32), f"{stem}s"),
                numpy_helper.from_array(np.array(zero, dtype), f"{stem}z"),
            ]
        )
        dequantize = onnx.helper.make_node(
            "DequantizeLinear", [f"{stem}q", f"{stem}s", f"{stem}z"], [f"{stem}"]
        )
        position = list(graph.node).index(node)
        graph.node.insert(position, dequantize)
        node.input[index] = stem
        written += 1
    _drop_unused(graph)
    return written


def gathered_embeddings(proto: Any) -> int:
    """``Gather(DequantizeLinear(table), indices)`` becomes the gather of the integer rows,
    dequantized after: the same values, without dequantizing the whole table on every run
    (MiniLM's 30,522 x 384 word embeddings). Per-row scales (axis 0) are gathered with the rows.
    Returns how many were rewritten."""
    graph = proto.graph
    producers, users = _producers(graph), _users(graph)
    initializers = {t.name: t for t in graph.initializer}
    rewritten = 0
    for gather in list(graph.node):
        if gather.op_type != "Gather":
            continue
        if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
            continue
        dequantize = producers.get(gather.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        if dequantize.input[0] not in initializers or len(users[dequantize.output[0]]) != 1:
            continue
        table = initializers[dequantize.input[0]]
        scale = _constant_array(graph, producers, dequantize.input[1])
        if scale is None:
            continue
        axis = next((a.i for a in dequantize.attribute if a.name == "axis"), 1)
        stem, indices = gather.output[0], gather.input[1]
        rows = onnx.helper.make_node("Gather", [table.name, indices], [f"{stem}_q"])
        if scale.size == 1:
            new = [
                rows,
                onnx.helper.make_node(
                    "DequantizeLinear", [f"{stem}_q", *dequantize.input[1:]], [stem]
                ),
            ]
        elif axis % len(table.dims) == 0:
            new = [
                rows,
                onnx.helper.make_node(
                    "Cast", [f"{stem}_q"], [f"{stem}_f"], to=onnx.TensorProto.FLOAT
                ),
            ]
            shifted = f"{stem}_f"
            zero_name = dequantize.input[2] if len(dequantize.input) > 2 else ""
            zero = _constant_array(graph, producers, zero_name) if zero_name else 0
            if zero is None:
                continue  # a zero point computed at run time: leave the gather as it is
            if np.any(zero != 0):
                new += [
                    onnx.helper.make_node("Gather", [zero_name, indices], [f"{stem}_zq"]),
                    onnx.helper.make_node(
                        "Cast", [f"{stem}_zq"], [f"{stem}_zf"], to=onnx.TensorProto.FLOAT
                    ),
                    # one zero point per gathered row: a trailing axis to broadcast over it
                    onnx.helper.make_node(
                        "Unsqueeze", [f"{stem}_zf", f"{stem}_axes"], [f"{stem}_z"]
                    ),
                    onnx.helper.make_node("Sub", [f"{stem}_f", f"{stem}_z"], [f"{stem}_d"]),
                ]
                shifted = f"{stem}_d"
            graph.initializer.append(
                numpy_helper.from_array(np.array([-1], np.int64), f"{stem}_axes")
            )
            new += [
                onnx.helper.make_node("Gather", [dequantize.input[1], indices], [f"{stem}_s"]),
                onnx.helper.make_node("Unsqueeze", [f"{stem}_s", f"{stem}_axes"], [f"{stem}_su"]),
                onnx.helper.make_node("Mul", [shifted, f"{stem}_su"], [stem]),
            ]
        else:
            continue
        position = list(graph.node).index(gather)
        for offset, node in enumerate(new):
            graph.node.insert(position + offset, node)
        graph.node.remove(gather)
        graph.node.remove(dequantize)
        rewritten += 1
    _drop_unused(graph)
    return rewritten


def narrow_int32_biases(proto: Any) -> int:
    """Store each conv's int32 bias in the narrowest integer type that holds it, cast back to
    int32, and its scale ``s_x s_w`` as the product of the two scales the file already holds
    (white paper eq. 11). ORT folds both constants when it loads the model, before its QDQ
    fusions, so QLinearConv gets the same int32 bias; the file loses 4 to 7 bytes per output
    channel (PP-LCNet's depthwise convs have 9 weights per channel). Returns how many."""
    graph = proto.graph
    producers, users = _producers(graph), _users(graph)
    initializers = {t.name: t for t in graph.initializer}
    narrowed = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(conv.input) < 3:
            continue
        activation, weight, bias = (producers.get(name) for name in conv.input[:3])
        if not all(
            n is not None and n.op_type == "DequantizeLinear" for n in (bias, activation, weight)
        ):
            continue
        if len(users.get(bias.output[0], [])) != 1 or bias.input[0] not in initializers:
            continue
        stored = initializers[bias.input[0]]
        if stored.data_type != onnx.TensorProto.INT32 or bias.input[1] not in initializers:
            continue
        values = numpy_helper.to_array(stored)
        scale = numpy_helper.to_array(initializers[bias.input[1]])
        factors = [initializers.get(activation.input[1]), initializers.get(weight.input[1])]
        position = list(graph.node).index(bias)
        stem = bias.output[0]
        if all(f is not None for f in factors):
            product = numpy_helper.to_array(factors[0]) * numpy_helper.to_array(factors[1])
            if (
                product.dtype == np.float32
                and product.shape == scale.shape
                and np.array_equal(product, scale)
            ):
                graph.node.insert(
                    position, onnx.helper.make_node("Mul", [f.name for f in factors], [f"{stem}_s"])
                )
                bias.input[1] = f"{stem}_s"
                position += 1
        narrow = (
            next(
                (
                    t
                    for t in (np.int8, np.int16)
                    if np.iinfo(t).min <= values.min() and values.max() <= np.iinfo(t).max
                ),
                None,
            )
            if values.size
            else None
        )
        if narrow is not None:
            graph.initializer.append(numpy_helper.from_array(values.astype(narrow), f"{stem}_n"))
            graph.node.insert(
                position,
                onnx.helper.make_node(
                    "Cast", [f"{stem}_n"], [f"{stem}_i"], to=onnx.TensorProto.INT32
                ),
            )
            bias.input[0] = f"{stem}_i"
        narrowed += 1
    _drop_unused(graph)
    return narrowed


#: Conv attributes whose ONNX defaults a file need not repeat.
_CONV_DEFAULTS = {"dilations": 1, "strides": 1, "pads": 0, "group": 1}


def drop_default_conv_attributes(proto: Any) -> None:
    """Drop Conv attributes equal to ONNX's defaults, and ``kernel_shape`` (the weight's shape
    gives it)."""
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        for attribute in list(node.attribute):
            value = onnx.helper.get_attribute_value(attribute)
            values = value if isinstance(value, list) else [value]
            default = _CONV_DEFAULTS.get(attribute.name)
            if attribute.name == "kernel_shape" or (
                default is not None and all(v == default for v in values)
            ):
                node.attribute.remove(attribute)


def _drop_unused(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    for initializer in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(initializer)
