"""Load an ONNX file as a torch module (onnx2torch ``GraphModule``) that torch.export can capture.

onnx2torch converts node by node, so the graph is prepared first:

1. ``Constant`` nodes become initializers (onnx2torch reads weights, shapes and scales only
   from initializers).
2. Shape computations (``Shape`` → ``Slice``/``Cast``/``Concat`` → ``Reshape``) are folded into
   constants. They are evaluated by onnxruntime at two batch sizes: values that do not change
   become constants, and a ``Reshape`` target whose entries follow the batch size gets ``0``
   ("copy this dimension") there, which is what ONNX means by it for every batch size.
   This needs every input dimension but the batch (dim 0) known; pass ``input_shapes`` when
   the file leaves them symbolic.
3. During conversion, Reshape, Slice and Resize with constant parameters become modules that
   keep those parameters as Python numbers, so torch.export sees plain ``reshape``, indexing
   and ``interpolate`` instead of tensor-valued shapes it cannot trace; BatchNormalization
   over an input of unknown rank becomes a rank-agnostic batch norm.

The result reproduces onnxruntime's outputs (tests/graph/test_onnx_import.py checks parity).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx2torch import convert
from onnx2torch.node_converters import registry
from onnx2torch.node_converters.resize import OnnxResize, _onnx_mode_to_torch_mode
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from torch import nn

from qpp.errors import ModelLoadError, UnsupportedOpError

logger = logging.getLogger(__name__)

#: Batch sizes the shape computations are evaluated at (not 1: it broadcasts like no other).
PROBE_BATCH_SIZES = (2, 3)

_RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)

_Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]


def load_onnx(
    path: str | Path, input_shapes: Sequence[Sequence[int]] | None = None
) -> torch.nn.Module:
    """The ONNX model at ``path`` as a torch module in eval mode.

    ``input_shapes`` (one per graph input, batch first) fixes the non-batch dimensions the file
    leaves symbolic, so shape computations fold to constants and the module can be exported
    with a dynamic batch; dim 0 stays dynamic whatever value is given. Raises
    ``ModelLoadError`` for a missing or malformed file and ``UnsupportedOpError`` for
    operators onnx2torch cannot convert.
    """
    model = _read_checked(Path(path))
    if input_shapes is not None:
        _fix_input_shapes(model, input_shapes)
    model = fold_shape_computations(_lift_constants(model))
    model = _downgrade_opset_if_needed(model)
    _drop_irrelevant_allowzero(model)
    _check_converters_exist(model)
    with _export_friendly_converters():
        try:
            module = convert(model)
        except _NodeConversionError as error:
            raise UnsupportedOpError(str(error)) from error.__cause__
    return module.eval()


def _read_checked(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"ONNX file {path} does not exist; check the path")
    if not path.is_file():
        raise ModelLoadError(f"{path} is a folder, not an ONNX file; pass the .onnx file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(str(path))
    except (DecodeError, onnx.checker.ValidationError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"{path} is not a valid ONNX model ({reason}); re-export it, or check the file is "
            "complete (a truncated download fails this way)"
        ) from error
    if not model.graph.node:
        raise ModelLoadError(f"{path} holds an ONNX model without nodes; re-export it")
    return model


def _opset_versions(model: onnx.ModelProto) -> dict[str, int]:
    return {
        ("" if entry.domain == "ai.onnx" else entry.domain): entry.version
        for entry in model.opset_import
    }


def _missing_converters(model: onnx.ModelProto) -> list[str]:
    versions = _opset_versions(model)
    missing = []
    for node in model.graph.node:
        try:
            registry.get_converter(node.op_type, versions.get(node.domain, 1), node.domain)
        except NotImplementedError:
            missing.append(node.op_type)
    return missing


def _downgrade_opset_if_needed(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert a model from a newer opset than onnx2torch knows to the newest one it does.

    torch's dynamo exporter writes opset 18-20, where onnx2torch lacks some converters (e.g.
    Reshape-19) although the op means the same; ONNX's version converter rewrites the file to
    an older opset, and the result is kept only if every op then has a converter.
    """
    if not _missing_converters(model):
        return model
    current = _opset_versions(model).get("", 1)
    for target in (18, 17, 16, 15, 14, 13):
        if target >= current:
            continue
        try:
            converted = onnx.version_converter.convert_version(model, target)
        except Exception:  # a target opset the converter cannot reach
            continue
        if not _missing_converters(converted):
            logger.info("converted the ONNX model from opset %d to %d", current, target)
            return converted
    return model


