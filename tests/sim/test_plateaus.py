"""Activation plateaus (a floor many values sit on) stay exactly on the grid
(``qpp.quant.affine.snap_to_plateau``, ``qpp.quant.observers.PlateauObserver``)."""

import pytest
import torch

from qpp.quant.affine import choose_qparams, snap_to_plateau
from qpp.quant.observers import PlateauObserver
from qpp.quant.spec import QuantSpec
from qpp.sim.quantizer import Quantizer, QuantizerKind

FLOOR = -0.2444
#: With this top, eq. 7 gives -FLOOR / s = 10.3 steps below zero, rounded to 10: the grid's
#: lowest value lies 0.3 steps above the floor.
TOP = -FLOOR / 10.3 * 255 + FLOOR


def floored(share: float = 0.05, count: int = 200_000, seed: int = 0) -> torch.Tensor:
    """``share`` of the values exactly on FLOOR (a hard-swish zero region after an affine),
    the rest spread over [FLOOR, TOP]."""
    generator = torch.Generator().manual_seed(seed)
    x = FLOOR + (TOP - FLOOR) * torch.rand(count, generator=generator)
    x[torch.rand(count, generator=generator) < share] = FLOOR
    x[0], x[1] = FLOOR, TOP
    return x


def calibrated(x: torch.Tensor, exact_plateaus: bool) -> Quantizer:
    quantizer = Quantizer("act", QuantizerKind.ACTIVATION, QuantSpec(bits=8, estimator="minmax"))
    quantizer.exact_plateaus = exact_plateaus
    quantizer.start_observing()
    for chunk in x.split(50_000):
        quantizer.observe(chunk)
    quantizer.compute_encoding()
    return quantizer


def test_eq7_rounding_clips_the_floor_without_the_snap() -> None:
    x = floored()
    plain = calibrated(x, exact_plateaus=False)
    lowest = float(-plain.zero_point * plain.scale)
    assert lowest > FLOOR + 0.2 * float(plain.scale)  # clipped by 0.3 steps
    snapped = calibrated(x, exact_plateaus=True)
    on_floor = x == FLOOR
    assert torch.allclose(snapped(x)[on_floor], torch.tensor(FLOOR), atol=1e-6)
    assert float(snapped.zero_point) == float(plain.zero_point)
    assert float(plain.scale) < float(snapped.scale) <= float(plain.scale) * 1.04
    # the floor's values were biased by 0.3 steps; now the mean error over the tensor is smaller
    bias = {q: float((q(x) - x).mean().abs()) for q in (plain, snapped)}
    assert bias[snapped] < 0.5 * bias[plain], bias


def test_the_observer_finds_the_floor_and_nothing_in_continuous_data() -> None:
    observer = PlateauObserver()
    for seed in range(3):
        observer.update(floored(share=0.01, seed=seed).reshape(4, -1))
    plateaus = observer.plateaus(1e-3)
    (share,) = [s for v, s in plateaus.items() if abs(v - FLOOR) < 1e-6]
    assert share == pytest.approx(0.01, rel=0.1)
    gaussian = PlateauObserver()
    gaussian.update(torch.randn(100_000, generator=torch.Generator().manual_seed(1)))
    assert gaussian.plateaus(1e-3) == {}


@pytest.mark.parametrize(
    ("plateau", "moves"),
    [
        (FLOOR, True),  # 0.3 steps below the grid: snapped
        (-0.2, False),  # inside the grid
        (FLOOR - 3 * (TOP - FLOOR) / 255, False),  # clipped on purpose by the estimator
    ],
)
def test_only_plateaus_just_outside_the_grid_move_it(plateau: float, moves: bool) -> None:
    scale, zero_point = choose_qparams(
        torch.tensor(FLOOR), torch.tensor(TOP), bits=8, symmetric=False, signed=False
    )
    new_scale, new_zero_point = snap_to_plateau(scale, zero_point, 8, False, {plateau: 0.01})
    assert torch.equal(new_zero_point, zero_point)
    if moves:
        assert float(-new_zero_point * new_scale) == pytest.approx(plateau, abs=1e-7)
    else:
        assert torch.equal(new_scale, scale)


def test_a_ceiling_just_above_the_grid_is_held_too() -> None:
    scale, zero_point = choose_qparams(
        torch.tensor(-1.0), torch.tensor(6.0), bits=8, symmetric=False, signed=False
    )
    highest = float((255 - zero_point) * scale)
    ceiling = highest + 0.4 * float(scale)
    new_scale, _ = snap_to_plateau(scale, zero_point, 8, False, {ceiling: 0.02})
    assert float((255 - zero_point) * new_scale) == pytest.approx(ceiling, abs=1e-6)
