"""The ``qpp`` command line: parses, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from qpp.errors import ConfigError, QppError
from qpp.sim.config import RECIPE_ADAROUND_ITERATIONS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="qpp: post-training quantization of PyTorch models, simulated and evaluated.",
)
stdout = Console()
F = TypeVar("F", bound=Callable[..., Any])


# Options that several commands share.
ModelArgument = Annotated[
    str, typer.Argument(help="zoo name, model.onnx, Hugging Face folder, or file.py:function")
]
WeightBits = Annotated[int, typer.Option("--weights", help="weight bit-width (2-16)")]
ActivationBits = Annotated[int, typer.Option("--activations", help="activation bit-width (2-16)")]
WeightGranularity = Annotated[str, typer.Option(help="per-channel or per-tensor")]
CalibrationData = Annotated[Path | None, typer.Option(help="calibration .npz for a user model")]
EvaluationData = Annotated[
    Path | None, typer.Option("--eval", help="evaluation .npz for a user model")
]
OutputFolder = Annotated[
    Path | None, typer.Option(help="output folder (default: a new folder under runs/)")
]
Force = Annotated[bool, typer.Option(help="replace an existing --out folder")]
JsonOutput = Annotated[bool, typer.Option("--json", help="print one JSON object and nothing else")]
Quiet = Annotated[bool, typer.Option(help="no progress bars")]


def user_errors(command: F) -> F:
    """Turn a ``QppError`` into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except QppError as error:
            message = str(error).replace("\n", " ")
            print(f"qpp: error: {message}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)


@app.command()
def models() -> None:
    """List the zoo: real models with offline data and a task metric."""
    from qpp.zoo import entry_class, zoo_names

    table = Table(title="qpp zoo")
    for column in ("name", "metric", "what"):
        table.add_column(column)
    for name in zoo_names():
        cls = entry_class(name)
        table.add_row(name, cls.primary_metric, cls.summary)
    stdout.print(table)


def _parse_override(text: str) -> tuple[str, dict[str, Any]]:
    """``"encoder.*.query.*:bits=16,estimator=minmax"`` -> (pattern, {bits: 16, ...})."""
    pattern, sep, settings = text.rpartition(":")
    if not sep or not pattern:
        raise ConfigError(
            f"override '{text}' must look like PATTERN:key=value[,key=value], "
            "e.g. '*.query.output:bits=16'"
        )
    values: dict[str, Any] = {}
    for item in settings.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(
                f"override setting '{item}' must be key=value; write e.g. '{pattern}:bits=4'"
            )
        key = key.strip()
        if key == "bits":
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(
                    f"bits must be an integer, got '{value}'; write e.g. '{pattern}:bits=4'"
                ) from None
        elif key in ("symmetric", "enabled"):
            flag = value.strip().lower()
            if flag not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ConfigError(f"{key} must be true or false, got '{value}'")
            values[key] = flag in ("1", "true", "yes", "on")
        else:
            values[key] = value.strip()
    return pattern, values


@app.command()
@user_errors
def quantize(
    model: ModelArgument,
    weights: WeightBits = 8,
    activations: ActivationBits = 8,
    weight_granularity: WeightGranularity = "per-channel",
    activation_granularity: Annotated[
        str, typer.Option(help="per-tensor or per-channel")
    ] = "per-tensor",
    weight_estimator: Annotated[str, typer.Option(help="minmax, mse[:p], percentile[:P]")] = "mse",
    activation_estimator: Annotated[
        str,
        typer.Option(help="minmax, mse[:p], percentile[:P], entropy, topk-median, cross-entropy"),
    ] = "mse",
    policy: Annotated[
        str,
        typer.Option(
            help="runtime (where an int8 runtime computes), runtime-int8-eltwise (also "
            "Add/Mul/Softmax read by integer ops, as ORT's quantize_static) or full"
        ),
    ] = "runtime",
    fold_bn: Annotated[
        bool, typer.Option("--fold-bn/--no-fold-bn", help="fold batch norms")
    ] = True,
    exact_plateaus: Annotated[
        bool,
        typer.Option(
            "--exact-plateaus/--no-exact-plateaus",
            help="hold an activation's floor/ceiling (e.g. hard-swish zeros after an affine) "
            "exactly on the grid",
        ),
    ] = False,
    calib_samples: Annotated[
        int | None, typer.Option(help="use only the first N calibration samples")
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option(
            help="per-quantizer change, PATTERN:key=value[,...]; keys: bits, granularity, "
            "estimator, symmetric, enabled"
        ),
    ] = None,
    disable: Annotated[
        list[str] | None, typer.Option(help="leave quantizers matching PATTERN in float")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="a JSON config (qpp.json 'config' or QuantConfig)")
    ] = None,
    calib: CalibrationData = None,
    eval_data: EvaluationData = None,
    out: OutputFolder = None,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
    list_quantizers: Annotated[
        bool, typer.Option(help="print the quantizer names and exit")
    ] = False,
    activation_ranges: Annotated[
        str, typer.Option(help="activation QPs: static, dynamic (per input) or predicted (QPP)")
    ] = "static",
    scheme: Annotated[
        str, typer.Option(help="uniform, or dense-sparse (outliers stay in float)")
    ] = "uniform",
    outlier_fraction: Annotated[
        float, typer.Option(help="dense-sparse: fraction of each tensor kept in float")
    ] = 0.01,
    dynamic_estimator: Annotated[
        str,
        typer.Option(
            help="per-input range: auto (the candidate closest to FP32 on calibration data), "
            "per-layer (auto, then each layer's own candidate by the same test, and with "
            "predicted ranges each layer's predictor fit chosen the same way; slower: runs of "
            "calibration batches from each layer on), minmax, percentile[:P], mse[:p]"
        ),
    ] = "auto",
    predictor_features: Annotated[
        str,
        typer.Option(
            help="QP predictor inputs: mean, std, max, qP (quantiles of |x|), pos_max, pos_qP, "
            "neg_max, neg_qP (of the positive / negative part of x); auto: "
            "mean,pos_q0.99,pos_q0.999,pos_max,neg_q0.99,neg_q0.999,neg_max for uniform, "
            "mean,max,q0.9,q0.99,q0.999 for dense-sparse"
        ),
    ] = "auto",
    predictor_sources: Annotated[
        str,
        typer.Option(help="predictor inputs: auto (by a 0.5 % FLOPs budget), auto:N or names"),
    ] = "auto",
    predictor_elements: Annotated[
        int,
        typer.Option(
            help="elements of each source the predictor's features read per input (auto "
            "sources may halve it, down to 512, to afford more sources)"
        ),
    ] = 2048,
    compare: Annotated[
        bool, typer.Option(help="also evaluate static, predicted and dynamic QPs; one table")
    ] = False,
    recipe: Annotated[
        str | None,
        typer.Option(help="PTQ recipe instead of plain calibration: wp-ptq (white paper Fig. 8)"),
    ] = None,
    adaround_iterations: Annotated[
        int,
        typer.Option(
            help="AdaRound iterations per layer in a recipe (0: bias correction); "
            "AdaRound alone defaults to the paper's 10k"
        ),
    ] = RECIPE_ADAROUND_ITERATIONS,
    weight_quantizer: Annotated[
        str, typer.Option(help="uniform, or pwlq (piecewise linear, Fang et al. 2020)")
    ] = "uniform",
    activation_quantizer: Annotated[str, typer.Option(help="uniform or pwlq")] = "uniform",
    breakpoints: Annotated[
        int | None, typer.Option(help="PWLQ breakpoints per side, 1-3 (default 1)")
    ] = None,
    breakpoint_search: Annotated[
        str | None, typer.Option(help="PWLQ breakpoint: auto (default), approx, bisection or grid")
    ] = None,
    breakpoint_objective: Annotated[
        str | None,
        typer.Option(
            help="PWLQ weights, what auto/grid searches minimise per channel: weight (the "
            "paper's L2 error, default) or output (the layer's output error on the "
            "calibration data; ours; --bias-correction then fits each channel's shift to it)"
        ),
    ] = None,
    breakpoint_distribution: Annotated[
        str | None,
        typer.Option(
            help="PWLQ fit for approx/bisection: gaussian (default), laplacian, empirical"
        ),
    ] = None,
    pwlq_form: Annotated[
        str | None,
        typer.Option(
            help="PWLQ grid: non-overlapping (official code, default), paper, overlapping"
        ),
    ] = None,
    bias_correction: Annotated[
        bool, typer.Option(help="PWLQ weights: correct each channel's mean and std (+BC)")
    ] = False,
    split_above: Annotated[
        float | None,
        typer.Option(
            help="PWLQ weights: one more breakpoint per side for layers whose relative squared "
            "weight error is above this (e.g. 0.015); default never"
        ),
    ] = None,
    empirical_bias_correction: Annotated[
        bool,
        typer.Option(
            help="after the weights are quantized, correct each layer's bias by its output "
            "mean shift on the calibration data (white paper eq. 19); uniform or PWLQ weights"
        ),
    ] = False,
) -> None:
    """Quantize MODEL, evaluate it against FP32, and save encodings, weights and a report."""
    _quiet_libraries()
    from qpp.pipeline import quantize_job
    from qpp.runs import default_run_folder
    from qpp.sim.config import LayerOverride, QuantConfig

    if config is not None:
        quant_config = _read_config(config)
    else:
        overrides: dict[str, LayerOverride] = {}
        for text in override or []:
            pattern, values = _parse_override(text)
            try:
                overrides[pattern] = LayerOverride(**values)
            except TypeError:
                raise ConfigError(
                    f"override '{text}' has an unknown key; use bits, granularity, estimator, "
                    "symmetric or enabled"
                ) from None
        for pattern in disable or []:
            overrides[pattern] = LayerOverride(enabled=False)
        piecewise = _piecewise_spec(
            weight_quantizer,
            activation_quantizer,
            breakpoints=breakpoints,
            search=breakpoint_search,
            distribution=breakpoint_distribution,
            form=pwlq_form,
            bias_correction=bias_correction or None,
            split_above=split_above,
            objective=breakpoint_objective,
        )
        quant_config = QuantConfig(
            weight_bits=weights,
            activation_bits=activations,
            weight_granularity=weight_granularity,
            activation_granularity=activation_granularity,
            weight_estimator=weight_estimator,
            activation_estimator=activation_estimator,
            policy=policy,
            fold_batch_norm=fold_bn,
            exact_activation_plateaus=exact_plateaus,
            calibration_samples=calib_samples,
            overrides=overrides,
            activation_ranges=activation_ranges,
            activation_scheme=scheme,
            outlier_fraction=outlier_fraction,
            dynamic_estimator=dynamic_estimator,
            predictor_features=predictor_features,
            predictor_sources=predictor_sources,
            predictor_elements=predictor_elements,
            recipe=recipe,
            adaround_iterations=adaround_iterations,
            weight_quantizer=weight_quantizer,
            activation_quantizer=activation_quantizer,
            piecewise=piecewise,
            empirical_bias_correction=empirical_bias_correction,
        )
    source = _source(model, calib, eval_data)
    if list_quantizers:
        _print_quantizers(source, quant_config)
        return
    folder = out if out is not None else default_run_folder(model)
    result, _ = quantize_job(
        source, quant_config, folder, force, show_progress=not quiet, compare=compare
    )
    _show(result.as_dict(), json_output, f"qpp quantize {model}")