def _check_converters_exist(model: onnx.ModelProto) -> None:
    """Raise ``UnsupportedOpError`` naming every op type onnx2torch has no converter for."""
    versions = _opset_versions(model)
    missing: dict[tuple[str, str], list[str]] = {}
    for node in model.graph.node:
        try:
            registry.get_converter(node.op_type, versions.get(node.domain, 1), node.domain)
        except NotImplementedError:
            missing.setdefault((node.domain, node.op_type), []).append(node.name or "<unnamed>")
    if not missing:
        return
    problems = []
    for (domain, op_type), node_names in missing.items():
        known = sorted(
            description.version
            for description in registry._CONVERTER_REGISTRY
            if description.operation_type == op_type and description.domain == domain
        )
        opset = versions.get(domain, 1)
        qualified = f"{domain}::{op_type}" if domain else op_type
        if known:
            fix = (
                f"re-export with opset {known[-1]} (onnx2torch converts {qualified} as defined "
                f"in opsets {', '.join(map(str, known))}) or replace {qualified}"
            )
        else:
            fix = f"replace {qualified} with supported ops before loading"
        shown = ", ".join(repr(name) for name in node_names[:3])
        more = f" and {len(node_names) - 3} more" if len(node_names) > 3 else ""
        problems.append(f"{qualified} at opset {opset} (node {shown}{more}; {fix})")
    raise UnsupportedOpError(f"onnx2torch cannot convert op {'; '.join(problems)}")


