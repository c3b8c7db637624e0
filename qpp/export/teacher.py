"""Teacher-forced parity: every quantized tensor of the ORT graph against the simulation's.

End-to-end parity (``qpp.export.ort.check_parity``) compares outputs only, and one value that
lies on a rounding boundary (float accumulation order: torch's conv vs ORT's integer kernel and
float32 requantization multiplier) flips one step, which the next layers can amplify into many.
Here each op is fed the *simulation's* integer inputs instead of ORT's own: the graph is
exported with every activation's ``QuantizeLinear`` output cut off from its ``DequantizeLinear``,
which reads a graph input (the teacher: the simulation's integers for that tensor) instead; the
cut-off ``QuantizeLinear`` outputs become graph outputs (the student). So every quantized tensor
is checked for what its own op computes, with ORT's graph optimizations (the integer kernels)
on, and a float tie shows as the one step it is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.graph import CodeGen

from qpp.export.isa import WeightFormat, detect_isa
from qpp.export.onnx import QUANTIZER_NODE, choose_weight_format, lower_quantizers, onnx_graph
from qpp.export.ort import MAX_STEPS, KernelReport, make_session
from qpp.sim.model import QuantizedModel
from qpp.sim.quantizer import Quantizer


@dataclass(frozen=True)
class TensorParity:
    """One quantized tensor: ORT's integers (fed the simulation's inputs) against the
    simulation's, in steps of its grid."""

    quantizer: str
    max_steps: int
    differing: int
    values: int


