"""ONNX QDQ export of a ``QuantizedModel``.

Each quantizer of the captured graph becomes the ops ONNX Runtime's QDQ optimizer fuses into
integer kernels (QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat):

- an activation quantizer: ``QuantizeLinear -> DequantizeLinear`` with its scale and zero point
  (white paper eq. 3-4: ONNX rounds half to even and saturates, as ``qpp.quant.affine`` does);
- a weight quantizer: its integer weight, stored as an int8 (or shifted uint8, see
  ``qpp.export.isa``) initializer, then ``DequantizeLinear`` (per channel where the simulation
  is), so the file holds one byte per weight;
- a bias the simulation puts on the int32 accumulator grid (``qpp.sim.bias``): for a conv or
  2-D linear (ONNX Gemm) the same int32 values at scale ``s_x s_w`` with zero point 0 (eq. 11),
  as ORT's QLinearConv/QGemm fusions require; linear layers on 3-D inputs export as MatMul +
  Add, and ORT's MatMulIntegerToFloat adds their (already rounded) bias in float.

The graph is rewritten on a copy of the captured FX graph with ``quantized_decomposed`` ops, then
``torch.onnx.export`` (dynamo) translates them to QuantizeLinear/DequantizeLinear. Nothing in
``qpp.sim`` knows about this module.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule, Node

from qpp.errors import ConfigError, OutputExistsError, UnsupportedOpError
from qpp.export.compact import (
    drop_default_conv_attributes,
    drop_zero_zero_points,
    exact_scalar_operands,
    gathered_embeddings,
    global_average_pools,
    hard_swishes,
    narrow_int32_biases,
    short_value_names,
)
from qpp.export.isa import CpuIsa, WeightFormat, detect_isa
from qpp.export.piecewise import (
    check_piecewise_export,
    integer_branch_convs,
    lower_piecewise_weight,
    piecewise_note,
)
from qpp.export.predictor import (
    PREDICTED_BATCH,
    PREDICTED_NOTE,
    PredictedQDQ,
    PredictorModule,
    check_predicted_export,
    integer_kernels_with_input_scales,
    predicted_quantizers,
    translations,
)
from qpp.graph.ops import OpKind, op_kind
from qpp.predict.activation_qps import ActivationQPs
from qpp.predict.predictor import LinearQPPredictor
from qpp.predict.qps import QPMode
from qpp.quant.affine import INT32_RANGE, quantize_bias
from qpp.sim.bias import BiasQuantizer
from qpp.sim.model import QUANTIZER_ROOT, QuantizedModel
from qpp.sim.piecewise import PiecewiseQuantizer
from qpp.sim.quantizer import Mode, Quantizer, QuantizerKind

#: ONNX QuantizeLinear/DequantizeLinear carry 8-bit integers with integer kernels behind them;
#: narrower encodings live in an 8-bit container (their values stay on their own grid).
MAX_EXPORT_BITS = 8
_decomposed = None
#: Meta key of an activation's quantize op: the name of the simulation's quantizer node.
QUANTIZER_NODE = "qpp_quantizer_node"
SHIFTED_NOTE = (
    "8-bit weights are stored as uint8 shifted by 128 (the same grid), so ONNX Runtime runs its "
    "exact u8u8 kernels on this CPU, whose u8s8 kernels saturate (no VNNI); quantize with "
    "--weights 7 to get the faster u8s8 kernels, exact with 7-bit weights"
)


def _quantized_decomposed() -> object:
    """``torch.ops.quantized_decomposed`` (registered by importing torch's ``_decomposed``)."""
    global _decomposed
    if _decomposed is None:
        import torch.ao.quantization.fx._decomposed  # registers the ops

        _decomposed = torch.ops.quantized_decomposed
    return _decomposed


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote."""

    path: str
    weight_format: str
    bytes: int
    quantized_weights: int
    quantized_activations: int
    int32_biases: int
    opset: int
    #: Quantizers left in float (disabled, or never calibrated).
    float_quantizers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: PWLQ weights: quantizer name -> integer branches written (0: dequantized to float).
    piecewise_branches: dict[str, int] = field(default_factory=dict)
    #: Activations quantized with QPs that predictors inside the graph compute (QPP).
    predicted_activations: int = 0
    predictors: int = 0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _Lowered:
    graph_module: GraphModule
    weights: int = 0
    activations: int = 0
    biases: int = 0
    float_quantizers: list[str] = field(default_factory=list)
    piecewise_branches: dict[str, int] = field(default_factory=dict)
    #: Activation quantizers whose QPs a predictor in the graph computes.
    predicted_activations: int = 0
    predictors: int = 0


def check_exportable(model: QuantizedModel, activation_qps: ActivationQPs | None = None) -> None:
    """Refuse encodings that an ONNX QDQ graph with integer kernels cannot hold."""
    check_predicted_export(model.config, activation_qps)
    for name in model.names:
        quantizer = model.quantizer(name)
        piecewise = quantizer.spec.piecewise is not None
        if _is_active(quantizer) and piecewise and quantizer.kind is QuantizerKind.ACTIVATION:
            raise ConfigError(
                f"activation quantizer '{name}' is piecewise linear (PWLQ), which ONNX QDQ "
                "cannot express; quantize with --activation-quantizer uniform to export"
            )
        if _is_active(quantizer) and quantizer.spec.bits > MAX_EXPORT_BITS:
            raise ConfigError(
                f"quantizer '{name}' has {quantizer.spec.bits}-bit encodings, which ONNX "
                f"QDQ integer kernels cannot hold; quantize again with at most "
                f"{MAX_EXPORT_BITS} bits there (e.g. --override '{name}:bits=8') or disable it"
            )


def _is_active(quantizer: Quantizer) -> bool:
    """True when the simulation fake-quantizes with this quantizer (see ``Quantizer.forward``)."""
    return quantizer.enabled and quantizer.mode is not Mode.OFF and quantizer.calibrated


def choose_weight_format(model: QuantizedModel, isa: CpuIsa) -> WeightFormat:
    """The weight format that ORT's kernels compute exactly on ``isa`` for every weight."""
    formats = {
        isa.weight_format(quantizer.spec.bits, quantizer.spec.is_signed)
        for quantizer, _ in model.weight_quantizers()
        if _is_active(quantizer)
    }
    shifted = WeightFormat.UINT8_SHIFTED
    return shifted if shifted in formats else WeightFormat.INT8


def output_scales(model: QuantizedModel) -> list[float | None]:
    """For each graph output, the scale of the quantizer producing it (``None``: float)."""
    graph_module = model.graph_module
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], tuple | list) else (output.args[0],)
    scales: list[float | None] = []
    for value in values:
        scale = None
        if isinstance(value, Node) and value.op == "call_module":
            module = graph_module.get_submodule(str(value.target))
            if isinstance(module, Quantizer) and _is_active(module) and module.axis is None:
                scale = float(module.scale)
        scales.append(scale)
    return scales


