"""Batch-norm folding keeps the FP32 function (white paper eq. 9-10)."""

import torch
from torch import nn

from qpp.graph.capture import capture
from qpp.graph.fold import (
    fold_batch_norms,
    fold_bias_adds,
    fold_scalar_affines,
    folded_statistics,
)
from qpp.graph.ops import OpKind, op_kind


def _randomize(bn: nn.BatchNorm2d | nn.BatchNorm1d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.bn1d = nn.BatchNorm1d(6)
        for bn in (self.bn, self.bn1d):
            _randomize(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.bn1d(self.fc(y))


def test_folding_removes_batch_norms_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = ConvBN().eval()
    x = torch.randn(4, 3, 8, 8)
    graph_module = capture(model, (x,))
    folded = fold_batch_norms(graph_module)
    assert len(folded) == 2
    assert not any(op_kind(n) is OpKind.BATCH_NORM for n in graph_module.graph.nodes)
    expected = model(torch.randn(5, 3, 8, 8).clone())
    x2 = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(graph_module(x2), model(x2), rtol=1e-5, atol=1e-5)
    assert expected.shape == (5, 6)


def test_folding_leaves_the_user_model_untouched() -> None:
    model = ConvBN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph_module = capture(model, (torch.randn(2, 3, 8, 8),))
    fold_batch_norms(graph_module)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_batch_norm_without_a_layer_before_it_stays() -> None:
    class Lonely(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            _randomize(self.bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x + 1)

    model = Lonely().eval()
    graph_module = capture(model, (torch.randn(2, 3, 4, 4),))
    assert fold_batch_norms(graph_module) == []
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(graph_module(x), model(x))


class SeparateBiasAdds(nn.Module):
    """Bias-less layers followed by per-channel constant adds (as Paddle exports SE blocks),
    and one add that is not a bias (a full tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1, bias=False)
        self.register_buffer("conv_offset", torch.randn(8, 1, 1))
        self.fc = nn.Linear(8, 5, bias=False)
        self.register_buffer("fc_offset", torch.randn(5))
        self.register_buffer("image_offset", torch.randn(8, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) + self.conv_offset
        y = (y + self.image_offset).mean((2, 3))
        return self.fc_offset + self.fc(y)


def test_constant_per_channel_adds_fold_into_the_layer_bias() -> None:
    torch.manual_seed(0)
    model = SeparateBiasAdds().eval()
    x = torch.randn(2, 3, 4, 4)
    graph_module = capture(model, (x,))
    assert len(fold_bias_adds(graph_module)) == 2
    adds = [n for n in graph_module.graph.nodes if op_kind(n) is OpKind.ADD]
    assert len(adds) == 1  # the full-tensor offset is no bias
    layers = [n for n in graph_module.graph.nodes if op_kind(n) in (OpKind.CONV, OpKind.LINEAR)]
    assert all(len(n.args) > 2 and n.args[2] is not None for n in layers)
    torch.testing.assert_close(graph_module(x), model(x), rtol=1e-5, atol=1e-6)


class LearnableAffine(nn.Module):
    """PP-LCNetV3's learnable affine block: ``a*x + b`` with scalar parameters."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale]))
        self.bias = nn.Parameter(torch.tensor([shift]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


class AffineBlocks(nn.Module):
    """conv-BN-affine-hardswish-affine into a 1x1 conv (both affines fold), then an affine
    after an activation and before a padded conv (cannot fold: the zero padding would be
    shifted), a chain of three scalar ops after that conv (folds into it), whose output has two
    users, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)
        _randomize(self.bn)
        self.lab1, self.lab2 = LearnableAffine(1.3, -0.2), LearnableAffine(0.7, 0.4)
        self.pw = nn.Conv2d(4, 6, 1)
        self.lab3 = LearnableAffine(-0.9, 0.3)
        self.padded = nn.Conv2d(6, 6, 3, padding=1)
        self.lab4 = LearnableAffine(1.1, 0.5)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lab2(nn.functional.hardswish(self.lab1(self.bn(self.dw(x)))))
        y = self.lab3(nn.functional.hardswish(self.pw(y)))
        y = self.lab4(self.padded(y) + 1.0)
        return self.fc(y.mean((2, 3))) + y.amax((1, 2, 3)).unsqueeze(1)


def test_scalar_affines_fold_into_neighbouring_layers_and_keep_outputs() -> None:
    torch.manual_seed(0)
    model = AffineBlocks().eval()
    x = torch.randn(2, 4, 6, 6)
    graph_module = capture(model, (x,))
    fold_batch_norms(graph_module)
    (dw_name,) = folded_statistics(graph_module)
    before = folded_statistics(graph_module)[dw_name]
    scalar_ops = [n for n in graph_module.graph.nodes if op_kind(n) in (OpKind.ADD, OpKind.MUL)]
    folded = fold_scalar_affines(graph_module)
    after = [n for n in graph_module.graph.nodes if op_kind(n) in (OpKind.ADD, OpKind.MUL)]
    # lab1 into dw (producer), lab2 into pw (unpadded consumer), +1.0 and lab4 into the padded
    # conv (producer): 7 nodes; lab3 (a hardswish before, a padded conv after) and the head's
    # add (no constant) stay.
    assert len(folded) == 7, folded
    assert len(after) == len(scalar_ops) - 7 == 3
    x2 = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(graph_module(x2), model(x2), rtol=1e-5, atol=1e-5)
    statistics = folded_statistics(graph_module)[dw_name]
    torch.testing.assert_close(statistics.mean, 1.3 * before.mean - 0.2)
    torch.testing.assert_close(statistics.std, 1.3 * before.std)


def test_scalar_affine_folds_into_a_linear_that_follows_it() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lab = LearnableAffine(-2.0, 0.25)
            self.fc = nn.Linear(5, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lab(torch.relu(x)))

    torch.manual_seed(0)
    model = Head().eval()
    x = torch.randn(4, 5)
    graph_module = capture(model, (x,))
    assert len(fold_scalar_affines(graph_module)) == 2
    assert not any(op_kind(n) in (OpKind.ADD, OpKind.MUL) for n in graph_module.graph.nodes)
    torch.testing.assert_close(graph_module(x), model(x), rtol=1e-5, atol=1e-6)
