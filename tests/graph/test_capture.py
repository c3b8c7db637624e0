"""Capture: torch.export first, torch.fx as the fallback, one readable error when both fail."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn
from torch.fx import GraphModule

from qpp.api import quantize
from qpp.errors import CaptureError
from qpp.graph.capture import capture

aten = torch.ops.aten


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@torch.fx.wrap
def numpy_tanh(x: torch.Tensor) -> torch.Tensor:
    """numpy inside the forward: torch.export cannot trace it, torch.fx records one call."""
    return torch.from_numpy(np.tanh(x.detach().numpy()))


class NumpyNet(ConvNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(numpy_tanh(self.bn(self.conv(x))).flatten(1))


class DataDependentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean().item() > 0.5:
            return self.linear(x)
        return x


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls().eval()
    if hasattr(model, "bn"):  # non-trivial statistics, so batch norm matters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _targets(graph_module: GraphModule) -> set[object]:
    return {node.target for node in graph_module.graph.nodes if node.op == "call_function"}


def test_export_gives_aten_ops_with_a_dynamic_batch() -> None:
    model = _model(ConvNet)
    graph_module = capture(model, (_images(4),))
    assert {aten.conv2d.default, aten.linear.default} <= _targets(graph_module)
    for count in (1, 3, 7):  # other batch sizes than the example's
        x = _images(count, seed=count)
        torch.testing.assert_close(graph_module(x), model(x), rtol=0, atol=1e-6)


def test_graph_owns_its_parameters() -> None:
    model = _model(ConvNet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph_module = capture(model, (_images(2),))
    with torch.no_grad():
        for parameter in graph_module.parameters():
            parameter.zero_()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training


def test_fx_fallback_when_export_fails(capfd: pytest.CaptureFixture[str]) -> None:
    model = _model(NumpyNet)
    x = _images(4)
    with pytest.raises(Exception, match="numpy"):
        torch.export.export(model, (x,), strict=False)
    capfd.readouterr()

    graph_module = capture(model, (x,))
    targets = _targets(graph_module)
    assert numpy_tanh in targets
    # the fx graph uses the same ATen vocabulary as an exported one, weights as graph values
    assert {aten.conv2d.default, aten.batch_norm.default, aten.linear.default} <= targets
    assert not any(node.op == "call_module" for node in graph_module.graph.nodes)
    torch.testing.assert_close(graph_module(_images(5, 1)), model(_images(5, 1)))
    # torch.export's failure report stays off the terminal
    assert capfd.readouterr().err == ""

    quantized = quantize(model, [(x,), (_images(8, 2),)])
    assert {"conv.weight", "fc.weight"} <= set(quantized.names)
    with torch.no_grad():
        reference, output = model(_images(16, 3)), quantized(_images(16, 3))
    cosine = torch.nn.functional.cosine_similarity(output, reference, dim=1)
    assert cosine.min() > 0.99


def test_capture_error_names_the_line(capfd: pytest.CaptureFixture[str]) -> None:
    source, first = inspect.getsourcelines(DataDependentNet.forward)
    line = first + next(i for i, text in enumerate(source) if ".item()" in text)
    with pytest.raises(CaptureError) as caught:
        capture(DataDependentNet().eval(), (torch.rand(3, 4),))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot capture the model: torch.export failed at ")
    assert f"test_capture.py:{line} `if x.mean().item() > 0.5:`" in message
    assert "torch.fx failed at" in message
    assert "no Python control flow on tensor values" in message  # the fix
    terminal = capfd.readouterr()
    assert terminal.out == "" and terminal.err == ""


def test_fx_rewrites_leaf_modules_into_aten_calls() -> None:
    """Modules torch.fx keeps as leaves become ATen calls on get_attr weights; modules with no
    ATen equivalent (a reflect-padded conv) stay modules."""

    class Leaves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(10, 8)
            self.linear = nn.Linear(8, 8, bias=False)
            self.reflect = nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            hidden = numpy_tanh(self.linear(self.embedding(tokens)))
            return self.reflect(hidden.reshape(-1, 4, 2 * tokens.shape[1]))

    torch.manual_seed(0)
    model = Leaves().eval()
    tokens = torch.randint(0, 10, (2, 4))
    graph_module = capture(model, (tokens,))
    assert {aten.embedding.default, aten.linear.default} <= _targets(graph_module)
    modules = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert modules == ["reflect"]
    torch.testing.assert_close(graph_module(tokens), model(tokens))
