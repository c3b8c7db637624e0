"""``QuantizedModel``: a captured graph with named quantizer modules inserted.

Insertion follows a ``Placement`` (the policy decides, this module only transforms). Each
quantizer has a readable name; quantizers can be enabled, disabled and re-specified by name,
glob or kind, calibrated inside ``calibration()``, and their encodings saved to / loaded from
JSON. Nothing here knows about ONNX.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.fx import GraphModule, Node

from qpp.errors import ConfigError, EncodingsError
from qpp.graph.ops import OpKind, op_kind, operand_roles
from qpp.graph.placement import ActivationSite, Placement, WeightSite
from qpp.quant.spec import QuantSpec
from qpp.sim.bias import BiasQuantizer
from qpp.sim.config import QuantConfig
from qpp.sim.piecewise import PiecewiseQuantizer
from qpp.sim.quantizer import Mode, Quantizer, QuantizerKind

QUANTIZER_ROOT = "qpp_quantizers"


class QuantizedModel(torch.nn.Module):
    """A simulated quantized model: call it like the original model."""

    def __init__(
        self, graph_module: GraphModule, placement: Placement, config: QuantConfig
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.placement = placement
        self.quantizers = torch.nn.ModuleDict()
        graph_module.add_module(QUANTIZER_ROOT, self.quantizers)
        self._by_name: dict[str, Quantizer] = {}
        self._weight_targets: dict[str, str] = {}
        self._insert(placement)
        config.check_override_names(list(self._by_name))
        self.apply_config_overrides()

    # --- construction ---------------------------------------------------------------------------

    def _new_quantizer(self, name: str, kind: QuantizerKind, spec: QuantSpec) -> Quantizer:
        if name in self._by_name:
            return self._by_name[name]
        key = re.sub(r"\W", "_", name)
        while key in self.quantizers:
            key += "_"
        quantizer = (PiecewiseQuantizer if spec.piecewise else Quantizer)(name, kind, spec)
        self.quantizers[key] = quantizer
        self._by_name[name] = quantizer
        quantizer.module_key = key  # type: ignore[assignment]
        quantizer.exact_plateaus = self.config.exact_activation_plateaus
        return quantizer

    def _insert(self, placement: Placement) -> None:
        graph = self.graph_module.graph
        nodes = {node.name: node for node in graph.nodes}
        for site in placement.weights:
            self._insert_weight(graph, nodes, site)
        for site in placement.activations:
            self._insert_activation(graph, nodes, site)
        if self.config.int32_bias:
            self._insert_bias_quantizers(graph)
        graph.lint()
        self.graph_module.recompile()

    def _call(self, graph: torch.fx.Graph, quantizer: Quantizer, value: Node) -> Node:
        node = graph.call_module(self.module_target(quantizer.name), (value,))
        node.meta = {
            k: v for k, v in value.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")
        }
        return node

    def _insert_weight(
        self, graph: torch.fx.Graph, nodes: dict[str, Node], site: WeightSite
    ) -> None:
        quantizer = self._new_quantizer(
            site.name, QuantizerKind.WEIGHT, self.config.weight_spec(site.axis)
        )
        weight, consumer = nodes[site.weight_node], nodes[site.consumer]
        self._weight_targets[site.name] = str(weight.target)
        with graph.inserting_after(weight):
            quantized = self._call(graph, quantizer, weight)
        consumer.replace_input_with(weight, quantized)

    def _insert_activation(
        self, graph: torch.fx.Graph, nodes: dict[str, Node], site: ActivationSite
    ) -> None:
        quantizer = self._new_quantizer(
            site.name, QuantizerKind.ACTIVATION, self.config.activation_spec()
        )
        value = nodes[site.value]
        with graph.inserting_after(value):
            quantized = self._call(graph, quantizer, value)
        if site.consumers is None:
            value.replace_all_uses_with(
                quantized, delete_user_cb=lambda user: user is not quantized
            )
        else:
            for consumer_name in site.consumers:
                nodes[consumer_name].replace_input_with(value, quantized)

    def _quantizer_at(self, node: object) -> Quantizer | None:
        if not (isinstance(node, Node) and node.op == "call_module"):
            return None
        prefix = f"{QUANTIZER_ROOT}."
        target = str(node.target)
        if not target.startswith(prefix):
            return None
        module = self.quantizers[target[len(prefix) :]]
        return module if isinstance(module, Quantizer) else None

    def _insert_bias_quantizers(self, graph: torch.fx.Graph) -> None:
        """Put the bias of every conv/linear whose input and weight are quantized on the int32
        accumulator grid (``qpp.sim.bias``). The input may reach the op through layout ops
        (reshape, max-pool, ...), which keep its grid."""
        modules = dict(self.graph_module.named_modules())
        for node in list(graph.nodes):
            kind = op_kind(node, modules)
            if kind not in (OpKind.CONV, OpKind.LINEAR):
                continue
            roles = operand_roles(node, kind)
            bias_index = 0 if roles.activations == (1,) else 2  # addmm(bias, x, w)
            bias = node.args[bias_index] if len(node.args) > bias_index else None
            if not (isinstance(bias, Node) and bias.op == "get_attr" and roles.weight is not None):
                continue
            weight = self._quantizer_at(node.args[roles.weight])
            source = node.args[roles.activations[0]]
            while isinstance(source, Node) and self._quantizer_at(source) is None:
                if op_kind(source, modules) is not OpKind.LAYOUT or not source.args:
                    break
                source = source.args[0]
            activation = self._quantizer_at(source)
            if weight is None or activation is None or activation.kind is QuantizerKind.WEIGHT:
                continue
            key = re.sub(r"\W", "_", f"{bias.target}.int32")
            while key in self.quantizers:
                key += "_"
            self.quantizers[key] = BiasQuantizer(str(bias.target), activation, weight)
            with graph.inserting_before(node):
                quantized = graph.call_module(f"{QUANTIZER_ROOT}.{key}", (bias,))
            quantized.meta = {k: v for k, v in bias.meta.items() if k in ("val", "tensor_meta")}
            node.replace_input_with(bias, quantized)

    def bias_quantizers(self) -> list[BiasQuantizer]:
        """The biases simulated on the int32 accumulator grid (``QuantConfig.int32_bias``)."""
        return [m for m in self.quantizers.values() if isinstance(m, BiasQuantizer)]

    def apply_config_overrides(self) -> None:
        """Apply ``config.overrides`` (bits, granularity, estimator, enabled) by name or glob."""
        for name, quantizer in self._by_name.items():
            for override in self.config.overrides_for(name):
                changes = override.changes()
                if changes:
                    quantizer.set_spec(quantizer.spec.with_changes(**changes))
                if override.enabled is not None:
                    quantizer.enabled = override.enabled

    # --- access ---------------------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.graph_module(*inputs)

    def module_target(self, name: str) -> str:
        """The ``call_module`` target by which the graph runs quantizer ``name``."""
        return f"{QUANTIZER_ROOT}.{self.quantizer(name).module_key}"  # type: ignore[attr-defined]

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def quantizer(self, name: str) -> Quantizer:
        if name not in self._by_name:
            raise ConfigError(f"no quantizer is named '{name}'; see QuantizedModel.names")
        return self._by_name[name]

    def select(self, pattern: str | None = None, kind: str | None = None) -> list[Quantizer]:
        """Quantizers whose name equals or glob-matches ``pattern`` and whose kind is ``kind``."""
        if kind is not None and kind not in {k.value for k in QuantizerKind}:
            raise ConfigError(f"unknown quantizer kind '{kind}'; use weight or activation")
        chosen = [
            q
            for name, q in self._by_name.items()
            if (pattern is None or name == pattern or fnmatch.fnmatchcase(name, pattern))
            and (kind is None or q.kind.value == kind)
        ]
        if pattern is not None and not chosen:
            raise ConfigError(f"no quantizer matches '{pattern}'; see QuantizedModel.names")
        return chosen

    def set_enabled(
        self, enabled: bool, pattern: str | None = None, kind: str | None = None
    ) -> None:
        for quantizer in self.select(pattern, kind):
            quantizer.enabled = enabled

    def weight_target(self, name: str) -> str:
        """The graph attribute path of the weight that quantizer ``name`` quantizes."""
        return self._weight_targets[name]

    def weight(self, name: str) -> torch.Tensor:
        """The float weight tensor the weight quantizer ``name`` quantizes."""
        owner, _, leaf = self._weight_targets[name].rpartition(".")
        module = self.graph_module.get_submodule(owner) if owner else self.graph_module
        return getattr(module, leaf)

    def weight_quantizers(self) -> Iterator[tuple[Quantizer, torch.Tensor]]:
        for name in self._weight_targets:
            yield self._by_name[name], self.weight(name)

    def export_onnx(
        self,
        path: str | Path,
        example_inputs: Sequence[torch.Tensor],
        input_names: Sequence[str] | None = None,
        force: bool = False,
    ) -> object:
        """Write this model as an ONNX QDQ graph for ONNX Runtime (``qpp.export.onnx``, which
        picks the weight format that stays exact on this CPU); returns its ``ExportReport``."""
        from qpp.export.onnx import export_onnx

        return export_onnx(self, example_inputs, Path(path), None, input_names, force)

    # --- calibration ----------------------------------------------------------------------------

    def compute_weight_encodings(
        self, input_moments: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Every weight quantizer's encoding from its weight; ``input_moments`` (weight attribute
        path -> that layer's ``E[x xᵀ]``, ``qpp.ptq.input_moments``) goes to the quantizers of
        those weights, for an output-error objective."""
        moments = input_moments or {}
        for quantizer, weight in self.weight_quantizers():
            moment = moments.get(self.weight_target(quantizer.name))
            quantizer.compute_weight_encoding(weight, moment)

    @contextmanager
    def calibration(self, weights: bool = True) -> Iterator[None]:
        """Observe activations for every forward inside the block; set encodings on exit.

        Weight encodings are computed first (unless ``weights=False``: they were set before and
        must stay, e.g. after AdaRound) so activations are observed behind quantized weights,
        as they will run.
        """
        if weights:
            self.compute_weight_encodings()
        activations = [q for q in self._by_name.values() if q.kind is QuantizerKind.ACTIVATION]
        for quantizer in activations:
            quantizer.start_observing()
        try:
            yield
        except BaseException:
            for quantizer in activations:
                quantizer.mode = Mode.OFF
            raise
        for quantizer in activations:
            if quantizer.has_statistics:
                quantizer.compute_encoding()
            else:
                # Never reached by the calibration data (e.g. a branch not taken).
                quantizer.mode = Mode.OFF
                quantizer.enabled = False

    # --- encodings ------------------------------------------------------------------------------

    def encodings(self) -> dict[str, dict[str, object]]:
        """Every quantizer's spec, state and QPs, as JSON-ready data."""
        return {
            name: {
                "kind": q.kind.value,
                "enabled": q.enabled,
                "calibrated": q.calibrated,
                "spec": q.spec.to_dict(),
                "scale": q.scale.reshape(-1).tolist(),
                "zero_point": [int(z) for z in q.zero_point.reshape(-1).tolist()],
                **q.extra_encoding(),
            }
            for name, q in self._by_name.items()
        }

    def load_encodings(self, encodings: dict[str, dict[str, object]]) -> None:
        """Set every quantizer from ``encodings``; the names must match this model's exactly."""
        missing = [n for n in self._by_name if n not in encodings]
        extra = [n for n in encodings if n not in self._by_name]
        if missing or extra:
            detail = []
            if missing:
                detail.append(
                    f"{len(missing)} of this model's quantizers are missing (e.g. '{missing[0]}')"
                )
            if extra:
                detail.append(f"{len(extra)} names are unknown here (e.g. '{extra[0]}')")
            raise EncodingsError(
                "these encodings belong to another model: "
                + "; ".join(detail)
                + "; load them into the model (and config) they were computed for"
            )
        for name, data in encodings.items():
            quantizer = self._by_name[name]
            try:
                spec = QuantSpec.from_dict(dict(data["spec"]))  # type: ignore[call-overload]
                if bool(spec.piecewise) != isinstance(quantizer, PiecewiseQuantizer):
                    raise EncodingsError(
                        f"quantizer '{name}' is {type(quantizer).__name__} in this model but "
                        "the encodings were computed with another weight/activation quantizer "
                        "(uniform or pwlq); load them with the config they were computed with"
                    )
                quantizer.set_spec(spec)
                scale = torch.tensor(data["scale"], dtype=torch.float32)
                zero_point = torch.tensor(data["zero_point"], dtype=torch.float32)
            except (KeyError, TypeError, ValueError) as error:
                raise EncodingsError(f"encoding of '{name}' is malformed ({error})") from None
            self._check_encoding_size(name, scale, zero_point)
            if quantizer.axis is None:
                scale, zero_point = scale.reshape(()), zero_point.reshape(())
            if data.get("calibrated", True):
                quantizer.set_encoding(scale, zero_point)
                quantizer.load_extra_encoding(data)
            quantizer.enabled = bool(data.get("enabled", True))

    def _check_encoding_size(
        self, name: str, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> None:
        """One scale and zero point per tensor, or one per channel of the quantized weight."""
        quantizer = self._by_name[name]
        if quantizer.axis is None:
            expected: int | None = 1
        elif quantizer.kind is QuantizerKind.WEIGHT:
            weight, axis = self.weight(name), quantizer.axis
            if not -weight.ndim <= axis < weight.ndim:
                raise EncodingsError(
                    f"encoding of '{name}' has channel axis {axis}, but its weight has "
                    f"{weight.ndim} dimensions; it belongs to another model, quantize again"
                )
            expected = weight.shape[axis]
        else:
            expected = None  # an activation's channel count is known only when it runs
        wanted = scale.numel() if expected is None else expected
        if scale.numel() != wanted or zero_point.numel() != wanted:
            raise EncodingsError(
                f"encoding of '{name}' has {scale.numel()} scales and {zero_point.numel()} zero "
                f"points but the model needs {wanted}; it belongs to another model, so load it "
                "into (or evaluate the folder with) the model it was made from, or quantize again"
            )