def lower_quantizers(
    model: QuantizedModel,
    weight_format: WeightFormat,
    piecewise: str = "branches",
    activation_qps: ActivationQPs | None = None,
) -> GraphModule:
    """A copy of ``model``'s graph with every quantizer replaced by quantize/dequantize ops.

    Computes in torch exactly what the exported ONNX graph computes (int32 biases included), so
    it is also the reference for the export's own tests. ``piecewise``: how PWLQ weights are
    written (``qpp.export.piecewise``); ``activation_qps``: a predicted run's predictors, which
    become part of the graph (``qpp.export.predictor``).
    """
    return _lower(model, weight_format, piecewise, activation_qps).graph_module


def _lower(
    model: QuantizedModel,
    weight_format: WeightFormat,
    piecewise: str,
    activation_qps: ActivationQPs | None = None,
) -> _Lowered:
    check_exportable(model, activation_qps)
    check_piecewise_export(piecewise)
    graph_module = copy.deepcopy(model.graph_module)
    lowered = _Lowered(graph_module)
    graph = graph_module.graph
    predicted = set() if activation_qps is None else predicted_quantizers(activation_qps)
    sources = {} if activation_qps is None else {p.source: p for p in activation_qps.predictors}
    #: Predicted quantizer name -> (the latest predictor call's QPs, its index there).
    predicted_qps: dict[str, tuple[Node, int]] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(f"{QUANTIZER_ROOT}."):
            continue
        quantizer = graph_module.get_submodule(str(node.target))
        value = node.args[0]
        assert isinstance(value, Node)
        name = getattr(quantizer, "name", None)
        if name in sources:
            assert activation_qps is not None
            predictor = sources[name]
            _insert_predictor(lowered, node, value, predictor, activation_qps, predicted_qps)
        if isinstance(quantizer, BiasQuantizer):
            replacement = (
                _lower_bias(lowered, node, quantizer, value, predicted)
                if quantizer.active
                else value
            )
        elif not isinstance(quantizer, Quantizer):
            raise TypeError(f"unexpected module {type(quantizer).__name__} among the quantizers")
        elif not _is_active(quantizer):
            lowered.float_quantizers.append(quantizer.name)
            replacement = value
        elif isinstance(quantizer, PiecewiseQuantizer):
            tensor = _attribute(graph_module, str(value.target))
            replacement, branches = lower_piecewise_weight(
                graph_module, node, quantizer, tensor, piecewise
            )
            lowered.piecewise_branches[quantizer.name] = branches
            lowered.weights += 1
        elif quantizer.kind is QuantizerKind.WEIGHT:
            replacement = _lower_weight(lowered, node, quantizer, value, weight_format)
            lowered.weights += 1
        elif quantizer.name in predicted:
            if quantizer.name not in predicted_qps:
                raise ConfigError(
                    f"activation quantizer '{quantizer.name}' runs before its predictor's "
                    "source; quantize again with other --predictor-sources"
                )
            qps, index = predicted_qps[quantizer.name]
            module = PredictedQDQ(quantizer, index)
            replacement = _call_module(lowered, node, "qpp_predicted", module, (value, qps))
            lowered.activations += 1
            lowered.predicted_activations += 1
        else:
            replacement = _lower_activation(lowered, node, quantizer, value)
            lowered.activations += 1
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    if hasattr(graph_module, QUANTIZER_ROOT):
        delattr(graph_module, QUANTIZER_ROOT)
    graph_module.delete_all_unused_submodules()
    graph.lint()
    graph_module.recompile()
    return lowered