def _fix_input_shapes(model: onnx.ModelProto, input_shapes: Sequence[Sequence[int]]) -> None:
    initializers = {initializer.name for initializer in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(input_shapes) != len(inputs):
        raise ModelLoadError(
            f"input_shapes has {len(input_shapes)} shapes but the model has {len(inputs)} "
            f"inputs ({', '.join(value.name for value in inputs)}); give one shape per input"
        )
    for value, shape in zip(inputs, input_shapes, strict=True):
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape"):  # rank unknown: take the given one
            value.type.tensor_type.shape.dim.add(dim_param="batch")
            value.type.tensor_type.shape.dim.extend(
                onnx.TensorShapeProto.Dimension(dim_value=int(size)) for size in shape[1:]
            )
            continue
        if len(dims) != len(shape):
            raise ModelLoadError(
                f"input {value.name!r} has rank {len(dims)} but input_shapes gives "
                f"{tuple(shape)}; give a shape of rank {len(dims)}"
            )
        for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            if axis == 0:
                continue
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise ModelLoadError(
                    f"input {value.name!r} has size {dim.dim_value} on dim {axis} but "
                    f"input_shapes gives {size}; pass the model's own size"
                )
            dim.dim_value = int(size)


def _lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    ir_model = onnx_ir.from_proto(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    return onnx_ir.to_proto(ir_model)


def fold_shape_computations(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its shape-only subgraphs replaced by constants where that is exact.

    A value is foldable when it is computed from ``Shape``/``Size`` outputs and constants
    only. Each foldable value used by an ordinary node is evaluated with
    onnxruntime at two batch sizes; see the module docstring for how the two results are
    turned into a constant. Returns ``model`` unchanged when there is nothing to fold or the
    non-batch input dimensions are unknown.
    """
    graph = model.graph
    initializers = {initializer.name for initializer in graph.initializer}
    foldable = set(initializers)
    for node in graph.node:
        inputs = [name for name in node.input if name]
        computable = inputs and foldable.issuperset(inputs) and _is_pure(node)
        if node.op_type in ("Shape", "Size") or computable:
            foldable.update(node.output)

    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        if foldable.isdisjoint(node.output):
            for index, name in enumerate(node.input):
                if name in foldable and name not in initializers:
                    uses.setdefault(name, []).append((node, index))
    if not uses:
        return model

    probes = _probe(model, uses)
    if probes is None:
        return model
    replaced = 0
    for name, consumers in uses.items():
        values = [probe[name] for probe in probes]
        for node, index in consumers:
            constant = _constant_for(node, index, values, probes)
            if constant is None:
                continue
            constant_name = f"{name}__folded_{replaced}"
            graph.initializer.append(numpy_helper.from_array(constant, constant_name))
            node.input[index] = constant_name
            replaced += 1
    _remove_dead_nodes(graph)
    return model


def _is_pure(node: onnx.NodeProto) -> bool:
    """False for random ops and control flow, which folding must leave alone."""
    has_subgraph = any(
        attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for attribute in node.attribute
    )
    return not has_subgraph and node.op_type not in _RANDOM_OPS


def _probe(
    model: onnx.ModelProto, uses: dict[str, list[tuple[onnx.NodeProto, int]]]
) -> list[dict[str, np.ndarray]] | None:
    """The foldable values in ``uses`` (and shapes of Reshape data) at each probe batch."""
    import onnxruntime

    initializers = {initializer.name for initializer in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    shapes = []
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if any(not dim.HasField("dim_value") for dim in list(dims)[1:]):
            logger.info("input %s has symbolic non-batch dims; shapes stay unfolded", value.name)
            return None
        shapes.append([dim.dim_value for dim in dims])

    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    del probe_model.graph.output[:]
    wanted = list(uses)
    for consumers in uses.values():
        for node, index in consumers:
            if node.op_type == "Reshape" and index == 1:
                shape_name = f"{node.input[0]}__probe_shape"
                if shape_name not in wanted:
                    probe_model.graph.node.append(
                        onnx.helper.make_node("Shape", [node.input[0]], [shape_name])
                    )
                    wanted.append(shape_name)
    probe_model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted)

    rng = np.random.default_rng(0)
    fixed_batch = all(shape and shape[0] > 0 for shape in shapes)
    batch_sizes = [shapes[0][0]] if fixed_batch and shapes else list(PROBE_BATCH_SIZES)
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            probe_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        probes = []
        for batch in batch_sizes:
            feeds = {}
            for value, shape in zip(inputs, shapes, strict=True):
                dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
                full_shape = [batch, *shape[1:]] if shape else []
                if np.issubdtype(dtype, np.floating):
                    feeds[value.name] = rng.standard_normal(full_shape).astype(dtype)
                else:  # token ids, masks: ones are valid everywhere
                    feeds[value.name] = np.ones(full_shape, dtype=dtype)
            probes.append(dict(zip(wanted, session.run(wanted, feeds), strict=True)))
    except Exception as error:  # onnxruntime raises its own unexported error types
        logger.warning("could not evaluate shape computations (%s); left unfolded", error)
        return None
    return probes


def _constant_for(
    node: onnx.NodeProto,
    index: int,
    values: list[np.ndarray],
    probes: list[dict[str, np.ndarray]],
) -> np.ndarray | None:
    """The constant that can stand for ``values`` as input ``index`` of ``node``, if any."""
    first = values[0]
    if all(np.array_equal(first, other) for other in values[1:]):
        return first
    if node.op_type != "Reshape" or index != 1 or first.ndim != 1:
        return None
    if _allows_zero(node):
        if any((value == 0).any() for value in values):
            return None
        _drop_allowzero(node)  # no 0 in the shape: allowzero changes nothing
    data_shapes = [probe[f"{node.input[0]}__probe_shape"] for probe in probes]
    target = first.copy()
    varying = np.flatnonzero(np.any(np.stack(values) != first, axis=0))
    for axis in varying:
        follows_data = all(
            axis < len(shape) and shape[axis] == value[axis]
            for shape, value in zip(data_shapes, values, strict=True)
        )
        if not follows_data:
            return None
        target[axis] = 0
    return target


def _allows_zero(node: onnx.NodeProto) -> bool:
    return any(a.name == "allowzero" and a.i for a in node.attribute)


def _drop_allowzero(node: onnx.NodeProto) -> None:
    kept = [a for a in node.attribute if a.name != "allowzero"]
    del node.attribute[:]
    node.attribute.extend(kept)


def _drop_irrelevant_allowzero(model: onnx.ModelProto) -> None:
    """Drop ``allowzero=1`` from Reshapes whose constant shape has no 0 (it changes nothing
    there, and onnx2torch refuses the attribute; torch's exporter sets it everywhere)."""
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if (
            node.op_type == "Reshape"
            and _allows_zero(node)
            and node.input[1] in constants
            and (numpy_helper.to_array(constants[node.input[1]]) != 0).all()
        ):
            _drop_allowzero(node)


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


# --- converters ---------------------------------------------------------------------------


class ConstantReshape(nn.Module):
    """ONNX Reshape to a constant shape; 0 copies the input's size on that dimension."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(size) for size in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape([x.shape[axis] if s == 0 else s for axis, s in enumerate(self.shape)])


class ConstantSlice(nn.Module):
    """ONNX Slice with constant starts, ends, axes and positive steps, as basic indexing."""

    def __init__(
        self, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int], steps: Sequence[int]
    ) -> None:
        super().__init__()
        self.slices = tuple(
            (int(axis), slice(int(start), int(end), int(step)))
            for start, end, axis, step in zip(starts, ends, axes, steps, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index: list[slice] = [slice(None)] * x.dim()
        for axis, axis_slice in self.slices:
            index[axis] = axis_slice
        return x[tuple(index)]


class ConstantResize(nn.Module):
    """ONNX Resize with constant scales or sizes, as ``F.interpolate``."""

    def __init__(
        self,
        mode: str,
        align_corners: bool | None,
        scale_factor: tuple[float, ...] | None,
        size: tuple[int, ...] | None,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.align_corners = align_corners
        self.scale_factor = scale_factor
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x,
            size=self.size,
            scale_factor=self.scale_factor,
            mode=self.mode,
            align_corners=self.align_corners,
        )


class AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Inference batch norm over dim 1 of an input of any rank >= 2.

    For a BatchNormalization whose input rank shape inference could not find, where
    onnx2torch would have to pick BatchNorm1d/2d/3d.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of rank >= 2, got rank {input.dim()}")


def _constant(graph: OnnxGraph, name: str) -> np.ndarray | None:
    if name and name in graph.initializers:
        return graph.initializers[name].to_numpy()
    return None


def _single_input(node: OnnxNode, module: nn.Module) -> OperationConverterResult:
    return OperationConverterResult(
        torch_module=module,
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


def _convert_reshape(
    original: _Converter, node: OnnxNode, graph: OnnxGraph
) -> OperationConverterResult:
    shape = _constant(graph, node.input_values[1])
    if shape is None or node.attributes.get("allowzero", 0):
        return original(node, graph)
    return _single_input(node, ConstantReshape(shape.tolist()))


def _convert_slice(
    original: _Converter, node: OnnxNode, graph: OnnxGraph
) -> OperationConverterResult:
    names = [*node.input_values[1:], "", ""][:4]
    starts, ends, axes, steps = (_constant(graph, name) for name in names)
    if (
        starts is None
        or ends is None
        or any(name and value is None for name, value in zip(names[2:], (axes, steps), strict=True))
    ):
        return original(node, graph)
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
    if np.any(steps <= 0):
        return original(node, graph)
    return _single_input(node, ConstantSlice(starts.tolist(), ends.tolist(), axes, steps))


def _convert_resize(
    original: _Converter, node: OnnxNode, graph: OnnxGraph
) -> OperationConverterResult:
    result = original(node, graph)
    module = result.torch_module
    if not isinstance(module, OnnxResize):  # Resize-10 takes (X, scales) and is left as is
        return result
    names = [*node.input_values[1:], "", ""][:3]
    roi, scales, sizes = (_constant(graph, name) for name in names)
    if roi is not None and roi.size and not module.ignore_roi:
        return result
    scale_factor = size = None
    if sizes is not None and sizes.size:
        size = tuple(int(s) for s in sizes[2:])
    elif scales is not None and scales.size and np.all(scales[:2] == 1):
        scale_factor = tuple(float(s) for s in scales[2:])
    else:
        return result
    try:
        mode = _onnx_mode_to_torch_mode(module.onnx_mode, len(size or scale_factor))
    except NotImplementedError:
        return result
    return _single_input(node, ConstantResize(mode, module.align_corners, scale_factor, size))


def _convert_batch_norm(
    original: _Converter, node: OnnxNode, graph: OnnxGraph
) -> OperationConverterResult:
    value_info = graph.value_info.get(node.input_values[0])
    rank = len(value_info.type.tensor_type.shape.dim) if value_info is not None else 0
    parameters = [_constant(graph, name) for name in node.input_values[1:5]]
    if rank >= 2 or len(node.output_values) != 1 or any(p is None for p in parameters):
        return original(node, graph)
    scale, bias, mean, var = (torch.from_numpy(p.copy()) for p in parameters)
    module = AnyRankBatchNorm(
        num_features=scale.numel(),
        eps=node.attributes.get("epsilon", 1e-5),
        momentum=1 - node.attributes.get("momentum", 0.9),
    )
    with torch.no_grad():
        module.weight.copy_(scale)
        module.bias.copy_(bias)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
    return _single_input(node, module)


_OVERRIDES = {
    "Reshape": _convert_reshape,
    "Slice": _convert_slice,
    "Resize": _convert_resize,
    "BatchNormalization": _convert_batch_norm,
}


class _NodeConversionError(Exception):
    """A converter's NotImplementedError, with the node it failed on."""


def _naming_failures(converter: _Converter, node: OnnxNode, graph: OnnxGraph):
    try:
        return converter(node, graph)
    except (NotImplementedError, KeyError) as error:
        # KeyError: the converter wanted a constant input (a weight, a shape) it did not find.
        reason = str(error) if isinstance(error, NotImplementedError) else f"no constant {error}"
        raise _NodeConversionError(
            f"onnx2torch cannot convert op {node.operation_type} (node {node.name!r}): {reason}; "
            f"replace {node.operation_type} or re-export the model so this node avoids it"
        ) from error


@contextmanager
def _export_friendly_converters() -> Iterator[None]:
    """Swap in the converters above, and name the node in conversion failures, for a while.

    onnx2torch keeps converters in a module-level registry without a public override hook;
    the registry is restored on exit so other users of onnx2torch see its own converters
    (not thread-safe: do not convert from two threads at once).
    """
    saved = dict(registry._CONVERTER_REGISTRY)
    for description, converter in saved.items():
        override = _OVERRIDES.get(description.operation_type)
        if override is not None and description.domain in ("", "ai.onnx"):
            converter = partial(override, converter)
        registry._CONVERTER_REGISTRY[description] = partial(_naming_failures, converter)
    try:
        yield
    finally:
        registry._CONVERTER_REGISTRY.clear()
        registry._CONVERTER_REGISTRY.update(saved)
