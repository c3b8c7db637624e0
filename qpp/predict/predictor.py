"""The QP predictor: cheap statistics of an early tensor -> every layer's activation QPs.

QPP (Kryzhanovskiy et al. 2021) maps features of the network input (or of an early activation)
to the quantization parameters of all later layers with one linear regression, fitted by least
squares on unlabeled calibration data. Here the features are per-sample statistics (mean, max,
quantiles of |x|), the targets are the logs of the exact dynamic QPs (``-lo``, ``hi`` or the
Dense+Sparse threshold ``t``), and the map is ridge regression on standardized features:

    log q̂ = c + Σ_f a_f (φ_f - μ_f) / σ_f            (one row of ``weight`` per feature)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qpp.errors import ConfigError
from qpp.predict.qps import column_subset

#: The features of Dense+Sparse predictors, whose targets are thresholds on |x|.
DEFAULT_FEATURES = ("mean", "max", "q0.9", "q0.99", "q0.999")
#: The features of uniform predictors, whose targets are the signed ends ``lo`` and ``hi``: the
#: upper statistics of each part of x. On ppocr-det W8A4 (2026-12-05) they take predicted box F1
#: from 29.9 to 42.8 (static 24.4, dynamic 43.4), at the same 106 sources.
SIGNED_FEATURES = (
    "mean",
    "pos_q0.99",
    "pos_q0.999",
    "pos_max",
    "neg_q0.99",
    "neg_q0.999",
    "neg_max",
)
#: Positive statistics enter in log space, like the (log) QPs they predict.
_LOG_FLOOR = 1e-12
#: Predicted log ranges are rounded to this grid (0.8 % steps of the range): a deployed graph
#: computes its source tensors with other float rounding than the simulation (integer
#: kernels, fused activations), so its features differ by ~1e-6; unrounded, every predicted
#: scale would differ by as much and flip the rounding of ~1e-4 of all values per layer, an
#: error that grows layer by layer (PP-OCR cls: 39 output steps). On the grid both land on the
#: same scale except when a value falls within ~1e-6 of a grid boundary.
LOG_RANGE_STEP = 1.0 / 128


def round_log_ranges(log_qps: torch.Tensor) -> torch.Tensor:
    """``log q̂`` on the ``LOG_RANGE_STEP`` grid (exact in float64: the step is 2^-7)."""
    return torch.round(log_qps / LOG_RANGE_STEP) * LOG_RANGE_STEP


#: Prefixes of the signed statistics: of the positive part ``max(x, 0)`` (``pos_``) and of the
#: negative part ``max(-x, 0)`` (``neg_``). Uniform QPs are the signed ends ``lo`` and ``hi``;
#: statistics of |x| alone cannot tell which side an input's outliers lie on.
SIDES = ("pos_", "neg_")
_RANKED_HELP = "max or a quantile such as q0.99"


def split_feature(name: str) -> tuple[str, str]:
    """``(side, statistic)`` of a feature name: side ``""`` (|x|, or x for mean and std),
    ``"pos_"`` or ``"neg_"``; statistic ``mean``, ``std``, ``max`` or ``qP``."""
    for side in SIDES:
        if name.startswith(side):
            return side, name[len(side) :]
    return "", name


def is_ranked(statistic: str) -> bool:
    """Whether a statistic is read from the sorted values (``max`` or a quantile ``qP``)."""
    return statistic == "max" or statistic.startswith("q")


def quantile_rank(statistic: str, elements: int) -> int:
    """The 1-based rank ``k`` of ``statistic`` among ``elements`` sorted values (``max``: all)."""
    if statistic == "max":
        return elements
    return min(elements, max(1, math.ceil(float(statistic[1:]) * elements)))


def _valid_ranked(statistic: str) -> bool:
    if statistic == "max":
        return True
    if not statistic.startswith("q"):
        return False
    try:
        level = float(statistic[1:])
    except ValueError:
        return False
    return 0.0 < level < 1.0


def default_features(scheme: str) -> tuple[str, ...]:
    """``--predictor-features auto``: signed statistics for uniform ranges, statistics of |x|
    for Dense+Sparse thresholds."""
    return SIGNED_FEATURES if scheme == "uniform" else DEFAULT_FEATURES


def check_feature_names(names: tuple[str, ...]) -> None:
    if not names:
        raise ConfigError("the predictor needs at least one feature; e.g. mean,max,q0.99")
    if len(set(names)) != len(names):
        raise ConfigError(f"predictor features repeat a name: {','.join(names)}; list each once")
    for name in names:
        side, statistic = split_feature(name)
        if not side and statistic in ("mean", "std"):
            continue
        if _valid_ranked(statistic):
            continue
        if side:
            part = "positive" if side == "pos_" else "negative"
            raise ConfigError(
                f"unknown predictor feature '{name}': after '{side}' use {_RANKED_HELP} "
                f"(e.g. {side}q0.99, a statistic of the {part} part of x)"
            )
        raise ConfigError(
            f"unknown predictor feature '{name}'; use mean, std, max or a quantile of |x| "
            "such as q0.99, or pos_/neg_ with max or a quantile for the positive or negative "
            "part of x (e.g. pos_q0.999)"
        )


def feature_flops(names: tuple[str, ...], elements: int) -> int:
    """Operations to compute the features of one sample of ``elements`` values: one pass per
    statistic (a selection for each quantile counts as two passes), and one more for each
    signed part (``pos_`` / ``neg_``) that the features read."""
    sides = {split_feature(name)[0] for name in names} - {""}
    per_statistic = sum(
        (2 if split_feature(name)[1].startswith("q") else 1) * elements for name in names
    )
    return per_statistic + len(sides) * elements


def sample_features(
    x: torch.Tensor, names: tuple[str, ...], max_elements: int | None = None
) -> torch.Tensor:
    """Per-sample features ``[N, F]`` of ``x`` (batch first): ``mean`` of ``x``; the logs of
    ``std``, ``max`` |x| and the quantiles ``qP`` of |x|, and of ``max`` and ``qP`` of the
    positive part ``max(x, 0)`` (``pos_max``, ``pos_qP``) and of the negative part
    ``max(-x, 0)`` (``neg_max``, ``neg_qP``).

    With ``max_elements``, the statistics read a fixed random subset of that many elements of
    each sample (the same positions for every input), so a source deep in a large model costs
    a few thousand operations, not a pass over its whole feature map.

    Computed in float64: its sums and logs then round the same way in any runtime once cast
    back to float32, so the ONNX export (``qpp.export.predictor``) reproduces the QPs exactly."""
    rows = x.detach().reshape(x.shape[0], -1)
    if max_elements is not None and rows.shape[1] > max_elements:
        rows = rows[:, column_subset(rows.shape[1], max_elements)]
    rows = rows.double()
    parts = {"": rows.abs(), "pos_": rows.clamp(min=0.0), "neg_": (-rows).clamp(min=0.0)}
    columns: list[torch.Tensor] = []
    for name in names:
        side, statistic = split_feature(name)
        if statistic == "mean":
            columns.append(rows.mean(dim=1))
            continue
        if statistic == "std":
            value = rows.std(dim=1, correction=0)
        elif statistic == "max":
            value = parts[side].amax(dim=1)
        else:
            value = parts[side].kthvalue(quantile_rank(statistic, rows.shape[1]), dim=1).values
        columns.append(torch.log(value.clamp(min=_LOG_FLOOR)))
    return torch.stack(columns, dim=1)


@dataclass
class LinearQPPredictor:
    """Ridge regression from the features of ``source``'s input to log QPs (``targets``)."""

    source: str
    feature_names: tuple[str, ...]
    #: (quantizer name, "lo" | "hi" | "threshold") per output column.
    targets: list[tuple[str, str]]
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    #: ``[1 + F, T]``: the intercepts, then one row per standardized feature.
    weight: torch.Tensor
    #: The features read this many elements of the source per sample (None: all).
    max_elements: int | None = None
    #: ``[T]``: the standard deviation of each target's fit residual on the calibration data.
    residual_std: torch.Tensor | None = None

    @classmethod
    def fit(
        cls,
        source: str,
        feature_names: tuple[str, ...],
        targets: list[tuple[str, str]],
        features: torch.Tensor,
        log_qps: torch.Tensor,
        ridge: float = 1e-3,
        max_elements: int | None = None,
    ) -> LinearQPPredictor:
        """Least squares with an L2 penalty ``ridge * N`` on the slopes (not the intercepts)."""
        features, log_qps = features.double(), log_qps.double()
        mean = features.mean(dim=0)
        std = features.std(dim=0, correction=0).clamp(min=1e-6)
        design = torch.cat(
            [torch.ones(len(features), 1, dtype=torch.float64), (features - mean) / std], dim=1
        )
        penalty = torch.eye(design.shape[1], dtype=torch.float64) * ridge * len(features)
        penalty[0, 0] = 0.0
        weight = torch.linalg.solve(design.T @ design + penalty, design.T @ log_qps)
        residual_std = (log_qps - design @ weight).std(dim=0, correction=0)
        return cls(
            source,
            feature_names,
            targets,
            mean.float(),
            std.float(),
            weight.float().contiguous(),
            max_elements,
            residual_std.float().contiguous(),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """This predictor's features of its source tensor ``x``."""
        return sample_features(x, self.feature_names, self.max_elements)

    def predict_log(self, features: torch.Tensor, threshold_margin: float = 0.0) -> torch.Tensor:
        """``log q̂`` per sample and target (float64, like the features); Dense+Sparse thresholds
        raised by ``threshold_margin`` residual standard deviations."""
        features = features.double()
        standardized = (features - self.feature_mean.double()) / self.feature_std.double()
        weight = self.weight.double()
        predicted = weight[0] + standardized @ weight[1:]
        if threshold_margin and self.residual_std is not None:
            is_threshold = torch.tensor([kind == "threshold" for _, kind in self.targets])
            predicted = predicted + threshold_margin * self.residual_std.double() * is_threshold
        return predicted

    def predict_qps(self, features: torch.Tensor, threshold_margin: float = 0.0) -> torch.Tensor:
        """``q̂`` per sample and target (float32) as the deployed model computes them: ranges
        from log ranges on the ``LOG_RANGE_STEP`` grid, thresholds as predicted."""
        log_qps = self.predict_log(features, threshold_margin)
        ranges = torch.tensor([kind != "threshold" for _, kind in self.targets])
        log_qps = torch.where(ranges, round_log_ranges(log_qps), log_qps)
        return torch.exp(log_qps).float()

    def r_squared(self, features: torch.Tensor, log_qps: torch.Tensor) -> torch.Tensor:
        """Coefficient of determination per target column (1 = exact)."""
        residual = (log_qps - self.predict_log(features)).square().sum(dim=0)
        total = (log_qps - log_qps.mean(dim=0)).square().sum(dim=0)
        return torch.where(total > 1e-12, 1.0 - residual / total.clamp(min=1e-12), 1.0)

    def flops(self, source_elements: int) -> int:
        """Per sample: the features, their standardization and the linear map."""
        features = len(self.feature_names)
        read = min(source_elements, self.max_elements or source_elements)
        return feature_flops(self.feature_names, read) + 2 * features * (len(self.targets) + 1)

    # --- persistence (safetensors + JSON) ---------------------------------------------------

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.feature_mean": self.feature_mean.contiguous(),
            f"{prefix}.feature_std": self.feature_std.contiguous(),
            f"{prefix}.weight": self.weight.contiguous(),
            **(
                {}
                if self.residual_std is None
                else {f"{prefix}.residual_std": self.residual_std.contiguous()}
            ),
        }

    def settings(self) -> dict[str, object]:
        return {
            "source": self.source,
            "features": list(self.feature_names),
            "targets": [list(t) for t in self.targets],
            "max_elements": self.max_elements,
        }

    @classmethod
    def from_saved(
        cls, settings: dict[str, object], tensors: dict[str, torch.Tensor], prefix: str
    ) -> LinearQPPredictor:
        return cls(
            str(settings["source"]),
            tuple(settings["features"]),  # type: ignore[arg-type]
            [(str(a), str(b)) for a, b in settings["targets"]],  # type: ignore[attr-defined]
            tensors[f"{prefix}.feature_mean"],
            tensors[f"{prefix}.feature_std"],
            tensors[f"{prefix}.weight"],
            None if settings.get("max_elements") is None else int(settings["max_elements"]),  # type: ignore[arg-type]
            tensors.get(f"{prefix}.residual_std"),
        )
