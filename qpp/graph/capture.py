"""Capture a ``torch.nn.Module`` as an FX graph of functional ops.

First choice: ``torch.export`` (non-strict, batch dimension dynamic), which sees through
functional code, attention and residuals and yields ATen ops with parameters as ``get_attr``
nodes. Fallback: ``torch.fx.symbolic_trace``, whose conv/linear/batch-norm/embedding modules are
rewritten into the same ATen calls so that every later pass sees one vocabulary. When both fail
the error names the failing op and its source line.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.export import Dim
from torch.fx import GraphModule, Node

from qpp.errors import CaptureError

log = logging.getLogger(__name__)
aten = torch.ops.aten


def capture(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> GraphModule:
    """An FX ``GraphModule`` computing ``model`` (in eval mode) on inputs like ``example_inputs``.

    The batch dimension (dim 0 of every input) stays dynamic where the model allows it. The
    graph owns copies of the parameters: later passes (BN folding, CLE, AdaRound) never change
    the user's model.
    """
    model = copy.deepcopy(model).eval()
    inputs = tuple(example_inputs)
    try:
        return _export(model, inputs)
    except Exception as export_error:
        log.info("torch.export failed (%s); trying torch.fx", _first_line(export_error))
        try:
            graph_module = torch.fx.symbolic_trace(model)
            return normalize_modules(graph_module)
        except Exception as fx_error:
            raise CaptureError(
                f"cannot capture the model: torch.export failed {_where(export_error)}"
                f"({_first_line(export_error)}) and torch.fx failed {_where(fx_error)}"
                f"({_first_line(fx_error)}); make that code traceable (no Python control flow "
                "on tensor values, no .item()/.tolist()/.numpy()) or move it outside the model"
            ) from None


def _export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> GraphModule:
    batch_dynamic = tuple({0: Dim.AUTO} if x.ndim > 0 else None for x in inputs)
    with warnings.catch_warnings(), _torch_reports_silenced():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            try:
                program = torch.export.export(
                    model, inputs, dynamic_shapes=batch_dynamic, strict=False
                )
            except Exception:
                program = torch.export.export(model, inputs, strict=False)
    graph_module = program.module()
    _drop_guard_calls(graph_module)
    return graph_module


@contextlib.contextmanager
def _torch_reports_silenced() -> Iterator[None]:
    """Keep torch.export's own failure reports (a partial graph printed to stderr, errors
    logged) off the user's terminal: a failure falls back to torch.fx, or becomes one
    ``CaptureError`` line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _drop_guard_calls(graph_module: GraphModule) -> None:
    """Remove the input-shape guard call ``torch.export`` adds; qpp validates inputs itself."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph_module.graph.erase_node(node)
    graph_module.recompile()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _where(error: BaseException) -> str:
    """``at file.py:12 `code` `` for the innermost frame outside torch, if there is one."""
    frames = traceback.extract_tb(error.__traceback__)
    outside = [
        f
        for f in frames
        if "site-packages" not in f.filename
        and "/torch/" not in f.filename
        and "/qpp/graph/" not in f.filename
    ]
    if not outside:
        return ""
    frame = outside[-1]
    return f"at {Path(frame.filename).name}:{frame.lineno} `{(frame.line or '').strip()}` "


# ---------------------------------------------------------------------------------------------
# torch.fx fallback: turn leaf modules into the ATen calls torch.export would have produced


def normalize_modules(graph_module: GraphModule) -> GraphModule:
    """Rewrite ``call_module`` nodes of conv, linear, batch-norm and embedding into ATen calls
    on ``get_attr`` parameters, so weights are graph values that quantizers can intercept."""
    modules = dict(graph_module.named_modules())
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = modules[str(node.target)]
        with graph.inserting_before(node):
            replacement = _functional_call(graph, node, module)
        if replacement is not None:
            replacement.meta.update(node.meta)
            replacement.meta.setdefault(
                "nn_module_stack", {str(node.target): (str(node.target), type(module).__name__)}
            )
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return graph_module


def _functional_call(graph: torch.fx.Graph, node: Node, module: torch.nn.Module) -> Node | None:
    prefix = str(node.target)
    x = node.args[0]

    def attr(name: str) -> Node | None:
        return (
            graph.get_attr(f"{prefix}.{name}") if getattr(module, name, None) is not None else None
        )

    if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[len(module.kernel_size)].default
        return graph.call_function(
            op,
            (
                x,
                attr("weight"),
                attr("bias"),
                list(module.stride),
                list(module.padding),
                list(module.dilation),
                module.groups,
            ),
        )
    if isinstance(module, torch.nn.Linear):
        return graph.call_function(aten.linear.default, (x, attr("weight"), attr("bias")))
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        return graph.call_function(
            aten.batch_norm.default,
            (
                x,
                attr("weight"),
                attr("bias"),
                attr("running_mean"),
                attr("running_var"),
                False,
                0.0,
                module.eps,
                False,
            ),
        )
    if isinstance(module, torch.nn.Embedding) and module.max_norm is None:
        return graph.call_function(aten.embedding.default, (attr("weight"), x))
    return None