def _call_module(
    lowered: _Lowered, before: Node, stem: str, module: torch.nn.Module, args: tuple[Node, ...]
) -> Node:
    """A new submodule of the lowered graph, called before ``before`` on ``args``."""
    graph_module = lowered.graph_module
    name, index = stem, 0
    while hasattr(graph_module, name):
        index += 1
        name = f"{stem}_{index}"
    graph_module.add_submodule(name, module)
    with graph_module.graph.inserting_before(before):
        return graph_module.graph.call_module(name, args)


def _insert_predictor(
    lowered: _Lowered,
    node: Node,
    value: Node,
    predictor: LinearQPPredictor,
    activation_qps: ActivationQPs,
    predicted_qps: dict[str, tuple[Node, int]],
) -> None:
    """The predictor of ``node``'s quantizer, on its input, as graph ops (QPP §3): its outputs
    become the QPs of the quantizers it predicts (recorded in ``predicted_qps``)."""
    samplers = activation_qps.samplers
    names = [
        name
        for name in dict.fromkeys(name for name, _ in predictor.targets)
        if samplers[name].mode is QPMode.PREDICTED
    ]
    if not names:
        return
    meta = value.meta.get("val")
    if not isinstance(meta, torch.Tensor) or meta.ndim == 0:
        raise UnsupportedOpError(
            f"the shape of predictor source '{predictor.source}' is unknown; quantize again "
            "with other --predictor-sources"
        )
    module = PredictorModule(
        predictor,
        [samplers[name].quantizer for name in names],
        {name: samplers[name].nonnegative for name in names},
        math.prod(int(d) for d in meta.shape[1:]),
    )
    call = _call_module(lowered, node, "qpp_predictor", module, (value,))
    lowered.predictors += 1
    for index, name in enumerate(names):
        predicted_qps[name] = (call, index)


