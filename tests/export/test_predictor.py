"""QPP's predictors inside the ONNX graph: what it holds, which kernels ORT runs, and parity
of the predicted QPs and outputs with the simulation (``qpp.export.predictor``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qpp.api import calibrate, prepare
from qpp.errors import ConfigError
from qpp.export.job import single_samples
from qpp.export.onnx import export_onnx
from qpp.export.ort import KernelReport, make_session, optimized_op_counts, run_session
from qpp.export.predictor import check_predicted_batch, check_predicted_export
from qpp.predict import ActivationQPs, configure_activation_qps, settings_from_config
from qpp.quant.affine import choose_qparams
from qpp.sim.config import QuantConfig
from qpp.zoo.digits import DigitsCNN


@dataclass
class Exported:
    model: object
    handle: ActivationQPs
    batches: list[tuple[torch.Tensor, ...]]
    path: Path
    kernels: KernelReport
    proto: onnx.ModelProto


def _export(module: nn.Module, calibration, evaluation, path: Path, **config) -> Exported:  # type: ignore[no-untyped-def]
    quant_config = QuantConfig(activation_ranges="predicted", **config)
    model = prepare(module, calibration[0], quant_config)
    calibrate(model, calibration)
    handle = configure_activation_qps(model, calibration, settings_from_config(quant_config))
    export_onnx(model, calibration[0], path, activation_qps=handle)
    kernels = KernelReport.from_counts(optimized_op_counts(path, path.parent))
    return Exported(model, handle, evaluation, path, kernels, onnx.load(str(path)))


def _simulated_and_deployed(exported: Exported) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        simulated = torch.cat([exported.model(*batch) for batch in exported.batches]).numpy()
    session = make_session(exported.path)
    (deployed,) = run_session(session, single_samples(exported.batches))
    return simulated, deployed


@pytest.fixture(scope="module", params=[8, 4], ids=["A8", "A4"])
def digits(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    entry = DigitsCNN(num_calibration=32)
    evaluation = [tuple(x[:24] for x in entry.evaluation_set().batches[0])]
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    return _export(
        entry.load_model(),
        entry.calibration_set(),
        evaluation,
        path,
        activation_bits=request.param,
        predictor_sources="auto:3",
    )


def test_the_graph_computes_the_predictors_and_ort_runs_integer_kernels(digits: Exported) -> None:
    ops = Counter(node.op_type for node in digits.proto.graph.node)
    assert len(digits.handle.predictors) == 3
    assert ops["Exp"] == ops["MatMul"] == 3  # one of each per predictor
    assert ops["TopK"] == 2 * 3  # the default uniform features: one per part of x
    constants = {t.name for t in digits.proto.graph.initializer}
    computed = [
        n
        for n in digits.proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[1] not in constants
    ]
    assert len(computed) == 8  # every activation quantizer of the CNN is predicted
    layers = dict(digits.kernels.integer)
    # At 8 bits ORT also pools in integers, taking the predicted scale as a tensor.
    assert layers.pop("QLinearGlobalAveragePool", 1) == 1
    assert layers == {"ConvInteger": 5, "MatMulIntegerToFloat": 1}
    assert "Conv" not in digits.kernels.float_compute
    assert "Gemm" not in digits.kernels.float_compute


def test_ort_outputs_match_the_simulation_within_one_output_step(digits: Exported) -> None:
    simulated, deployed = _simulated_and_deployed(digits)
    step = (simulated.max() - simulated.min()) / 255
    assert np.abs(simulated - deployed).max() <= step
    assert (simulated.argmax(1) == deployed.argmax(1)).mean() >= 0.95


def test_the_graph_takes_batch_one(digits: Exported) -> None:
    shape = digits.proto.graph.input[0].type.tensor_type.shape.dim
    assert shape[0].dim_value == 1
    with pytest.raises(ConfigError, match="batch 1, got 4"):
        check_predicted_batch(4)


@pytest.mark.parametrize(
    "features",
    ["mean,max,q0.9,q0.99,q0.999", "neg_max,std,pos_q0.99,q0.9,pos_max,neg_q0.999,mean"],
    ids=["magnitudes", "signed"],
)
def test_ort_predicted_scales_equal_the_simulations(tmp_path: Path, features: str) -> None:
    """One predictor on the network input (the paper's QPP): ORT reads the same tensor, so its
    float64 features and map round to the very scales and zero points of the simulation, with
    signed features (a TopK per part of x, in another order than the settings') as well."""
    entry = DigitsCNN(num_calibration=32)

    def signed(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (2 * batch[0] - 1, *batch[1:])  # pixels in [-1, 1]: both parts of x vary

    sample = signed(tuple(x[3:4] for x in entry.evaluation_set().batches[0]))
    exported = _export(
        entry.load_model(),
        [signed(tuple(batch)) for batch in entry.calibration_set()],
        [sample],
        tmp_path / "one.onnx",
        predictor_sources="",
        predictor_elements=None,
        predictor_features=features,
    )
    graph = exported.proto.graph
    tops = sum(node.op_type == "TopK" for node in graph.node)
    assert tops == (1 if features.startswith("mean") else 3)
    constants = {t.name for t in graph.initializer}
    quantizes = [
        n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[1] not in constants
    ]
    for node in quantizes:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[1]))
        graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[2]))
    path = tmp_path / "one_with_scales.onnx"
    onnx.save(exported.proto, str(path))
    values = make_session(path).run(None, {"input0": sample[0].numpy()})[1:]
    deployed = sorted((float(s), int(z)) for s, z in zip(values[::2], values[1::2], strict=True))
    simulated = []
    with torch.no_grad():
        exported.model(*sample)
    for sampler in exported.handle.samplers.values():
        if sampler.predicted is None:
            continue
        spec = sampler.quantizer.spec
        scale, zero = choose_qparams(
            sampler.predicted.lo, sampler.predicted.hi, spec.bits, spec.symmetric, spec.is_signed
        )
        simulated.append((float(scale[0]), int(zero[0])))
    assert len(deployed) == len(quantizes) == 8  # the source, the network input, included
    assert deployed == sorted(simulated)


