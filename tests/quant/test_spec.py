"""QuantSpec: a frozen dataclass that validates itself and round-trips through JSON."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpp.errors import ConfigError
from qpp.quant.spec import GRANULARITIES, QuantSpec

ESTIMATOR_NAMES = [
    "minmax",
    "mse",
    "mse:2.4",
    "percentile",
    "percentile:99.9",
    "entropy",
    "topk-median",
    "cross-entropy",
]

specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 16),
    symmetric=st.booleans(),
    signed=st.none() | st.booleans(),
    granularity=st.sampled_from(GRANULARITIES),
    axis=st.none() | st.integers(-4, 3),
    estimator=st.sampled_from(ESTIMATOR_NAMES),
)


def test_defaults_are_an_asymmetric_8_bit_per_tensor_min_max_quantizer() -> None:
    spec = QuantSpec()
    assert (spec.bits, spec.symmetric, spec.granularity, spec.estimator) == (
        8,
        False,
        "per-tensor",
        "minmax",
    )
    assert not spec.is_signed
    assert not spec.per_channel


@settings(max_examples=50, deadline=None)
@given(spec=specs)
def test_spec_round_trips_through_dict_and_json_exactly(spec: QuantSpec) -> None:
    data = spec.to_dict()
    assert QuantSpec.from_dict(data) == spec
    text = json.dumps(data)
    assert QuantSpec.from_dict(json.loads(text)) == spec
    assert json.loads(text) == data


@settings(max_examples=50, deadline=None)
@given(spec=specs)
def test_signed_defaults_to_symmetric(spec: QuantSpec) -> None:
    expected = spec.symmetric if spec.signed is None else spec.signed
    assert spec.is_signed is expected
    assert spec.per_channel is (spec.granularity == "per-channel")


def test_spec_is_frozen_and_with_changes_validates() -> None:
    spec = QuantSpec(bits=4, symmetric=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8  # type: ignore[misc]
    assert spec.with_changes(bits=6) == QuantSpec(bits=6, symmetric=True)
    assert spec.bits == 4
    with pytest.raises(ConfigError, match="bit-width 1"):
        spec.with_changes(bits=1)


@pytest.mark.parametrize("bits", [0, 1, 17, 32, -8])
def test_bits_outside_2_to_16_raise(bits: int) -> None:
    with pytest.raises(ConfigError, match=rf"bit-width {bits} is not supported.* from 2 to 16"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize(("bits", "shown"), [(8.0, "8.0"), ("8", "'8'"), (None, "None")])
def test_bits_that_are_not_integers_raise_and_show_their_type(bits: object, shown: str) -> None:
    """A JSON string "8" must not read as the integer 8 in the message."""
    with pytest.raises(ConfigError) as error:
        QuantSpec(bits=bits)  # type: ignore[arg-type]
    assert f"bit-width {shown} is not supported; use an integer from 2 to 16" in str(error.value)


@pytest.mark.parametrize("bits", range(2, 17))
def test_every_supported_bit_width_is_accepted(bits: int) -> None:
    assert QuantSpec(bits=bits).bits == bits


@pytest.mark.parametrize("granularity", ["per-row", "channel", "PER-TENSOR", ""])
def test_unknown_granularity_names_the_value_and_the_choices(granularity: str) -> None:
    with pytest.raises(ConfigError) as error:
        QuantSpec(granularity=granularity)
    message = str(error.value)
    assert f"unknown granularity '{granularity}'" in message
    assert "per-tensor, per-channel" in message


@pytest.mark.parametrize("estimator", ["max", "mse:x", "percentile:10", "minmax:1"])
def test_bad_estimator_raises_config_error(estimator: str) -> None:
    with pytest.raises(ConfigError, match=estimator.split(":")[0]):
        QuantSpec(estimator=estimator)


def test_unknown_estimator_message_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as error:
        QuantSpec(estimator="kl")
    assert "'kl'" in str(error.value)
    for name in ("minmax", "percentile", "mse", "entropy", "topk-median", "cross-entropy"):
        assert name in str(error.value)


def test_from_dict_rejects_unknown_keys_and_names_them() -> None:
    with pytest.raises(ConfigError) as error:
        QuantSpec.from_dict({"bits": 4, "bit_width": 4, "per_channel": True})
    message = str(error.value)
    assert "['bit_width', 'per_channel']" in message
    for allowed in ("axis", "bits", "estimator", "granularity", "signed", "symmetric"):
        assert allowed in message


def test_from_dict_fills_defaults_for_missing_keys() -> None:
    assert QuantSpec.from_dict({"bits": 4}) == QuantSpec(bits=4)
    assert QuantSpec.from_dict({}) == QuantSpec()