def _attribute(graph_module: GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    module = graph_module.get_submodule(owner) if owner else graph_module
    return getattr(module, leaf)


def _constant(lowered: _Lowered, stem: str, tensor: torch.Tensor) -> Node:
    """A new buffer on the graph module, read by a ``get_attr`` node at the insertion point."""
    graph_module = lowered.graph_module
    name = "qpp_export_" + re.sub(r"\W", "_", stem)
    while hasattr(graph_module, name):
        name += "_"
    graph_module.register_buffer(name, tensor.detach().clone())
    return graph_module.graph.get_attr(name)


def _lower_weight(
    lowered: _Lowered,
    node: Node,
    quantizer: Quantizer,
    weight: Node,
    weight_format: WeightFormat,
) -> Node:
    ops = _quantized_decomposed()
    tensor = _attribute(lowered.graph_module, str(weight.target))
    integer = quantizer.integer(tensor)
    values, zero_point = integer.values, quantizer.zero_point.round().to(torch.int64)
    qmin, qmax = quantizer.integer_range
    if quantizer.spec.is_signed and weight_format is WeightFormat.UINT8_SHIFTED:
        values, zero_point, qmin, qmax = values + 128, zero_point + 128, qmin + 128, qmax + 128
    dtype = torch.int8 if qmin < 0 else torch.uint8
    graph = lowered.graph_module.graph
    with graph.inserting_before(node):
        stored = _constant(lowered, quantizer.name, values.to(dtype))
        if quantizer.axis is None:
            output = graph.call_function(
                ops.dequantize_per_tensor.default,  # type: ignore[attr-defined]
                (stored, float(quantizer.scale), int(zero_point), qmin, qmax, dtype),
            )
        else:
            scales = _constant(lowered, f"{quantizer.name}.scale", quantizer.scale.float())
            zero_points = _constant(lowered, f"{quantizer.name}.zero_point", zero_point)
            output = graph.call_function(
                ops.dequantize_per_channel.default,  # type: ignore[attr-defined]
                (stored, scales, zero_points, quantizer.axis % tensor.ndim, qmin, qmax, dtype),
            )
    output.meta = dict(node.meta)
    return output


def _lower_activation(lowered: _Lowered, node: Node, quantizer: Quantizer, value: Node) -> Node:
    if quantizer.axis is not None:
        raise UnsupportedOpError(
            f"activation quantizer '{quantizer.name}' is per-channel, which ONNX Runtime's "
            "integer kernels do not take; quantize again with --activation-granularity "
            "per-tensor"
        )
    ops = _quantized_decomposed()
    qmin, qmax = quantizer.integer_range
    dtype = torch.int8 if quantizer.spec.is_signed else torch.uint8
    container = torch.iinfo(dtype)
    scale, zero_point = float(quantizer.scale), int(quantizer.zero_point)
    graph = lowered.graph_module.graph
    with graph.inserting_before(node):
        source = value
        if (qmin, qmax) != (container.min, container.max):
            # A narrower grid in an 8-bit container: clip in float to the grid's ends, which
            # QuantizeLinear then maps exactly onto qmin and qmax (it saturates only at 0/255).
            low, high = scale * (qmin - zero_point), scale * (qmax - zero_point)
            source = graph.call_function(torch.ops.aten.clamp.default, (value, low, high))
        quantized = graph.call_function(
            ops.quantize_per_tensor.default,  # type: ignore[attr-defined]
            (source, scale, zero_point, qmin, qmax, dtype),
        )
        output = graph.call_function(
            ops.dequantize_per_tensor.default,  # type: ignore[attr-defined]
            (quantized, scale, zero_point, qmin, qmax, dtype),
        )
    quantized.meta[QUANTIZER_NODE] = node.name
    output.meta = dict(node.meta)
    return output


def _lower_bias(
    lowered: _Lowered,
    node: Node,
    bias_quantizer: BiasQuantizer,
    bias: Node,
    predicted: set[str] | None = None,
) -> Node:
    """The bias on the int32 accumulator grid, exactly as the simulation rounds it
    (``qpp.quant.affine.quantize_bias``, white paper eq. 11).

    Convs and 2-D linears (ONNX Conv / Gemm) get an int32 initializer and ``DequantizeLinear``
    at scale ``s_x s_w``, which ORT's QLinearConv / QGemm fusions take as their int32 bias.
    Linears on 3-D inputs export as MatMul + Add, and ORT's MatMulIntegerToFloat adds a float
    bias: they get the dequantized values as a float initializer (the same numbers), as do
    layers whose input has predicted QPs (``predicted``): ``qpp.export.predictor`` runs those
    with integer kernels that add a float bias.
    """
    ops = _quantized_decomposed()
    graph_module = lowered.graph_module
    graph = graph_module.graph
    integer = quantize_bias(
        _attribute(graph_module, str(bias.target)),
        bias_quantizer.activation.scale,
        bias_quantizer.weight.scale,
    )
    (consumer,) = node.users
    as_int32 = bias_quantizer.activation.name not in (predicted or set()) and (
        op_kind(consumer) is OpKind.CONV
        or (
            op_kind(consumer) is OpKind.LINEAR
            and consumer.target not in (torch.ops.aten.addmm.default, torch.addmm)
            and _rank(consumer.args[0]) == 2
        )
    )
    with graph.inserting_before(node):
        if not as_int32:
            return _constant(lowered, f"{bias.target}.on_grid", integer.dequantize().float())
        stored = _constant(lowered, f"{bias.target}.int32", integer.values)
        scales = _constant(lowered, f"{bias.target}.scale", integer.scale.float())
        zero_points = _constant(
            lowered, f"{bias.target}.zero_point", integer.zero_point.to(torch.int64)
        )
        output = graph.call_function(
            ops.dequantize_per_channel.default,  # type: ignore[attr-defined]
            (stored, scales, zero_points, 0, *INT32_RANGE, torch.int32),
        )
    lowered.biases += 1
    return output


def _rank(value: object) -> int | None:
    meta = value.meta.get("val") if isinstance(value, Node) else None
    return meta.ndim if isinstance(meta, torch.Tensor) else None


# --- ONNX --------------------------------------------------------------------------------------


def check_output_path(path: Path, force: bool) -> None:
    """Refuse a folder, and an existing file unless ``force``."""
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; pass a file name such as model.onnx")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; choose another --onnx or pass --force")