#: ``PiecewiseSpec`` field -> the ``qpp quantize`` flag that sets it.
_PIECEWISE_FLAGS = {
    "breakpoints": "--breakpoints",
    "search": "--breakpoint-search",
    "distribution": "--breakpoint-distribution",
    "form": "--pwlq-form",
    "bias_correction": "--bias-correction",
    "split_above": "--split-above",
    "objective": "--breakpoint-objective",
}


def _piecewise_spec(weight_quantizer: str, activation_quantizer: str, **given: Any) -> Any:
    """The PWLQ settings from the flags given; they need a pwlq quantizer to act on."""
    from qpp.quant.spec import PiecewiseSpec

    settings = {key: value for key, value in given.items() if value is not None}
    if settings and "pwlq" not in (weight_quantizer, activation_quantizer):
        flags = ", ".join(_PIECEWISE_FLAGS.get(key, key) for key in settings)
        raise ConfigError(
            f"{flags} only apply to PWLQ; add --weight-quantizer pwlq "
            "(or --activation-quantizer pwlq)"
        )
    for key in ("bias_correction", "split_above", "objective"):
        if settings.get(key) and weight_quantizer != "pwlq":
            flag = _PIECEWISE_FLAGS[key]
            raise ConfigError(f"{flag} applies to PWLQ weights; add --weight-quantizer pwlq")
    return PiecewiseSpec(**settings)


