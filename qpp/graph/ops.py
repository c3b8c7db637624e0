"""What an FX node computes, in the few categories quantization cares about.

Graphs come from ``torch.export`` (ATen ops) or, as a fallback, from ``torch.fx`` symbolic
tracing (torch functions, tensor methods, and modules that ``capture`` has normalized to ATen
calls). ``op_kind`` maps all of them onto one vocabulary.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch.fx import Node

aten = torch.ops.aten


class OpKind(StrEnum):
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    LINEAR = "linear"
    MATMUL = "matmul"
    EMBEDDING = "embedding"
    BATCH_NORM = "batch_norm"
    #: Activations an integer kernel fuses into the conv/linear before requantization.
    FUSABLE_ACTIVATION = "fusable_activation"
    ADD = "add"
    MUL = "mul"
    SOFTMAX = "softmax"
    CONCAT = "concat"
    #: Ops that move or select values without changing them (their output grid = input grid).
    LAYOUT = "layout"
    OTHER = "other"


_ATEN_KINDS: dict[object, OpKind] = {}
_FUNCTION_KINDS: dict[object, OpKind] = {}


def _register(kind: OpKind, aten_packets: list[object], functions: list[object]) -> None:
    for packet in aten_packets:
        _ATEN_KINDS[packet] = kind
    for function in functions:
        _FUNCTION_KINDS[function] = kind


_register(
    OpKind.CONV,
    [aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution],
    [F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d],
)
_register(
    OpKind.CONV_TRANSPOSE,
    [aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d],
    [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d],
)
_register(OpKind.LINEAR, [aten.linear, aten.addmm], [F.linear, torch.addmm])
_register(
    OpKind.MATMUL,
    [aten.matmul, aten.mm, aten.bmm],
    [torch.matmul, torch.mm, torch.bmm, operator.matmul, "matmul", "bmm", "mm"],
)
_register(OpKind.EMBEDDING, [aten.embedding], [F.embedding])
_register(
    OpKind.BATCH_NORM,
    [aten.batch_norm, aten._native_batch_norm_legit_no_training],
    [F.batch_norm],
)
_register(
    OpKind.FUSABLE_ACTIVATION,
    [aten.relu, aten.relu_, aten.relu6, aten.hardtanh, aten.hardtanh_, aten.clamp_min],
    [torch.relu, F.relu, F.relu6, F.hardtanh, "relu", "relu_"],
)
_register(OpKind.ADD, [aten.add, aten.add_], [operator.add, torch.add, "add"])
_register(OpKind.MUL, [aten.mul, aten.mul_], [operator.mul, torch.mul, "mul"])
_register(
    OpKind.SOFTMAX,
    [aten.softmax, aten._softmax],
    [F.softmax, torch.softmax, "softmax"],
)
_register(OpKind.CONCAT, [aten.cat, aten.concat], [torch.cat, torch.concat])
_register(
    OpKind.LAYOUT,
    [
        aten.view,
        aten.reshape,
        aten._unsafe_view,
        aten.permute,
        aten.transpose,
        aten.t,
        aten.flatten,
        aten.unsqueeze,
        aten.squeeze,
        aten.contiguous,
        aten.expand,
        aten.clone,
        aten.max_pool1d,
        aten.max_pool2d,
        aten.max_pool3d,
        aten.alias,
        aten.detach,
        aten.unflatten,
        aten.pad,
        aten.constant_pad_nd,
    ],
    [
        torch.reshape,
        torch.flatten,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.t,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        "view",
        "reshape",
        "permute",
        "transpose",
        "flatten",
        "unsqueeze",
        "squeeze",
        "contiguous",
        "expand",
        "t",
    ],
)

_MODULE_KINDS: dict[type, OpKind] = {
    torch.nn.ReLU: OpKind.FUSABLE_ACTIVATION,
    torch.nn.ReLU6: OpKind.FUSABLE_ACTIVATION,
    torch.nn.Hardtanh: OpKind.FUSABLE_ACTIVATION,
    torch.nn.MaxPool1d: OpKind.LAYOUT,
    torch.nn.MaxPool2d: OpKind.LAYOUT,
    torch.nn.MaxPool3d: OpKind.LAYOUT,
    torch.nn.Flatten: OpKind.LAYOUT,
    torch.nn.Identity: OpKind.LAYOUT,
}


def op_kind(node: Node, modules: dict[str, torch.nn.Module] | None = None) -> OpKind:
    """The category of ``node`` (``OTHER`` for everything quantization treats as float math)."""
    if node.op == "call_function":
        packet = getattr(node.target, "overloadpacket", None)
        if packet is not None:
            return _ATEN_KINDS.get(packet, OpKind.OTHER)
        return _FUNCTION_KINDS.get(node.target, OpKind.OTHER)
    if node.op == "call_method":
        return _FUNCTION_KINDS.get(node.target, OpKind.OTHER)
    if node.op == "call_module" and modules is not None:
        module = modules.get(str(node.target))
        for module_type, kind in _MODULE_KINDS.items():
            if isinstance(module, module_type):
                return kind
    return OpKind.OTHER


COMPUTE_KINDS = (OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.LINEAR, OpKind.MATMUL)


@dataclass(frozen=True)
class OperandRoles:
    """Which arguments of a compute op are activations, and which one is the weight."""

    activations: tuple[int, ...]
    weight: int | None
    #: The weight's output-channel axis, for per-channel quantization.
    weight_axis: int | None


def operand_roles(node: Node, kind: OpKind) -> OperandRoles:
    """Argument positions of a compute op's activation inputs and weight.

    ``aten.addmm(bias, x, w)`` keeps its weight in position 2 (``[in, out]`` layout), matmul's
    second operand is a weight only when it is a parameter (decided by the caller).
    """
    if kind in (OpKind.CONV, OpKind.LINEAR):
        if node.target in (aten.addmm.default, torch.addmm):
            return OperandRoles((1,), 2, 1)
        return OperandRoles((0,), 1, 0)
    if kind is OpKind.CONV_TRANSPOSE:
        return OperandRoles((0,), 1, 1)
    if kind is OpKind.MATMUL:
        return OperandRoles((0, 1), 1, -1)
    if kind is OpKind.EMBEDDING:
        is_aten = getattr(node.target, "overloadpacket", None) is aten.embedding
        return OperandRoles((), 0 if is_aten else 1, 0)
    return OperandRoles((), None, None)
