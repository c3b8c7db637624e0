"""The predictor's per-sample features (``qpp.predict.predictor.sample_features``)."""

import math

import pytest
import torch

from qpp.predict import settings_from_config
from qpp.predict.predictor import (
    DEFAULT_FEATURES,
    SIGNED_FEATURES,
    feature_flops,
    sample_features,
)
from qpp.sim.config import QuantConfig


def test_signed_features_read_each_part_of_x() -> None:
    """``pos_`` / ``neg_`` statistics are those of max(x, 0) and max(-x, 0): a sample whose
    outliers are negative differs from its mirror image only in them."""
    values = torch.linspace(-1.0, 1.0, 1001)
    x = torch.stack(
        [torch.cat([values, torch.tensor([-8.0])]), torch.cat([values, torch.tensor([8.0])])]
    )
    names = ("max", "q0.5", "pos_max", "neg_max", "pos_q0.999", "neg_q0.5")
    features = sample_features(x, names).exp()
    negative_outlier, positive_outlier = features
    assert negative_outlier[0] == pytest.approx(8.0) and positive_outlier[0] == pytest.approx(8.0)
    assert negative_outlier[2] == pytest.approx(1.0) and negative_outlier[3] == pytest.approx(8.0)
    assert positive_outlier[2] == pytest.approx(8.0) and positive_outlier[3] == pytest.approx(1.0)
    # q0.999 of max(x, 0): the 1001st of 1002 sorted values (ceil(0.999 * 1002) = 1001), the
    # second largest: 1 beside the positive outlier, 0.998 without it.
    assert positive_outlier[4] == pytest.approx(1.0)
    assert negative_outlier[4] == pytest.approx(0.998)
    # Half the values of max(-x, 0) are zero (linspace gives ~5e-8 for its middle point).
    assert negative_outlier[5] < 1e-6
    assert negative_outlier[1] == pytest.approx(positive_outlier[1])


def test_signed_parts_cost_one_more_pass_each() -> None:
    base = feature_flops(("max", "q0.99"), 100)
    assert base == 300
    assert feature_flops(("max", "q0.99", "pos_max", "pos_q0.99"), 100) == 2 * base + 100
    assert feature_flops(("pos_max", "neg_max"), 100) == 4 * 100
    assert math.isclose(feature_flops(("mean",), 64), 64)


def test_auto_features_follow_the_scheme() -> None:
    """Uniform targets are signed ends (lo, hi): signed features; Dense+Sparse thresholds are
    on |x|: statistics of |x|. An explicit list is kept as given."""
    uniform = settings_from_config(QuantConfig(activation_ranges="predicted"))
    dense_sparse = settings_from_config(
        QuantConfig(activation_ranges="predicted", activation_scheme="dense-sparse")
    )
    assert uniform.features == SIGNED_FEATURES
    assert dense_sparse.features == DEFAULT_FEATURES
    chosen = QuantConfig(activation_ranges="predicted", predictor_features="max, pos_q0.9")
    assert settings_from_config(chosen).features == ("max", "pos_q0.9")