def _source(model: str, calib: Path | None, eval_data: Path | None) -> Any:
    """Where the model and (for user models) its npz data come from."""
    from qpp.sources import SourceSpec

    return SourceSpec(
        model,
        str(calib) if calib is not None else None,
        str(eval_data) if eval_data is not None else None,
    )


def _read_config(path: Path) -> Any:
    """The ``QuantConfig`` in a JSON file: a bare config, or a run's ``qpp.json``."""
    from qpp.sim.config import QuantConfig

    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass a JSON file (a run's qpp.json or a "
            "QuantConfig)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid JSON ({error}); fix it") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} holds no JSON object; write one like QuantConfig().to_json()"
        )
    try:
        return QuantConfig.from_dict(data)
    except (TypeError, AttributeError) as error:
        raise ConfigError(
            f"config file {path} has a value of the wrong type ({error}); compare it with "
            "QuantConfig().to_json()"
        ) from None


def _print_quantizers(source: Any, quant_config: Any) -> None:
    from qpp.api import prepare
    from qpp.data import check_batches
    from qpp.sources import resolve_source

    entry = resolve_source(source)
    batches = check_batches(entry.calibration_set(), "calibration")
    quantized = prepare(entry.load_model(), batches[0], quant_config)
    for name in quantized.names:
        print(f"{quantized.quantizer(name).kind.value:10s} {name}")


