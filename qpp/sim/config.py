"""The quantization config: a dataclass that round-trips through JSON."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qpp.errors import ConfigError
from qpp.graph.placement import POLICIES
from qpp.quant.spec import PiecewiseSpec, QuantSpec

#: Kinds of quantizer grid: one uniform grid, or piecewise linear (PWLQ).
QUANTIZER_SCHEMES = ("uniform", "pwlq")

#: PTQ recipes run between prepare and evaluation (``qpp.ptq.recipes``).
RECIPES = ("wp-ptq",)

#: AdaRound iterations per layer inside a recipe (``wp-ptq``). AdaRound on its own keeps the
#: paper's 10k (``AdaRoundConfig``); in the recipe 1k (learning rate ``10 / iterations`` =
#: 1e-2, so the logits of eq. 23 still cross over) keeps ``qpp quantize minilm --weights 4
#: --activations 8 --recipe wp-ptq`` well under 15 minutes on 2 cores.
RECIPE_ADAROUND_ITERATIONS = 1000


@dataclass(frozen=True)
class LayerOverride:
    """Per-quantizer changes; ``None`` keeps the default. Keys are names or glob patterns."""

    bits: int | None = None
    granularity: str | None = None
    estimator: str | None = None
    symmetric: bool | None = None
    enabled: bool | None = None

    def changes(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "enabled"}


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "int | None": (int,),
    "str": (str,),
    "bool": (bool,),
    "float": (float, int),
}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: defaults for weights and activations, placement, per-layer overrides.

    The defaults are the white paper's recommendation (§2.2, §3.5): symmetric per-channel
    weights, asymmetric per-tensor activations, MSE ranges, batch norms folded.
    ``weight_quantizer`` / ``activation_quantizer`` "pwlq" use piecewise linear grids with the
    ``piecewise`` settings (bias correction applies to weights only).
    """

    weight_bits: int = 8
    activation_bits: int = 8
    weight_granularity: str = "per-channel"
    activation_granularity: str = "per-tensor"
    weight_estimator: str = "mse"
    activation_estimator: str = "mse"
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    policy: str = "runtime"
    #: Fold batch norms, exporters' separate bias adds and scalar affine blocks into the
    #: neighbouring conv/linear before placing quantizers (``qpp.graph.fold``).
    fold_batch_norm: bool = True
    #: Hold an activation's floor or ceiling (a value many of its elements sit on, e.g. a
    #: hard-swish zero region after a folded affine) exactly on the grid when rounding the zero
    #: point would clip it by up to one step (``qpp.quant.affine.snap_to_plateau``).
    exact_activation_plateaus: bool = False
    calibration_samples: int | None = None
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    #: Activation QPs (QPP): static (calibrated), dynamic (per input) or predicted per input.
    activation_ranges: str = "static"
    #: uniform, or dense-sparse (a fraction ``outlier_fraction`` of each tensor stays float).
    activation_scheme: str = "uniform"
    outlier_fraction: float = 0.01
    #: Per-sample range estimator of dynamic uniform QPs: auto (of minmax, percentile 99.99 and
    #: 99.9, mse: the one whose outputs are closest to FP32 on calibration data), minmax,
    #: percentile[:P] or mse[:p].
    dynamic_estimator: str = "auto"
    #: Comma-separated statistics the QP predictor reads (mean, std, max and qP of |x|, and
    #: pos_max, pos_qP, neg_max, neg_qP of the positive and negative parts of x).
    #: ``auto``: the signed ones for uniform ranges, those of |x| for Dense+Sparse thresholds.
    predictor_features: str = "auto"
    #: Where predictors read their features: ``auto`` (as many evenly spaced activation
    #: quantizers as 0.5 % of the model's FLOPs pays for, at most 256), ``auto:N`` (N of them),
    #: comma-separated quantizer names, or "" (the first quantizer only, as in the paper).
    predictor_sources: str = "auto"
    #: Elements of each source the features read per sample (a fixed random subset; None: all).
    predictor_elements: int | None = 2048
    weight_quantizer: str = "uniform"
    activation_quantizer: str = "uniform"
    piecewise: PiecewiseSpec = field(default_factory=PiecewiseSpec)
    #: A PTQ recipe (``wp-ptq``: CLE, AdaRound or bias correction, ranges) instead of plain
    #: calibration; ``adaround_iterations`` per layer (0: bias correction instead).
    recipe: str | None = None
    adaround_iterations: int = RECIPE_ADAROUND_ITERATIONS
    #: After the weight encodings, subtract each layer's output mean shift measured on the
    #: calibration data from its bias (white paper eq. 19, ``qpp.ptq.bias_correction``); for
    #: uniform and PWLQ weights alike (PWLQ's own "+BC" is ``piecewise.bias_correction``).
    empirical_bias_correction: bool = False
    #: Conv/linear biases on the int32 accumulator grid ``s_x s_w`` (white paper §2.3, eq. 11)
    #: where input and weight are quantized, as integer kernels add them; false keeps them float.
    int32_bias: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.piecewise, dict):  # from JSON
            object.__setattr__(self, "piecewise", PiecewiseSpec.from_dict(self.piecewise))
        if not isinstance(self.piecewise, PiecewiseSpec):
            raise ConfigError(
                'piecewise must be an object of PWLQ settings, e.g. {"breakpoints": 1}'
            )
        self._check_types()
        for key in ("weight_quantizer", "activation_quantizer"):
            if getattr(self, key) not in QUANTIZER_SCHEMES:
                raise ConfigError(
                    f"unknown {key.replace('_', ' ')} '{getattr(self, key)}'; "
                    f"use one of {', '.join(QUANTIZER_SCHEMES)}"
                )
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown placement policy '{self.policy}'; use one of {', '.join(POLICIES)}"
            )
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe '{self.recipe}'; use one of {', '.join(RECIPES)}")
        if self.adaround_iterations < 0:
            raise ConfigError("adaround_iterations must be 0 (off) or more")
        if self.empirical_bias_correction and self.recipe is not None:
            raise ConfigError(
                f"the {self.recipe} recipe chooses its own weight corrections (AdaRound, or "
                "empirical bias correction with adaround_iterations 0); drop "
                "empirical_bias_correction (--empirical-bias-correction) or the recipe"
            )
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise ConfigError("calibration_samples must be at least 1 (or null for all)")
        self.weight_spec(None)
        self.activation_spec()
        for pattern, override in self.overrides.items():
            if not isinstance(override, LayerOverride):
                raise ConfigError(f"override for '{pattern}' must be a LayerOverride")
            QuantSpec(**{**self.activation_spec().to_dict(), **override.changes()})

    def _check_types(self) -> None:
        """Settings given through the API or JSON must have the field's type (bool is not int)."""
        for item in fields(self):
            value = getattr(self, item.name)
            expected = _FIELD_TYPES.get(str(item.type))
            if expected is None or (value is None and "None" in str(item.type)):
                continue
            if type(value) not in expected:
                names = " or ".join(t.__name__ for t in expected)
                raise ConfigError(
                    f"config setting {item.name} must be {names}, got {value!r} "
                    f"({type(value).__name__}); e.g. {item.name}={item.default!r}"
                )

    def weight_spec(self, axis: int | None) -> QuantSpec:
        return QuantSpec(
            bits=self.weight_bits,
            symmetric=self.weight_symmetric,
            granularity=self.weight_granularity,
            axis=axis,
            estimator=self.weight_estimator,
            piecewise=self.piecewise if self.weight_quantizer == "pwlq" else None,
        )

    def activation_spec(self) -> QuantSpec:
        return QuantSpec(
            bits=self.activation_bits,
            symmetric=self.activation_symmetric,
            granularity=self.activation_granularity,
            axis=1 if self.activation_granularity == "per-channel" else None,
            estimator=self.activation_estimator,
            piecewise=self.piecewise if self.activation_quantizer == "pwlq" else None,
        )

    def overrides_for(self, name: str) -> list[LayerOverride]:
        """Overrides whose key equals or glob-matches ``name``, in the order given."""
        return [
            o for key, o in self.overrides.items() if key == name or fnmatch.fnmatchcase(name, key)
        ]

    def check_override_names(self, names: list[str]) -> None:
        """Every override key must match at least one quantizer name."""
        for key in self.overrides:
            if not any(key == n or fnmatch.fnmatchcase(n, key) for n in names):
                close = [n for n in names if key.split(".")[-1] in n][:3]
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise ConfigError(
                    f"no quantizer is named '{key}'{hint}; list the names with "
                    "`qpp quantize MODEL --list-quantizers` or use a glob such as '*.query.*'"
                )

    # --- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["overrides"] = {
            k: {kk: vv for kk, vv in asdict(v).items() if vv is not None}
            for k, v in self.overrides.items()
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if not isinstance(data, dict):
            raise ConfigError(
                f"a config must be a JSON object of settings, got {type(data).__name__}; "
                'write e.g. {"weight_bits": 4}'
            )
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config key(s) {sorted(unknown)}; allowed: {sorted(known)}")
        data = dict(data)
        overrides = {}
        given = data.pop("overrides", None) or {}
        if not isinstance(given, dict):
            raise ConfigError(
                "overrides must be an object mapping quantizer names or globs to settings, e.g. "
                '{"*.query.output": {"bits": 16}}'
            )
        for key, value in given.items():
            allowed = {f.name for f in fields(LayerOverride)}
            if not isinstance(value, dict) or set(value) - allowed:
                raise ConfigError(
                    f"override '{key}' must be an object with keys from {sorted(allowed)}"
                )
            overrides[key] = LayerOverride(**value)
        return cls(**data, overrides=overrides)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config is not valid JSON ({error})") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> QuantConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a JSON file written by qpp")
        return cls.from_json(path.read_text())
