"""``activation_after``: the elementwise map between a layer and its next use (AdaRound's f_a)."""

import torch
from torch import nn

import qpp
from qpp.graph.patterns import activation_after, get_attr, weight_layers
from qpp.sim.config import QuantConfig


class Heads(nn.Module):
    """One conv per form of activation, as torch writes them and as ONNX (opset < 14) does."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 4, 1) for _ in range(7))
        self.register_buffer("scale", torch.tensor([0.5, 1.0, 2.0, -1.0]).reshape(1, 4, 1, 1))
        self.register_buffer("shift", torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = [conv(x) for conv in self.convs]
        bn = c[0] * self.scale + self.shift  # an unfolded batch norm, then decomposed hardswish
        outputs = [
            bn * torch.clamp(bn + 3, 0, 6) / 6,
            nn.functional.hardswish(c[1]),
            c[2] * torch.sigmoid(c[2] * 1.702),  # swish with a slope
            torch.clamp(c[3] * 0.2 + 0.5, 0, 1) * x[:, :1],  # a hardsigmoid gate
            torch.relu(c[4]),
            c[5] * self.scale,  # affine only
            c[6] + c[6].mean(),  # read twice: no elementwise map
        ]
        return torch.cat(outputs, 1)


def test_activation_after_finds_each_form_and_reproduces_it() -> None:
    torch.manual_seed(0)
    model = Heads().eval()
    x = torch.randn(2, 3, 5, 5)
    qmodel = qpp.prepare(model, (x,), QuantConfig())
    qmodel.set_enabled(False)
    layers = weight_layers(qmodel.graph_module)
    found = [activation_after(qmodel.graph_module, layer) for layer in layers]
    kinds = [None if a is None else a.kind for a in found]
    assert kinds == ["hardswish", "hardswish", "swish", "clamp", "relu", "identity", None]
    assert found[2].slope == 1.702 and (found[3].low, found[3].high) == (0.0, 1.0)
    expected = model(x)
    for index, (layer, activation) in enumerate(zip(layers[:6], found[:6], strict=True)):
        weight = get_attr(qmodel.graph_module, layer.weight)
        bias = get_attr(qmodel.graph_module, layer.bias)
        y = nn.functional.conv2d(x, weight, bias).permute(0, 2, 3, 1)  # rows x channels
        output = activation.value(y).permute(0, 3, 1, 2)
        if index == 3:
            output = output * x[:, :1]
        torch.testing.assert_close(output, expected[:, 4 * index : 4 * index + 4])