def _show(result: dict[str, Any], json_output: bool, title: str) -> None:
    if json_output:
        print(json.dumps(result))
        return
    from qpp.report.tables import print_result

    print_result(result, title, stdout)
    if result.get("output_dir"):
        stdout.print(f"saved to {result['output_dir']}")


@app.command("eval")
@user_errors
def eval_command(
    folder: Annotated[Path, typer.Argument(help="a folder written by qpp quantize")],
    json_output: JsonOutput = False,
    quiet: Quiet = False,
) -> None:
    """Rebuild a saved quantized model and evaluate it again (reproduces the saved metrics)."""
    _quiet_libraries()
    from qpp.pipeline import eval_job

    result, saved = eval_job(folder, show_progress=not quiet)
    data = result.as_dict()
    data["reproduced"] = data["metrics"] == saved.get("metrics")
    _show(data, json_output, f"qpp eval {folder}")
    if not json_output:
        verdict = "identical to" if data["reproduced"] else "DIFFERENT from"
        stdout.print(f"metrics are {verdict} the saved report")


@app.command("export")
@user_errors
def export_command(
    folder: Annotated[Path, typer.Argument(help="a folder written by qpp quantize")],
    onnx: Annotated[Path, typer.Option("--onnx", help="the ONNX file to write")],
    check: Annotated[
        bool, typer.Option(help="compare ONNX Runtime with the simulation on the evaluation set")
    ] = False,
    force: Annotated[bool, typer.Option(help="replace an existing --onnx file")] = False,
    pwlq_export: Annotated[
        str,
        typer.Option(
            help="PWLQ weights as integer branches ORT sums (branches) or float (dequantized)"
        ),
    ] = "branches",
    json_output: JsonOutput = False,
    quiet: Quiet = False,
) -> None:
    """Export a saved quantized model as an ONNX QDQ graph that ONNX Runtime runs in int8."""
    _quiet_libraries()
    from qpp.export.job import export_job

    result = export_job(folder, onnx, check, force, not quiet, pwlq_export)
    data = result.as_dict()
    if json_output:
        print(json.dumps(data))
    else:
        from qpp.report.export import print_export

        print_export(data, stdout)
    if result.parity is not None and not result.parity.passed:
        raise typer.Exit(1)


@app.command("bench")
@user_errors
def bench_command(
    folder: Annotated[Path, typer.Argument(help="a folder written by qpp quantize")],
    seconds: Annotated[
        float, typer.Option(help="time budget per batch size for the repeated runs")
    ] = 20.0,
    json_output: JsonOutput = False,
) -> None:
    """ONNX Runtime latency, batch 1 and 32: FP32 vs qpp int8 vs ORT's own quantize_static."""
    _quiet_libraries()
    from qpp.export.job import bench_job

    result = bench_job(folder, time_budget_s=seconds)
    if json_output:
        print(json.dumps(result.as_dict()))
    else:
        from qpp.report.export import print_bench

        print_bench(result.as_dict(), stdout)


@app.command()
@user_errors
def analyze(
    model: ModelArgument,
    weights: WeightBits = 8,
    activations: ActivationBits = 8,
    weight_granularity: WeightGranularity = "per-channel",
    recipe: Annotated[str | None, typer.Option(help="PTQ recipe first: wp-ptq")] = None,
    adaround_iterations: Annotated[
        int, typer.Option(help="AdaRound iterations per layer in a recipe")
    ] = RECIPE_ADAROUND_ITERATIONS,
    samples: Annotated[
        int, typer.Option(help="evaluation samples for the per-quantizer sensitivity sweeps")
    ] = 32,
    top: Annotated[
        int, typer.Option(help="how many of the most sensitive quantizers to show")
    ] = 12,
    calib: CalibrationData = None,
    eval_data: EvaluationData = None,
    out: OutputFolder = None,
    force: Force = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
) -> None:
    """Debug a quantized MODEL (white paper Fig. 9): FP32 vs weight-only vs activation-only,
    per-quantizer sensitivity and SQNR, range histograms; a table, PNG plots and index.html."""
    _quiet_libraries()
    from qpp.ptq.analyze_job import analyze_job
    from qpp.report.analysis import print_analysis
    from qpp.runs import default_run_folder
    from qpp.sim.config import QuantConfig

    if samples < 1 or top < 1:
        raise ConfigError("--samples and --top must be at least 1")
    config = QuantConfig(
        weight_bits=weights,
        activation_bits=activations,
        weight_granularity=weight_granularity,
        recipe=recipe,
        adaround_iterations=adaround_iterations,
    )
    source = _source(model, calib, eval_data)
    folder = out if out is not None else default_run_folder(f"{model}-analysis")
    result, report = analyze_job(source, config, folder, samples, top, force, not quiet)
    if json_output:
        print(json.dumps(result))
        return
    print_analysis(result["metrics"], report, result["primary_metric"], top, stdout)
    stdout.print(f"report: {folder / 'index.html'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
