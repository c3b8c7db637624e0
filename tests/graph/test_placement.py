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


class ElementwiseNet(nn.Module):
    """A squeeze-excite gate (Mul), a scaled residual Add into a conv, a vector-constant Mul,
    a masked softmax into a matmul, and an Add into a layer norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.excite = nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 8, 1)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8).reshape(1, 8, 1, 1))
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        gated = y * torch.sigmoid(self.excite(y.mean((2, 3), keepdim=True)))
        z = self.mix(gated) * 0.5 + y
        w = self.head(z) * self.gain
        tokens = self.head(torch.relu(w)).flatten(2).transpose(1, 2)
        scores = self.query(tokens) @ self.key(tokens).transpose(1, 2) + (1.0 - mask) * -1e4
        attended = torch.softmax(scores, dim=-1) @ tokens
        return self.norm(attended + tokens)


def test_eltwise_policy_quantizes_the_adds_and_muls_integer_ops_read() -> None:
    model = ElementwiseNet().eval()
    example = (torch.randn(2, 3, 4, 4), torch.ones(2, 16, 16))
    graph_module = capture(model, example)
    runtime = place_quantizers(graph_module, "runtime")
    eltwise = place_quantizers(graph_module, "runtime-int8-eltwise")
    nodes = {n.name: n for n in graph_module.graph.nodes}

    def quantized_ops(placement) -> set[str]:
        values = {s.value for s in placement.activations if s.consumers is None}
        return {str(nodes[v].target).split(".")[1] for v in values}

    def whole(placement) -> set[str]:
        return {s.value for s in placement.activations if s.consumers is None}

    added = whole(eltwise) - whole(runtime)
    targets = sorted(str(nodes[v].target).split(".")[1] for v in added)
    # the SE gate (sigmoid output and the Mul), x * 0.5 (scalar: exact in the export) and the
    # residual Add into `head`.
    assert targets == ["add", "mul", "mul", "sigmoid"], targets
    assert "add" not in quantized_ops(runtime)
    # Left in float: the Mul by a vector constant (its output feeds relu -> conv, yet the
    # constant has no one-value grid), the mask arithmetic and the masked softmax, the Add
    # into the layer norm.
    vector_mul = next(
        n
        for n in graph_module.graph.nodes
        if "mul" in n.name and any(getattr(a, "op", "") == "get_attr" for a in n.args)
    )
    assert vector_mul.name not in {s.value for s in eltwise.activations}
    softmax = next(n for n in graph_module.graph.nodes if "softmax" in str(n.target))
    assert softmax.name not in whole(eltwise)  # only runtime's edge into the matmul
    assert softmax.args[0].name not in {s.value for s in eltwise.activations}
    # No value has two quantizers, and every site of runtime is kept (by name).
    values = [s.value for s in eltwise.activations if s.consumers is None]
    assert len(values) == len(set(values))
    assert {s.name for s in runtime.activations} <= {s.name for s in eltwise.activations}