def export_onnx(
    model: QuantizedModel,
    example_inputs: Sequence[torch.Tensor],
    path: Path,
    weight_format: WeightFormat | None = None,
    input_names: Sequence[str] | None = None,
    force: bool = False,
    piecewise: str = "branches",
    activation_qps: ActivationQPs | None = None,
) -> ExportReport:
    """Write ``model`` as an ONNX QDQ graph to ``path`` (dim 0 of every input dynamic).

    ``weight_format=None`` picks the format that stays exact on this machine's CPU
    (``choose_weight_format``); ``piecewise``: the form of PWLQ weights
    (``qpp.export.piecewise``: branches or dequantized); ``activation_qps``: the predictors of
    a run with predicted activation QPs, which the graph then computes per input (batch 1,
    ``qpp.export.predictor``).
    """
    path = Path(path)
    check_output_path(path, force)
    if weight_format is None:
        weight_format = choose_weight_format(model, detect_isa())
    lowered = _lower(model, weight_format, piecewise, activation_qps)
    inputs = tuple(example_inputs)
    names = list(input_names) if input_names else [f"input{i}" for i in range(len(inputs))]
    predicted = lowered.predicted_activations > 0
    if predicted:
        inputs = tuple(x[:PREDICTED_BATCH] if x.ndim else x for x in inputs)
    proto = onnx_graph(
        lowered.graph_module, inputs, names, dynamic_batch=not predicted, predicted=predicted
    )
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return ExportReport(
        path=str(path),
        weight_format=weight_format.value,
        bytes=path.stat().st_size,
        quantized_weights=lowered.weights,
        quantized_activations=lowered.activations,
        int32_biases=lowered.biases,
        opset=opset,
        float_quantizers=lowered.float_quantizers,
        notes=_notes(model, weight_format)
        + piecewise_note(lowered.piecewise_branches)
        + (
            [
                PREDICTED_NOTE.format(
                    predictors=lowered.predictors,
                    activations=lowered.predicted_activations,
                    batch=PREDICTED_BATCH,
                )
            ]
            if predicted
            else []
        ),
        piecewise_branches=lowered.piecewise_branches,
        predicted_activations=lowered.predicted_activations,
        predictors=lowered.predictors,
    )


