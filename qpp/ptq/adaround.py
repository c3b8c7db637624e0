"""AdaRound: learned rounding of weights, layer by layer (white paper §3.4; Nagel et al. 2020).

Instead of rounding each weight to nearest, AdaRound picks floor or ceil per weight to
minimise the layer's output error. With ``h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1)`` (the rectified
sigmoid, ζ = 1.1, γ = -0.1, eq. 23) and the soft-quantized weight

    W̃ = s · (clamp(⌊W/s⌋ + z + h(V); n, p) - z)                               (eq. 22)

it minimises, for each layer in turn (eq. 25),

    ‖f_a(W x) - f_a(W̃ x̂)‖²_F + λ Σ_ij (1 - |2 h(V_ij) - 1|^β)                (eq. 24-25)

where ``x`` is the layer's input in the float model, ``x̂`` its input in the model whose earlier
layers are already quantized (and AdaRounded), and ``f_a`` the ReLU that follows the layer, if
any. λ = 0.01; β is annealed from 20 to 2 with a cosine after a warm start (20% of the
iterations) without the regulariser; V starts where ``h(V) = W/s - ⌊W/s⌋`` so W̃ = W; Adam with
learning rate 1e-3 at 10k iterations (AIMET's defaults; shorter budgets get a larger rate). At
the end ``h`` is hard-rounded at 0.5.

The weight encoding is frozen (computed before, usually with the MSE range). The result is
written back into the model's float weight tensor, already on the grid,
``s · (clamp(⌊W/s⌋ + z + 1[h ≥ 0.5]; n, p) - z)``, so the ordinary round-to-nearest weight
quantizer reproduces it exactly (as AIMET applies it).

Memory stays bounded: for one layer at a time, the inputs of at most ``samples`` calibration
samples are taken, and at most ``rows`` rows (linear: tokens/positions; conv: receptive-field
patches, via ``unfold``) are kept; each iteration uses a random mini-batch of ``batch_rows``
of them (all of them when they fit), with every output channel and weight optimised at once.
The gradient is written out by hand (``adaround_solver``): for a layer without a folded
activation the loss is quadratic in the weight and its exact gradient over all rows comes from
the rows' Gram matrix, one small matmul per iteration. With a
``state_dir`` every finished layer is saved (safetensors + JSON), and a rerun with the same
folder skips the finished layers.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qpp.api import limit_samples
from qpp.errors import ConfigError
from qpp.graph.patterns import WeightLayer, activation_after, get_attr, weight_layers
from qpp.ptq.activations import Batch, Recorder, data_positions, layer_rows
from qpp.ptq.adaround_solver import (
    GAMMA,
    ZETA,
    RoundingProblem,
    gram_gradient,
    grouped_matmul,
    rows_gradient,
    solve,
    use_gram,
)
from qpp.ptq.bias_correction import weight_quantizers_by_target
from qpp.quant.affine import dequantize
from qpp.report.progress import progress
from qpp.sim.model import QuantizedModel
from qpp.sim.quantizer import Quantizer


@dataclass(frozen=True)
class AdaRoundConfig:
    """AdaRound's hyper-parameters (defaults: the paper's and AIMET's)."""

    iterations: int = 10_000
    regularization: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    #: Adam's learning rate; ``None``: ``10 / iterations`` within [1e-3, 0.1], i.e. AIMET's 1e-3
    #: at 10k iterations, larger for shorter budgets so the logits can still cross over.
    learning_rate: float | None = None
    #: Calibration samples whose layer inputs are used (``None``: all given).
    samples: int | None = None
    #: Rows (positions x samples) kept per layer, and rows per iteration.
    rows: int = 16_384
    batch_rows: int = 512
    seed: int = 0
    #: Intra-op threads for the optimisation loop (``None``: torch's setting). Its matmuls are
    #: small, and on a shared 2-core machine one thread measured 4-50x faster than two.
    threads: int | None = 1
    #: Folder for per-layer results; a rerun with the same folder resumes.
    state_dir: str | None = None
    #: The layer input ``W̃`` sees: ``quantized`` = ``x̂`` from the model whose earlier layers
    #: are already quantized (eq. 25, AdaRound's eq. 35), which also corrects their errors;
    #: ``float`` = the float model's ``x`` (AdaRound's eq. 32), which only fits the rounding.
    #: With few samples per weight (MiniLM: 64 sentences, ~1.5k tokens) ``quantized`` fits
    #: the calibration sentences' upstream errors and generalizes worse (docs/benchmarks.md).
    inputs: str = "quantized"

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"AdaRound iterations must be at least 1, got {self.iterations}")
        if not 0 <= self.warm_start < 1:
            raise ConfigError(f"AdaRound warm_start must be in [0, 1), got {self.warm_start}")
        if self.inputs not in ("quantized", "float"):
            raise ConfigError(
                f"AdaRound inputs must be 'quantized' or 'float', got {self.inputs!r}"
            )
        if self.batch_rows < 1 or self.rows < self.batch_rows:
            raise ConfigError(
                "AdaRound needs 1 <= batch_rows <= rows; raise rows or lower batch_rows"
            )

    @property
    def step_size(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return min(max(10.0 / self.iterations, 1e-3), 0.1)

    def settings(self) -> dict[str, object]:
        """What decides the result (a resumed run must match it)."""
        data = asdict(self)
        data.pop("state_dir")
        data.pop("threads")
        return data


@dataclass
class LayerResult:
    """One layer: output MSE on its cached rows with nearest and with AdaRound rounding.

    ``kept`` is the rounding written back: ``adaround``, or ``nearest`` when the learned one
    reconstructs the layer's output worse (possible when the input mismatch ``x̂ - x`` of
    eq. 25 is large and many ``h`` stay near 0.5, where the regulariser has no pull).
    """

    mse_nearest: float
    mse_adaround: float
    changed_fraction: float
    seconds: float
    kept: str = "adaround"
    resumed: bool = False


@dataclass
class AdaRoundReport:
    layers: dict[str, LayerResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


# --- the math ---------------------------------------------------------------------------------


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1)`` (eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def initial_logits(fraction: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = fraction`` (inverse of eq. 23 inside (0, 1))."""
    p = ((fraction - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ 1 - |2h - 1|^β`` (eq. 24): 0 exactly when every ``h`` is 0 or 1."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def beta_schedule(iteration: int, config: AdaRoundConfig) -> float | None:
    """β for ``iteration``: ``None`` during the warm start, then cosine from start to end."""
    warm = config.warm_start * config.iterations
    if iteration < warm:
        return None
    relative = (iteration - warm) / max(config.iterations - warm, 1)
    return config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (
        1 + math.cos(relative * math.pi)
    )


@dataclass
class WeightGrid:
    """A frozen weight encoding, broadcast against the weight: ``s``, ``z``, ``[n, p]``."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    @classmethod
    def of(cls, quantizer: Quantizer, weight: torch.Tensor) -> WeightGrid:
        shape = [1] * weight.ndim
        if quantizer.axis is not None:
            shape[quantizer.axis % weight.ndim] = -1
        qmin, qmax = quantizer.integer_range
        return cls(quantizer.scale.reshape(shape), quantizer.zero_point.reshape(shape), qmin, qmax)

    def soft(self, floor: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``W̃ = s (clamp(⌊W/s⌋ + z + h; n, p) - z)`` (eq. 22)."""
        integer = torch.clamp(floor + self.zero_point + h, self.qmin, self.qmax)
        return (integer - self.zero_point) * self.scale

    def hard(self, integer_offset: torch.Tensor) -> torch.Tensor:
        """On-grid weight for ``⌊W/s⌋ + offset``, computed as the quantizer dequantizes."""
        integer = torch.clamp(integer_offset + self.zero_point, self.qmin, self.qmax)
        return dequantize(integer, self.scale, self.zero_point)


def rows_output(rows: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``rows @ W^T`` per group (a grouped conv is a block-diagonal matmul)."""
    return grouped_matmul(rows, weight.reshape(weight.shape[0], -1), groups)


# --- one layer --------------------------------------------------------------------------------


@dataclass
class LayerData:
    """Cached rows of one layer: quantized-model inputs and float-model targets."""

    inputs: torch.Tensor
    targets: torch.Tensor


def optimize_rounding(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grid: WeightGrid,
    data: LayerData,
    groups: int,
    relu: bool,
    config: AdaRoundConfig,
) -> tuple[torch.Tensor, LayerResult]:
    """Learn the rounding of one layer (eq. 25); returns the on-grid weight and its metrics."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    weight = weight.detach()
    bias = bias.detach() if bias is not None else None
    floor = torch.floor(weight / grid.scale)
    problem = _problem(weight, bias, grid, floor, groups, relu)
    if use_gram(problem, config.batch_rows):
        gradient = gram_gradient(problem, data.inputs, data.targets)
    else:
        gradient = rows_gradient(problem, data.inputs, data.targets, config.batch_rows, generator)
    with _threads(config.threads), torch.no_grad():
        solve(
            problem,
            gradient,
            config.iterations,
            config.step_size,
            config.regularization,
            lambda iteration: beta_schedule(iteration, config),
        )
    logits = problem.logits.reshape(weight.shape)

    def output(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        y = rows_output(rows, w, groups)
        y = y + bias if bias is not None else y
        return torch.relu(y) if relu else y

    with torch.no_grad():
        rounded = grid.hard(floor + (rectified_sigmoid(logits) >= 0.5).float())
        nearest = grid.hard(torch.round(weight / grid.scale))
        result = LayerResult(
            mse_nearest=_mse(output(nearest, data.inputs), data.targets),
            mse_adaround=_mse(output(rounded, data.inputs), data.targets),
            changed_fraction=float((rounded != nearest).float().mean()),
            seconds=round(time.perf_counter() - started, 3),
        )
    if result.mse_adaround > result.mse_nearest:
        result.kept = "nearest"
        return nearest, result
    return rounded, result


def _problem(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grid: WeightGrid,
    floor: torch.Tensor,
    groups: int,
    relu: bool,
) -> RoundingProblem:
    """``W̃ = base + step ⊙ h`` (eq. 22): ``step = s`` where ``⌊W/s⌋ + z + h`` stays in
    ``[n, p]`` for every ``h`` in [0, 1], else 0 (the clamp makes those weights constant)."""
    integer = floor + grid.zero_point
    free = (integer >= grid.qmin) & (integer + 1 <= grid.qmax)
    base = grid.soft(floor, torch.zeros_like(weight))
    step = torch.where(free, grid.scale, torch.zeros_like(weight))
    logits = initial_logits(weight / grid.scale - floor)
    out_features = weight.shape[0]
    return RoundingProblem(
        base.reshape(out_features, -1).contiguous(),
        step.reshape(out_features, -1).contiguous(),
        logits.reshape(out_features, -1).contiguous(),
        bias,
        groups,
        relu,
    )


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _mse(output: torch.Tensor, target: torch.Tensor) -> float:
    return float((output - target).pow(2).sum(1).mean())


# --- the model --------------------------------------------------------------------------------


@contextmanager
def _float_weights(qmodel: QuantizedModel, originals: dict[str, torch.Tensor]) -> Iterator[None]:
    """The float model inside the block: quantizers off, original weights back in place."""
    graph_module = qmodel.graph_module
    states = {name: qmodel.quantizer(name).enabled for name in qmodel.names}
    current = {path: get_attr(graph_module, path).detach().clone() for path in originals}
    qmodel.set_enabled(False)
    with torch.no_grad():
        for path, tensor in originals.items():
            get_attr(graph_module, path).copy_(tensor)
    try:
        yield
    finally:
        with torch.no_grad():
            for path, tensor in current.items():
                get_attr(graph_module, path).copy_(tensor)
        for name, enabled in states.items():
            qmodel.quantizer(name).enabled = enabled


def _sample_rows(
    qmodel: QuantizedModel,
    layer: WeightLayer,
    batches: Sequence[Batch],
    rows_per_batch: int,
    seed: int,
) -> torch.Tensor:
    """Rows of ``layer``'s input over ``batches``, the same positions on every call. A linear
    layer's rows come only from real token positions (``data_positions``): padding tokens
    are not samples of the data, and the model's output ignores them."""
    kernel = tuple(get_attr(qmodel.graph_module, layer.weight).shape[2:])
    chosen: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(seed)
    positions: torch.Tensor | None = None

    def watch(_node: object, args: tuple[object, ...], _output: object) -> None:
        x = args[0]
        assert isinstance(x, torch.Tensor)
        x = x.detach()
        if not layer.is_conv and positions is not None and x.shape[:-1] == positions.shape:
            rows = x[positions]
        else:
            rows = layer_rows(layer, x, kernel)
        index = torch.randperm(rows.shape[0], generator=generator)[:rows_per_batch]
        chosen.append(rows[index].clone())

    recorder = Recorder(qmodel.graph_module, {layer.name: watch})
    for batch in batches:
        positions = data_positions(batch)
        recorder.run_batches([batch])
    return torch.cat(chosen)


def _layer_data(
    qmodel: QuantizedModel,
    layer: WeightLayer,
    batches: Sequence[Batch],
    originals: dict[str, torch.Tensor],
    relu: bool,
    config: AdaRoundConfig,
) -> LayerData:
    per_batch = max(1, -(-config.rows // len(batches)))
    inputs = None
    if config.inputs == "quantized":
        inputs = _sample_rows(qmodel, layer, batches, per_batch, config.seed)
    with _float_weights(qmodel, originals):
        float_inputs = _sample_rows(qmodel, layer, batches, per_batch, config.seed)
        inputs = float_inputs if inputs is None else inputs
        weight = get_attr(qmodel.graph_module, layer.weight).detach()
        bias = get_attr(qmodel.graph_module, layer.bias).detach() if layer.bias else None
        targets = rows_output(float_inputs, weight, layer.groups)
        targets = targets + bias if bias is not None else targets
    return LayerData(inputs, torch.relu(targets) if relu else targets)


def _eligible(
    qmodel: QuantizedModel, report: AdaRoundReport
) -> list[tuple[WeightLayer, Quantizer]]:
    quantizers = weight_quantizers_by_target(qmodel)
    chosen = []
    for layer in weight_layers(qmodel.graph_module):
        quantizer = quantizers.get(layer.weight)
        if quantizer is None or not quantizer.enabled or not quantizer.calibrated:
            report.skipped[layer.name] = "weight not quantized (no calibrated weight quantizer)"
        elif quantizer.axis not in (None, 0):
            report.skipped[layer.name] = f"per-channel axis {quantizer.axis} is not supported"
        else:
            chosen.append((layer, quantizer))
    return chosen


class _State:
    """Per-layer results in ``state_dir``: ``<layer>.safetensors`` plus ``adaround.json``."""

    def __init__(self, folder: str | None, config: AdaRoundConfig) -> None:
        self.folder = Path(folder) if folder else None
        self.done: dict[str, dict[str, object]] = {}
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self.folder / "adaround.json"
        if index.is_file():
            saved = json.loads(index.read_text())
            if saved.get("settings") != config.settings():
                raise ConfigError(
                    f"{self.folder} holds AdaRound results made with other settings; "
                    "use a new state folder or the same settings to resume"
                )
            self.done = saved.get("layers", {})
        self.settings = config.settings()

    def file(self, layer: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', layer)}.safetensors"

    def load(self, layer: WeightLayer, quantizer: Quantizer) -> tuple[torch.Tensor, LayerResult]:
        tensors = load_file(str(self.file(layer.name)))
        if not torch.equal(tensors["scale"], quantizer.scale.reshape(-1)):
            raise ConfigError(
                f"saved AdaRound state for {layer.name} was made with another weight encoding; "
                "use a new state folder"
            )
        result = LayerResult(**self.done[layer.name])  # type: ignore[arg-type]
        result.resumed = True
        return tensors["weight"], result

    def save(
        self, layer: WeightLayer, quantizer: Quantizer, weight: torch.Tensor, result: LayerResult
    ) -> None:
        if self.folder is None:
            return
        tensors = {"weight": weight.contiguous(), "scale": quantizer.scale.reshape(-1).clone()}
        save_file(tensors, str(self.file(layer.name)))
        self.done[layer.name] = {k: v for k, v in asdict(result).items() if k != "resumed"}
        index = {"settings": self.settings, "layers": self.done}
        (self.folder / "adaround.json").write_text(json.dumps(index, indent=1))


def adaround(
    qmodel: QuantizedModel,
    data: Sequence[Batch],
    config: AdaRoundConfig | None = None,
    show_progress: bool = False,
) -> AdaRoundReport:
    """AdaRound every conv/linear layer with a calibrated weight quantizer, in graph order.

    Weight encodings must be set (``qmodel.compute_weight_encodings()``) and stay frozen:
    calibrate activations afterwards with ``calibrate(..., weights=False)``.
    """
    config = config or AdaRoundConfig()
    started = time.perf_counter()
    report = AdaRoundReport()
    batches = limit_samples(list(data), config.samples)
    state = _State(config.state_dir, config)
    layers = _eligible(qmodel, report)
    originals = {
        layer.weight: get_attr(qmodel.graph_module, layer.weight).detach().clone()
        for layer, _ in layers
    }
    for layer, quantizer in progress(layers, "adaround", show_progress):
        weight = get_attr(qmodel.graph_module, layer.weight)
        if layer.name in state.done:
            rounded, result = state.load(layer, quantizer)
        else:
            relu = activation_after(layer) == "relu"
            layer_data = _layer_data(qmodel, layer, batches, originals, relu, config)
            bias = get_attr(qmodel.graph_module, layer.bias) if layer.bias else None
            rounded, result = optimize_rounding(
                weight,
                bias,
                WeightGrid.of(quantizer, weight),
                layer_data,
                layer.groups,
                relu,
                config,
            )
            state.save(layer, quantizer, rounded, result)
        with torch.no_grad():
            weight.copy_(rounded)
        report.layers[layer.name] = result
    report.seconds = round(time.perf_counter() - started, 3)
    return report
