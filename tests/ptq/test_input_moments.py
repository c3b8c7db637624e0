"""Input moments ``E[x xᵀ]`` per weight layer, and PWLQ breakpoints on the output error."""

import pytest
import torch
from torch import nn

import qpp
from qpp.errors import ConfigError
from qpp.ptq.input_moments import compute_weight_encodings, input_moments
from qpp.quant.observers import channels_first
from qpp.quant.pwl import output_bias_correction, output_errors
from qpp.quant.spec import PiecewiseSpec
from qpp.sim.config import QuantConfig


class ConvStack(nn.Module):
    """A strided padded conv, a grouped conv, a depthwise conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 6, (1, 3), groups=2, padding=(0, 2), dilation=(1, 2))
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = self.depthwise(torch.relu(self.grouped(x)))
        return self.head(x.flatten(1))


def _layer_inputs(model: nn.Module, batches: list[tuple[torch.Tensor]]) -> dict[str, list]:
    seen: dict[str, list] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, []).append(args[0])
        )
        for name, module in model.named_children()
    ]
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    for hook in hooks:
        hook.remove()
    return seen


def test_moments_give_each_layers_mean_squared_output_change() -> None:
    """``Δwᵀ H Δw`` per channel equals the measured mean of ``(Δw * x)²`` over samples and
    positions, for strided, padded, dilated, grouped and depthwise convs and a linear layer."""
    torch.manual_seed(0)
    model = ConvStack().eval()
    batches = [(torch.randn(4, 3, 8, 8) + 0.5,) for _ in range(2)]
    qmodel = qpp.prepare(model, batches[0], QuantConfig())
    moments = input_moments(qmodel, batches)
    inputs = _layer_inputs(model, batches)
    for name, module in model.named_children():
        weight = module.weight.detach()
        delta = torch.randn_like(weight) * 0.1
        if isinstance(module, nn.Conv2d):
            outputs = [
                nn.functional.conv2d(
                    x, delta, None, module.stride, module.padding, module.dilation, module.groups
                )
                for x in inputs[name]
            ]
            measured = torch.cat(outputs).square().mean(dim=(0, 2, 3))
        else:
            measured = torch.cat([x @ delta.T for x in inputs[name]]).square().mean(dim=0)
        moment = moments[f"{name}.weight"]
        assert moment.shape[0] == (module.groups if isinstance(module, nn.Conv2d) else 1)
        predicted = output_errors(channels_first(delta, 0).double(), moment)
        torch.testing.assert_close(predicted, measured.double(), rtol=1e-4, atol=1e-9)


def _linear_output_error(qmodel: qpp.QuantizedModel, x: torch.Tensor) -> float:
    quantizer, weight = next(iter(qmodel.weight_quantizers()))
    with torch.no_grad():
        return float((x @ (quantizer(weight) - weight).T).square().mean())


def test_output_objective_lowers_the_layers_output_error() -> None:
    """On inputs with a large common mean, a weight error's output cost is mostly its mean
    shift ``(Σ Δw)·μ``: breakpoints searched on the output error cut the layer's output error
    well below those searched on the weight error (3-bit PWLQ, with and without +BC; the +BC
    of the output objective is fitted to that error and lowers it further)."""
    torch.manual_seed(1)
    model = nn.Linear(64, 32, bias=False)
    nn.init.normal_(model.weight, std=0.1)
    batches = [(torch.randn(64, 64) * 0.3 + 2.0,) for _ in range(2)]
    probe = torch.cat([b[0] for b in batches])
    errors = {}
    for corrected in (False, True):
        for objective in ("weight", "output"):
            spec = PiecewiseSpec(objective=objective, bias_correction=corrected)
            config = QuantConfig(weight_bits=3, weight_quantizer="pwlq", piecewise=spec)
            quantized = qpp.quantize(model, batches, config)
            errors[corrected, objective] = _linear_output_error(quantized, probe)
    assert errors[False, "output"] < 0.2 * errors[False, "weight"], errors
    assert errors[True, "output"] < 0.7 * errors[True, "weight"], errors
    # +BC fitted to the output error lowers it further
    assert errors[True, "output"] < errors[False, "output"], errors


def test_output_objective_needs_data_and_pwlq_weights() -> None:
    model = nn.Linear(8, 4)
    batch = (torch.randn(4, 8),)
    spec = PiecewiseSpec(objective="output")
    qmodel = qpp.prepare(
        model, batch, QuantConfig(weight_bits=4, weight_quantizer="pwlq", piecewise=spec)
    )
    with pytest.raises(ConfigError, match="needs calibration data"):
        compute_weight_encodings(qmodel, [])
    uniform = qpp.prepare(model, batch, QuantConfig(weight_bits=4))
    quantizer, weight = next(iter(uniform.weight_quantizers()))
    with pytest.raises(ConfigError, match="only PWLQ weights"):
        quantizer.compute_weight_encoding(weight, torch.eye(8)[None])
    with pytest.raises(ConfigError, match="objective"):
        PiecewiseSpec(objective="activation")
    with pytest.raises(ConfigError, match="use auto or grid"):
        PiecewiseSpec(objective="output", search="approx")


def test_output_bias_correction_is_the_least_squares_shift_on_the_outputs() -> None:
    """``ŵ + shift`` from ``output_bias_correction`` is the least-squares fit of ``ŵ + s·1`` to
    the layer's outputs ``Xw`` on the data the moments came from (gain 1), and never raises
    the output error."""
    torch.manual_seed(2)
    inputs = torch.randn(500, 12) * torch.linspace(0.2, 2.0, 12) + 1.0
    gram = (inputs.T @ inputs / inputs.shape[0])[None].double()
    rows = torch.randn(5, 12)
    quantized = rows + 0.05 * torch.randn(5, 1) + 0.01 * torch.randn(5, 12)
    shift, gain = output_bias_correction(rows, quantized, gram)
    assert torch.equal(gain, torch.ones(5))
    for row in range(5):
        design = inputs.sum(dim=1, keepdim=True).double()
        target = (inputs @ (rows[row] - quantized[row])).double()
        fitted = torch.linalg.lstsq(design, target[:, None]).solution[0, 0]
        torch.testing.assert_close(shift[row].double(), fitted, rtol=1e-4, atol=1e-7)
    before = output_errors((quantized - rows).double(), gram)
    after = output_errors((quantized + shift[:, None] - rows).double(), gram)
    assert (after <= before).all() and after.sum() < 0.2 * before.sum()
