"""Recipes: named sequences of PTQ algorithms, run between ``prepare`` and evaluation.

``wp-ptq`` is the white paper's standard PTQ pipeline (Fig. 8, §3.5), for any bit-widths:

1. cross-layer equalization (with high-bias absorption) when the model has depthwise convs;
   lookup tables (embeddings) get per-row asymmetric grids, constant lookups absorbed
   (``qpp.ptq.lookups``);
2. weight ranges from the config's estimator (MSE by default), per channel or per tensor;
3. AdaRound when calibration data is available (``adaround_iterations > 0``), otherwise bias
   correction (empirical with data, analytic from batch norms without);
4. activation ranges from the config's estimator (MSE by default) on the calibration data,
   behind the final weights, with the weight encodings kept frozen; for token data only the
   real tokens (not the padding) set the ranges.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qpp.api import calibrate
from qpp.errors import ConfigError
from qpp.graph.patterns import get_attr, lookups, weight_layers
from qpp.ptq.activations import Batch, data_positions
from qpp.ptq.adaround import AdaRoundConfig, adaround
from qpp.ptq.bias_correction import BiasCorrectionConfig, bias_correction
from qpp.ptq.cle import CLEConfig, cross_layer_equalization
from qpp.ptq.input_moments import compute_weight_encodings
from qpp.ptq.lookups import LookupConfig, quantize_lookups
from qpp.sim.config import RECIPE_ADAROUND_ITERATIONS, RECIPES
from qpp.sim.model import QuantizedModel


@dataclass(frozen=True)
class WhitePaperRecipe:
    """Settings of ``wp-ptq``. ``cle=None`` applies CLE only to models with depthwise convs;
    ``adaround_iterations=0`` switches AdaRound off (bias correction instead)."""

    cle: bool | None = None
    #: Per layer; 1k by default (``RECIPE_ADAROUND_ITERATIONS``), AdaRound alone uses 10k.
    adaround_iterations: int = RECIPE_ADAROUND_ITERATIONS
    #: Calibration samples AdaRound caches layer inputs from (bounded memory and time).
    adaround_samples: int | None = 64
    bias_correction: bool = True
    #: AdaRound's layer inputs (``AdaRoundConfig.inputs``); ``None``: ``float`` for token
    #: (``input_ids, attention_mask``) data, ``quantized`` otherwise. On MiniLM with 64-243
    #: calibration sentences the quantized-input form overfits them (see docs/ptq.md).
    adaround_inputs: str | None = None
    #: Per-row grids for lookup tables and constant lookups absorbed (``qpp.ptq.lookups``).
    lookups: bool = True


@dataclass
class RecipeReport:
    """What each step did (its own report as a dict) and how long it took."""

    recipe: str
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def has_depthwise(qmodel: QuantizedModel) -> bool:
    """True when some conv has one input channel per group (a depthwise conv)."""
    for layer in weight_layers(qmodel.graph_module):
        weight = get_attr(qmodel.graph_module, layer.weight)
        if layer.is_conv and layer.groups > 1 and weight.shape[1] == 1:
            return True
    return False


def white_paper_ptq(
    qmodel: QuantizedModel,
    data: Sequence[Batch],
    config: WhitePaperRecipe | None = None,
    show_progress: bool = False,
) -> RecipeReport:
    """The standard PTQ pipeline (white paper Fig. 8) on a freshly prepared ``qmodel``."""
    config = config or WhitePaperRecipe()
    report = RecipeReport("wp-ptq")

    def step(name: str, started: float, result: object) -> None:
        report.seconds[name] = round(time.perf_counter() - started, 3)
        report.steps[name] = asdict(result) if result is not None else {}  # type: ignore[call-overload]

    use_cle = has_depthwise(qmodel) if config.cle is None else config.cle
    if use_cle:
        started = time.perf_counter()
        step("cle", started, cross_layer_equalization(qmodel, data, CLEConfig()))
    if config.lookups and any(lookups(qmodel.graph_module)):
        started = time.perf_counter()
        step("lookups", started, quantize_lookups(qmodel, data, LookupConfig()))
    started = time.perf_counter()
    compute_weight_encodings(qmodel, data, show_progress)
    step("weight_ranges", started, None)
    if config.adaround_iterations > 0 and data:
        started = time.perf_counter()
        inputs = config.adaround_inputs
        if inputs is None:
            inputs = "float" if data_positions(data[0]) is not None else "quantized"
        settings = AdaRoundConfig(
            iterations=config.adaround_iterations, samples=config.adaround_samples, inputs=inputs
        )
        step("adaround", started, adaround(qmodel, data, settings, show_progress))
    elif config.bias_correction:
        started = time.perf_counter()
        mode = "empirical" if data else "analytic"
        result = bias_correction(qmodel, data, BiasCorrectionConfig(mode), show_progress)
        step("bias_correction", started, result)
    started = time.perf_counter()
    calibrate(qmodel, data, show_progress, weights=False, real_tokens_only=True)
    step("activation_ranges", started, None)
    return report


def run_recipe(
    name: str,
    qmodel: QuantizedModel,
    data: Sequence[Batch],
    adaround_iterations: int = RECIPE_ADAROUND_ITERATIONS,
    show_progress: bool = False,
) -> RecipeReport:
    """Run recipe ``name`` on a prepared (uncalibrated) model; it ends calibrated."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'; use one of {', '.join(RECIPES)}")
    recipe = WhitePaperRecipe(adaround_iterations=adaround_iterations)
    return white_paper_ptq(qmodel, data, recipe, show_progress)
