"""Placement policies put quantizers where an integer runtime computes (white paper §2.3)."""

import torch
from torch import nn

from qpp.graph.capture import capture
from qpp.graph.fold import fold_batch_norms
from qpp.graph.placement import place_quantizers


class Block(nn.Module):
    """conv-bn-relu, a residual add, a concat and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        b = self.conv2(a)
        c = self.conv3(a)
        merged = torch.cat([b, c], dim=1)
        pooled = torch.relu(merged + 0.0).mean((2, 3))
        return self.head(pooled)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.query = nn.Linear(16, 16)
        self.key = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.query(h), self.key(h), self.value(h)
        scores = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return x + self.out(scores @ v)


def _placed(model: nn.Module, example: torch.Tensor, policy: str = "runtime"):
    graph_module = capture(model.eval(), (example,))
    fold_batch_norms(graph_module)
    return graph_module, place_quantizers(graph_module, policy)


def test_runtime_policy_on_a_cnn() -> None:
    graph_module, placement = _placed(Block(), torch.randn(2, 3, 8, 8))
    weights = {site.name for site in placement.weights}
    assert weights == {"conv1.weight", "conv2.weight", "conv3.weight", "head.weight"}
    outputs = {s.value: s.name for s in placement.activations if s.role == "output"}
    nodes = {n.name: n for n in graph_module.graph.nodes}
    # conv1's output quantizer sits after the fused ReLU, never between conv and ReLU.
    conv1_output = next(v for v, name in outputs.items() if name == "conv1.output")
    assert "relu" in str(nodes[conv1_output].target)
    # conv2 and conv3 feed one concat: they share one quantizer (one scale for the op).
    assert len({name for name in outputs.values() if name not in ("conv1.output",)}) == 1
    inputs = [s for s in placement.activations if s.role == "input"]
    assert {s.name for s in inputs} == {"conv1.input", "head.input"}
    # The input quantizer of the head sits on the edge into the linear only.
    head_input = next(s for s in inputs if s.name == "head.input")
    assert head_input.consumers is not None


def test_runtime_policy_on_attention() -> None:
    _, placement = _placed(Attention(), torch.randn(2, 5, 16))
    names = {s.name for s in placement.activations}
    # One quantizer on the layer-norm output feeds query, key and value.
    assert "query.input" in names
    assert not {"key.input", "value.input"} & names
    # Q, K and V outputs feed matmuls (integer ops), so they are requantized ...
    assert {"query.output", "key.output", "value.output"} <= names
    # ... while the output projection feeds a residual add (float) and stays unquantized.
    assert "out.output" not in names
    # The softmax output enters a matmul: quantized on that edge.
    assert any(s.role == "input" and "matmul" in s.name for s in placement.activations)
    roles = {s.name: s.role for s in placement.activations}
    assert roles["query.input"] == "input"


def test_full_policy_quantizes_every_float_activation() -> None:
    _, runtime = _placed(Attention(), torch.randn(2, 5, 16))
    _, full = _placed(Attention(), torch.randn(2, 5, 16), policy="full")
    assert len(full.activations) > len(runtime.activations)
    assert {s.name for s in full.weights} == {s.name for s in runtime.weights}
    assert all(s.consumers is None for s in full.activations)


def test_names_are_stable_across_captures() -> None:
    _, first = _placed(Block(), torch.randn(2, 3, 8, 8))
    _, second = _placed(Block(), torch.randn(4, 3, 8, 8))
    assert first.names == second.names
