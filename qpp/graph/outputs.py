"""Which of a captured graph's outputs are softmax probabilities, and their log.

The per-input range choices compare the quantized model's outputs with the float model's
(``sum ||y_q - y||^2 / sum ||y||^2``). On a classifier that ends in a softmax that error
says little: most inputs are classified with a probability within 1e-6 of 1, where no
quantization error shows, so the sum is carried by the few inputs near the decision boundary
that the calibration batches happen to hold. Measured on ppocr-cls at W8A8 (128 calibration
and 300 evaluation lines, 2026-12-07): static ranges have probability error 0.0028 on the
calibration lines and 0.00058 on the evaluation lines, while their error on log-probabilities
is 0.0028 and 0.0023. The log-probability ``log p = z - logsumexp(z)`` is the logit ``z`` up
to a per-input shift that no decision depends on, and an error in it is an error in the
margin that decides the next input's class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

#: Probabilities below this floor read as the floor in log space: a class whose float and
#: quantized probabilities both lie below it adds no error.
PROBABILITY_FLOOR = 1e-30
#: Functions (by name, the overload dropped: ``aten.softmax.int`` is ``softmax``) whose
#: result is a softmax, and those that only move or copy values (the captured graph's
#: reshapes and clones between a softmax and the output).
_SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
_MOVES_VALUES = frozenset(
    {
        "clone",
        "contiguous",
        "detach",
        "alias",
        "reshape",
        "view",
        "_unsafe_view",
        "flatten",
        "squeeze",
        "unsqueeze",
        "permute",
        "transpose",
    }
)


def _function_name(node: Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").split(".")[0]
    return ""


def _module_name(graph_module: GraphModule, node: Node) -> str:
    if node.op != "call_module":
        return ""
    return type(graph_module.get_submodule(str(node.target))).__name__


def _is_softmax(graph_module: GraphModule, node: Node) -> bool:
    name = _module_name(graph_module, node)
    return _function_name(node) in _SOFTMAX or ("Softmax" in name and "LogSoftmax" not in name)


def _passes_through(graph_module: GraphModule, node: Node) -> bool:
    """A node whose values are its first input's, as far as the output space goes: a copy,
    a reshape, an identity, or an activation quantizer (its error is part of the model's)."""
    if not node.args or not isinstance(node.args[0], Node):
        return False
    name = _module_name(graph_module, node)
    return _function_name(node) in _MOVES_VALUES or "Identity" in name or "Quantizer" in name


def softmax_outputs(graph_module: GraphModule) -> tuple[bool, ...]:
    """For each tensor leaf of what ``graph_module`` returns, in ``tree_leaves`` order, whether
    it is a softmax's result (through copies, reshapes, identities and quantizers)."""
    output = graph_module.graph.output_node()  # the last node: no scan of the graph
    flags = []
    for leaf in tree_leaves(output.args[0]):
        if not isinstance(leaf, Node):
            continue
        node = leaf
        while _passes_through(graph_module, node):
            node = node.args[0]  # type: ignore[assignment]
        flags.append(_is_softmax(graph_module, node))
    return tuple(flags)


def comparable_outputs(
    leaves: Sequence[torch.Tensor], softmax: Sequence[bool]
) -> list[torch.Tensor]:
    """``leaves`` (an output's tensors, as float) with the softmax ones in log space
    (module docstring). Where the counts differ (an output that is not a fixed structure of
    tensors) the leaves are returned as they are."""
    if len(leaves) != len(softmax) or not any(softmax):
        return list(leaves)
    return [
        leaf.clamp_min(PROBABILITY_FLOOR).log() if is_softmax else leaf
        for leaf, is_softmax in zip(leaves, softmax, strict=True)
    ]


def compared_leaves(graph_module: GraphModule, outputs: object) -> list[torch.Tensor]:
    """The tensors of ``outputs`` (what ``graph_module`` returned) as an output error compares
    them: as float, softmax probabilities as their log (module docstring)."""
    leaves = [t.float() for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    return comparable_outputs(leaves, softmax_outputs(graph_module))