class Attention(nn.Module):
    """A linear on 3-D tokens, a product of two activations (scores), softmax, a second one."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.key = nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.query(x) @ self.key(x).transpose(1, 2)
        return self.out(torch.softmax(scores, dim=-1) @ x)


def test_linears_and_activation_products_run_as_matmul_integer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    scales = torch.exp(torch.randn(48, 1, 1))
    data = scales * torch.randn(48, 12, 16)
    calibration = [(data[i : i + 8],) for i in range(0, 32, 8)]
    exported = _export(
        Attention().eval(),
        calibration,
        [(data[32:],)],
        tmp_path / "attention.onnx",
        policy="full",
        predictor_sources="auto:2",
    )
    assert exported.kernels.integer.get("MatMulIntegerToFloat", 0) >= 4
    assert (
        "MatMul"
        not in KernelReport.from_counts(
            Counter(n.op_type for n in exported.proto.graph.node if n.op_type != "MatMul")
        ).float_compute
    )
    simulated, deployed = _simulated_and_deployed(exported)
    step = (simulated.max() - simulated.min()) / 255
    assert np.abs(simulated - deployed).max() <= step


@pytest.mark.parametrize(
    ("ranges", "scheme", "message"),
    [
        ("dynamic", "uniform", "reduction over every tensor"),
        ("predicted", "dense-sparse", "float side tensor"),
        ("static", "dense-sparse", "float side tensor"),
        ("predicted", "uniform", "no fitted predictors"),
    ],
)
def test_unexportable_qps_are_refused_in_one_line(ranges: str, scheme: str, message: str) -> None:
    config = QuantConfig(activation_ranges=ranges, activation_scheme=scheme)
    with pytest.raises(ConfigError, match=message) as error:
        check_predicted_export(config, None)
    assert "\n" not in str(error.value)