@dataclass
class TeacherReport:
    tensors: list[TensorParity]
    batches: int
    kernels: KernelReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def max_steps(self) -> int:
        return max((t.max_steps for t in self.tensors), default=0)

    @property
    def passed(self) -> bool:
        """Every quantized tensor within ``MAX_STEPS`` steps of the simulation."""
        return self.max_steps <= MAX_STEPS

    @property
    def differing_fraction(self) -> float:
        values = sum(t.values for t in self.tensors)
        return sum(t.differing for t in self.tensors) / values if values else 0.0

    def as_dict(self) -> dict[str, object]:
        worst = max(self.tensors, key=lambda t: t.max_steps, default=None)
        return {
            "tensors": len(self.tensors),
            "batches": self.batches,
            "max_steps": self.max_steps,
            "worst_tensor": None if worst is None else worst.quantizer,
            "differing_fraction": self.differing_fraction,
            "passed": self.passed,
            "kernels": None if self.kernels is None else self.kernels.__dict__,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class _Student:
    node: str  # the simulation's quantizer node
    quantizer: Quantizer


def _cut_quantizers(lowered: GraphModule, model: QuantizedModel) -> list[_Student]:
    """Rewire ``lowered`` (in place): each activation's dequantize reads a new input, and its
    quantize op becomes an extra output. Returns the students in output order."""
    graph = lowered.graph
    last = [node for node in graph.nodes if node.op == "placeholder"][-1]
    output = next(node for node in graph.nodes if node.op == "output")
    modules = dict(model.graph_module.named_modules())
    sim_nodes = {node.name: node for node in model.graph_module.graph.nodes}
    students: list[tuple[Node, _Student]] = []
    for node in list(graph.nodes):
        source = node.meta.get(QUANTIZER_NODE)
        if source is None:
            continue
        with graph.inserting_after(last):
            teacher = graph.placeholder(f"teacher_{len(students)}")
        last = teacher
        node.replace_all_uses_with(teacher)
        quantizer = modules[str(sim_nodes[source].target)]
        assert isinstance(quantizer, Quantizer)
        students.append((node, _Student(source, quantizer)))
    results = output.args[0]
    originals = list(results) if isinstance(results, tuple | list) else [results]
    output.args = (tuple(originals + [node for node, _ in students]),)
    # A captured graph's code generator expects its original inputs (a pytree spec): use the
    # plain one, whose signature is the placeholders.
    graph._codegen = CodeGen()
    graph.lint()
    lowered.recompile()
    return [student for _, student in students]


class _Recorder(Interpreter):
    """Runs the simulation and keeps the integer values of the named quantizers' inputs."""

    def __init__(self, module: GraphModule, wanted: dict[str, Quantizer]) -> None:
        super().__init__(module)
        self.wanted = wanted
        self.integers: dict[str, np.ndarray] = {}

    def run_node(self, node: Node) -> object:
        result = super().run_node(node)
        quantizer = self.wanted.get(node.name)
        if quantizer is not None:
            args, _ = self.fetch_args_kwargs_from_env(node)
            values = quantizer.integer(args[0]).values
            dtype = np.int8 if quantizer.spec.is_signed else np.uint8
            self.integers[node.name] = values.to(torch.int64).numpy().astype(dtype)
        return result


def simulated_integers(
    model: QuantizedModel, batch: Sequence[torch.Tensor], students: list[_Student]
) -> list[np.ndarray]:
    """The simulation's integers of every student tensor on ``batch``."""
    recorder = _Recorder(model.graph_module, {s.node: s.quantizer for s in students})
    with torch.no_grad():
        recorder.run(*batch)
    return [recorder.integers[s.node] for s in students]


def teacher_forced_parity(
    model: QuantizedModel,
    batches: Sequence[Sequence[torch.Tensor]],
    input_names: Sequence[str],
    weight_format: WeightFormat | None = None,
    piecewise: str = "branches",
    threads: int = 1,
) -> TeacherReport:
    """Compare every activation quantizer's integers in ORT (fed the simulation's inputs,
    graph optimizations on) with the simulation's, over ``batches``.

    The teacher graph is exported with static shapes (a quantized tensor's dim 0 is not always
    the batch), so only batches shaped like the first are run.
    """
    if weight_format is None:
        weight_format = choose_weight_format(model, detect_isa())
    lowered = lower_quantizers(model, weight_format, piecewise)
    students = _cut_quantizers(lowered, model)
    example = tuple(batches[0])
    teachers = simulated_integers(model, example, students)
    teacher_names = [f"teacher_{i}" for i in range(len(students))]
    inputs = (*example, *(torch.from_numpy(t) for t in teachers))
    proto = onnx_graph(lowered, inputs, [*input_names, *teacher_names], dynamic_batch=False)
    with tempfile.TemporaryDirectory(prefix="qpp-teacher.") as folder:
        optimized = Path(folder) / "teacher.optimized.onnx"
        session = make_session(proto.SerializeToString(), threads, optimized)  # type: ignore[attr-defined]
        import onnx

        graph = onnx.load(str(optimized), load_external_data=False).graph
        from collections import Counter

        kernels = KernelReport.from_counts(Counter(node.op_type for node in graph.node))
    accepted = {value.name for value in session.get_inputs()}  # type: ignore[attr-defined]
    shapes = [tuple(t.shape) for t in example]
    worst = np.zeros(len(students), np.int64)
    differing = np.zeros(len(students), np.int64)
    counts = np.zeros(len(students), np.int64)
    used = 0
    for batch in batches:
        if [tuple(t.shape) for t in batch] != shapes:
            continue
        teachers = simulated_integers(model, batch, students)
        feed = {
            name: value
            for name, value in zip(
                [*input_names, *teacher_names],
                [*(t.numpy() for t in batch), *teachers],
                strict=True,
            )
            if name in accepted
        }
        outputs = session.run(None, feed)  # type: ignore[attr-defined]
        produced = outputs[len(outputs) - len(students) :]
        for index, (ort_values, sim_values) in enumerate(zip(produced, teachers, strict=True)):
            steps = np.abs(ort_values.astype(np.int64) - sim_values.astype(np.int64))
            worst[index] = max(worst[index], int(steps.max()) if steps.size else 0)
            differing[index] += int((steps > 0).sum())
            counts[index] += steps.size
        used += 1
    tensors = [
        TensorParity(s.quantizer.name, int(w), int(d), int(c))
        for s, w, d, c in zip(students, worst, differing, counts, strict=True)
    ]
    notes = []
    if used < len(batches):
        notes.append(f"{len(batches) - used} batch(es) shaped unlike the first were not run")
    return TeacherReport(tensors, used, kernels, notes)


__all__ = ["TeacherReport", "TensorParity", "teacher_forced_parity"]
