"""Running a quantized graph from a cut with the values crossing it cached
(``qpp.graph.segments``)."""

import itertools

import pytest
import torch
from torch import nn

from qpp.api import quantize
from qpp.graph.segments import Segments
from qpp.sim.config import QuantConfig


class ResidualNet(nn.Module):
    """A skip connection around two convs: the block's input crosses every cut inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.outer = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        z = self.outer(torch.relu(self.inner(y))) + y
        return self.head(z.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def quantized() -> tuple[object, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(2)]
    model = quantize(ResidualNet().eval(), batches, QuantConfig(activation_bits=4))
    return model, (torch.randn(3, 3, 8, 8),)


def _activation_cuts(model: object, segments: Segments) -> list[int]:
    names = model.select(kind="activation")  # type: ignore[attr-defined]
    return sorted(segments.cut_of(model.module_target(q.name)) for q in names)  # type: ignore[attr-defined]


def test_running_from_any_cut_reproduces_the_model(quantized) -> None:
    model, batch = quantized
    segments = Segments(model.graph_module)
    cuts = _activation_cuts(model, segments)
    assert len(cuts) >= 4
    with torch.no_grad():
        expected = model(*batch)
    for cut in cuts:
        values = segments.prefix(batch, cut)
        assert set(values) == set(segments.crossing(cut))
        assert torch.equal(segments.outputs(values, cut), expected)
    # Advancing from cut to cut carries the same values as running the prefix again.
    values = segments.prefix(batch, cuts[0])
    for start, stop in itertools.pairwise(cuts):
        values = segments.advance(values, start, stop)
        again = segments.prefix(batch, stop)
        assert set(values) == set(again)
        for node, value in values.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, again[node])  # type: ignore[arg-type]
    assert torch.equal(segments.outputs(values, cuts[-1]), expected)


def test_the_skip_value_crosses_the_cuts_inside_the_block(quantized) -> None:
    model, _ = quantized
    segments = Segments(model.graph_module)
    stem, inner, outer = (
        segments.cut_of(model.module_target(f"{name}.output"))
        for name in ("stem", "inner", "outer")
    )
    skip = segments.nodes[stem]  # the quantized stem output, added back after ``outer``
    inner_input = segments.nodes[inner].args[0]
    assert skip in segments.crossing(inner) and skip in segments.crossing(outer)
    assert inner_input in segments.crossing(inner)
    assert inner_input not in segments.crossing(outer)
    assert skip not in segments.crossing(len(segments.nodes) - 1)


def test_a_change_at_the_cut_is_seen_and_nothing_before_it_reruns(quantized) -> None:
    model, batch = quantized
    segments = Segments(model.graph_module)
    quantizer = model.quantizer("outer.output")
    cut = segments.cut_of(model.module_target("outer.output"))
    values = segments.prefix(batch, cut)
    before = segments.outputs(values, cut)
    quantizer.enabled = False
    try:
        with torch.no_grad():
            expected = model(*batch)
        after = segments.outputs(values, cut)
    finally:
        quantizer.enabled = True
    assert not torch.equal(before, after)
    assert torch.equal(after, expected)


def test_an_unknown_target_is_named(quantized) -> None:
    model, _ = quantized
    with pytest.raises(KeyError, match="no_such_module"):
        Segments(model.graph_module).cut_of("no_such_module")
