"""QuantConfig: validation with helpful messages, JSON round trips, per-layer overrides."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpp.errors import ConfigError
from qpp.graph.placement import POLICIES
from qpp.quant.spec import GRANULARITIES, QuantSpec
from qpp.sim.config import LayerOverride, QuantConfig

ESTIMATORS = ["minmax", "mse", "mse:3", "percentile:99.9", "entropy", "cross-entropy"]
WEIGHT_ESTIMATORS = ["minmax", "mse", "percentile:99.99"]

overrides = st.builds(
    LayerOverride,
    bits=st.none() | st.integers(2, 16),
    granularity=st.none() | st.sampled_from(GRANULARITIES),
    estimator=st.none() | st.sampled_from(ESTIMATORS),
    symmetric=st.none() | st.booleans(),
    enabled=st.none() | st.booleans(),
)

configs = st.builds(
    QuantConfig,
    weight_bits=st.integers(2, 16),
    activation_bits=st.integers(2, 16),
    weight_granularity=st.sampled_from(GRANULARITIES),
    activation_granularity=st.sampled_from(GRANULARITIES),
    weight_estimator=st.sampled_from(WEIGHT_ESTIMATORS),
    activation_estimator=st.sampled_from(ESTIMATORS),
    weight_symmetric=st.booleans(),
    activation_symmetric=st.booleans(),
    policy=st.sampled_from(POLICIES),
    fold_batch_norm=st.booleans(),
    int32_bias=st.booleans(),
    calibration_samples=st.none() | st.integers(1, 10_000),
    overrides=st.dictionaries(
        st.sampled_from(["conv1.weight", "*.query.*", "fc", "layer?.*", "encoder.*"]),
        overrides,
        max_size=4,
    ),
)


def test_defaults_follow_the_white_paper() -> None:
    """Symmetric per-channel weights, asymmetric per-tensor activations, MSE ranges (§3.5)."""
    config = QuantConfig()
    weight = config.weight_spec(axis=0)
    activation = config.activation_spec()
    assert weight == QuantSpec(8, True, None, "per-channel", 0, "mse")
    assert weight.is_signed
    assert activation == QuantSpec(8, False, None, "per-tensor", None, "mse")
    assert not activation.is_signed
    assert config.fold_batch_norm


def test_per_channel_activations_use_the_channel_axis() -> None:
    assert QuantConfig(activation_granularity="per-channel").activation_spec().axis == 1


@settings(max_examples=50, deadline=None)
@given(config=configs)
def test_config_round_trips_through_dict_and_json_exactly(config: QuantConfig) -> None:
    assert QuantConfig.from_dict(config.to_dict()) == config
    text = config.to_json()
    assert QuantConfig.from_json(text) == config
    assert QuantConfig.from_json(QuantConfig.from_json(text).to_json()) == config
    json.loads(text)  # plain JSON, no custom encoder needed


def test_to_dict_leaves_unset_override_fields_out() -> None:
    config = QuantConfig(
        overrides={"fc": LayerOverride(bits=4), "head": LayerOverride(enabled=False)}
    )
    assert config.to_dict()["overrides"] == {"fc": {"bits": 4}, "head": {"enabled": False}}


def test_from_file(tmp_path: Path) -> None:
    config = QuantConfig(weight_bits=4, overrides={"fc": LayerOverride(bits=8)})
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert QuantConfig.from_file(path) == config
    with pytest.raises(ConfigError, match="does not exist"):
        QuantConfig.from_file(tmp_path / "missing.json")


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["weight_bits", "activation_bits"])
@pytest.mark.parametrize("bits", [1, 17])
def test_bits_outside_2_to_16_raise(field: str, bits: int) -> None:
    with pytest.raises(ConfigError, match=rf"bit-width {bits} .*from 2 to 16"):
        QuantConfig(**{field: bits})


@pytest.mark.parametrize("field", ["weight_granularity", "activation_granularity"])
def test_unknown_granularity_raises(field: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown granularity 'per-row'; use one of per-tensor"):
        QuantConfig(**{field: "per-row"})


@pytest.mark.parametrize("field", ["weight_estimator", "activation_estimator"])
def test_unknown_estimator_raises(field: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown range estimator 'l2'; use one of minmax"):
        QuantConfig(**{field: "l2"})


def test_unknown_policy_names_the_value_and_the_choices() -> None:
    with pytest.raises(ConfigError) as error:
        QuantConfig(policy="tensorrt")
    assert "'tensorrt'" in str(error.value)
    for policy in POLICIES:
        assert policy in str(error.value)


def test_calibration_samples_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="calibration_samples must be at least 1"):
        QuantConfig(calibration_samples=0)


def test_unknown_config_keys_are_named_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as error:
        QuantConfig.from_dict({"weight_bits": 4, "wieght_bits": 4})
    message = str(error.value)
    assert "['wieght_bits']" in message
    assert "weight_bits" in message.split("allowed:")[1]


def test_invalid_json_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.from_json("{weight_bits: 4}")


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError, match="bit-width 1"):
        QuantConfig(overrides={"fc": LayerOverride(bits=1)})
    with pytest.raises(ConfigError, match="unknown granularity"):
        QuantConfig.from_dict({"overrides": {"fc": {"granularity": "per-row"}}})
    with pytest.raises(ConfigError, match=r"override 'fc' must be an object with keys from"):
        QuantConfig.from_dict({"overrides": {"fc": {"bitz": 4}}})
    with pytest.raises(ConfigError, match=r"override 'fc' must be an object"):
        QuantConfig.from_dict({"overrides": {"fc": 4}})
    with pytest.raises(ConfigError, match="must be a LayerOverride"):
        QuantConfig(overrides={"fc": {"bits": 4}})  # type: ignore[dict-item]


def test_overrides_that_are_not_an_object_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        QuantConfig.from_dict({"overrides": ["fc"]})


@pytest.mark.parametrize("text", ["3", '"weight_bits"'])
def test_json_that_is_not_an_object_raises_a_clear_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as error:
        QuantConfig.from_json(text)
    assert "object" in str(error.value)


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_match_exact_names_and_globs_in_order() -> None:
    exact, by_glob, by_prefix = LayerOverride(bits=4), LayerOverride(bits=6), LayerOverride()
    config = QuantConfig(
        overrides={
            "encoder.0.query.weight": exact,
            "*.query.*": by_glob,
            "encoder.?.key*": by_prefix,
        }
    )
    assert config.overrides_for("encoder.0.query.weight") == [exact, by_glob]
    assert config.overrides_for("encoder.3.query.output") == [by_glob]
    assert config.overrides_for("encoder.1.key.weight") == [by_prefix]
    assert config.overrides_for("encoder.12.key.weight") == []
    assert config.overrides_for("decoder.value") == []


def test_glob_matching_is_case_sensitive() -> None:
    config = QuantConfig(overrides={"Conv*": LayerOverride(bits=4)})
    assert config.overrides_for("conv1") == []


def test_override_changes_leave_out_unset_fields_and_enabled() -> None:
    override = LayerOverride(bits=4, symmetric=True, enabled=False)
    assert override.changes() == {"bits": 4, "symmetric": True}
    assert LayerOverride().changes() == {}


def test_check_override_names_accepts_patterns_that_match() -> None:
    config = QuantConfig(overrides={"*.weight": LayerOverride(bits=4), "fc": LayerOverride()})
    config.check_override_names(["conv.weight", "fc", "fc.output"])


def test_check_override_names_raises_for_a_pattern_that_matches_nothing() -> None:
    config = QuantConfig(overrides={"*.weight": LayerOverride(bits=4), "fc": LayerOverride()})
    with pytest.raises(ConfigError) as error:
        config.check_override_names(["conv.weight", "fc2.weight", "fc2.output"])
    message = str(error.value)
    assert "no quantizer is named 'fc'" in message
    assert "similar: fc2.weight, fc2.output" in message
    assert "--list-quantizers" in message


def test_check_override_names_without_similar_names() -> None:
    config = QuantConfig(overrides={"*.query.*": LayerOverride(bits=4)})
    with pytest.raises(ConfigError, match=r"no quantizer is named '\*\.query\.\*'; list"):
        config.check_override_names(["conv.weight"])


def test_int32_bias_is_the_default_and_configs_without_it_still_load() -> None:
    assert QuantConfig().int32_bias is True
    assert QuantConfig.from_json(QuantConfig(int32_bias=False).to_json()).int32_bias is False
    saved_before_the_field = QuantConfig().to_dict()
    del saved_before_the_field["int32_bias"]
    assert QuantConfig.from_dict(saved_before_the_field) == QuantConfig()
    with pytest.raises(ConfigError, match="int32_bias must be bool"):
        QuantConfig.from_dict({"int32_bias": 1})