def onnx_graph(
    lowered: GraphModule,
    inputs: tuple[torch.Tensor, ...],
    names: list[str],
    dynamic_batch: bool = True,
    predicted: bool = False,
) -> object:
    """The ``ModelProto`` of a lowered graph (``lower_quantizers``), with the rewrites that make
    ORT run it faster and the file smaller (``qpp.export.compact``). ``predicted``: the graph
    computes activation QPs at run time (the QPP predictor), whose layers get integer kernels
    that take their input scale as a tensor."""
    proto = _torch_export(lowered, inputs, names, dynamic_batch)
    if predicted:
        integer_kernels_with_input_scales(proto)
    global_average_pools(proto)
    hard_swishes(proto)
    _strip_metadata(proto)
    integer_branch_convs(proto)
    exact_scalar_operands(proto)
    gathered_embeddings(proto)
    drop_zero_zero_points(proto)
    narrow_int32_biases(proto)
    drop_default_conv_attributes(proto)
    short_value_names(proto)
    return proto


def _notes(model: QuantizedModel, weight_format: WeightFormat) -> list[str]:
    notes = [SHIFTED_NOTE] if weight_format is WeightFormat.UINT8_SHIFTED else []
    if not model.config.int32_bias:
        notes.append(
            "the simulation keeps biases in float (int32_bias false), so they are exported in "
            "float: ORT runs such Gemms in float and rounds conv biases itself; quantize with "
            "int32_bias true (the default) for an exact integer deployment"
        )
    return notes


def export_float_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str] | None = None,
) -> None:
    """The FP32 model as ONNX, exported the same way as the QDQ graph (for comparisons)."""
    import onnx

    inputs = tuple(example_inputs)
    names = list(input_names) if input_names else [f"input{i}" for i in range(len(inputs))]
    proto = _torch_export(model, inputs, names)
    _strip_metadata(proto)
    onnx.save(proto, str(path))


def _torch_export(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: list[str],
    dynamic_batch: bool = True,
) -> object:
    """``torch.onnx.export`` (dynamo) to an in-memory ``ModelProto``; a failure names the op.
    Dim 0 of every input is dynamic when ``dynamic_batch`` (unless the model bakes it in)."""
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if x.ndim > 0 else None for x in inputs)
    from qpp.graph.capture import _torch_reports_silenced

    try:
        # The exporter prints its progress to stdout, which must stay clean for --json.
        with (
            warnings.catch_warnings(),
            _torch_reports_silenced(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            options = {"dynamo": True, "input_names": names}
            options["custom_translation_table"] = translations()
            try:
                if not dynamic_batch:
                    raise ValueError("the batch size is fixed")
                program = torch.onnx.export(model, inputs, dynamic_shapes=dynamic, **options)
            except Exception:
                # Models whose batch size is baked in (a reshape to a constant) export static.
                program = torch.onnx.export(model, inputs, **options)
    except Exception as error:
        raise UnsupportedOpError(_export_failure(error)) from None
    assert program is not None
    return program.model_proto


def _export_failure(error: BaseException) -> str:
    """One line naming the op the exporter could not translate (from the error's causes)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    text = " ".join(str(e) for e in chain)
    op = re.search(r"OpOverload\(op='([\w.]+)'", text) or re.search(
        r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]", text
    )
    what = f"the op {op.group(1)}" if op else "an op of this model"
    reason = str(chain[-1]).strip().splitlines()[0][:160] if str(chain[-1]).strip() else ""
    return (
        f"the ONNX exporter cannot express {what} ({type(chain[-1]).__name__}: {reason}); "
        "export a model without it, or rewrite that part with standard ops"
    )


def _strip_metadata(proto: object) -> None:
    """Drop the exporter's per-node metadata (stack traces, module paths) and intermediate
    shapes: a third of a small model's file, and nothing ONNX Runtime needs."""
    graph = proto.graph  # type: ignore[attr-defined]
    del graph.value_info[:]  # intermediate shapes: ORT infers them again
    del graph.metadata_props[:]  # the exporter's ExportedProgram signature: 37 KB on ppocr-cls
    for node in graph.node:
        del node.metadata_props[:]
    for value in [*graph.input, *graph.output, *graph.initializer]:
        if hasattr(value, "metadata_props"):
            del value.metadata_props[:]
