"""Terminal tables (rich) for job results."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _format(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def result_table(result: dict[str, Any], title: str) -> Table:
    """FP32 vs quantized metrics, sizes and times of one job (the ``--json`` object)."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("FP32", justify="right")
    table.add_column("quantized", justify="right")
    table.add_column("change", justify="right")
    fp32, quantized = result["metrics"]["fp32"], result["metrics"]["quantized"]
    for key, value in fp32.items():
        q = quantized.get(key, float("nan"))
        marker = " *" if key == result.get("primary_metric") else ""
        table.add_row(f"{key}{marker}", _format(value), _format(q), f"{q - value:+.4f}")
    sizes = result["size_bytes"]
    ratio = sizes["quantized"] / sizes["fp32"] if sizes["fp32"] else float("nan")
    table.add_row(
        "model size (MB)",
        f"{sizes['fp32'] / 1e6:.2f}",
        f"{sizes['quantized'] / 1e6:.2f}",
        f"x{ratio:.3f}",
        end_section="weight_bits_per_element" not in result,
    )
    if result.get("weight_bits_per_element") is not None:
        bits = result["weight_bits_per_element"]
        table.add_row("bits per weight", "32", f"{bits:g}", f"x{bits / 32:.3f}", end_section=True)
    seconds = result["seconds"]
    table.add_row("calibrate (s)", "", f"{seconds['calibrate']:.1f}", "")
    table.add_row("evaluate (s)", "", f"{seconds['evaluate']:.1f}", "")
    table.add_row("total (s)", "", f"{seconds['total']:.1f}", "")
    return table


def compare_table(compare: dict[str, Any], primary_metric: str) -> Table:
    """Static vs predicted vs dynamic activation QPs (``qpp quantize --compare``)."""
    table = Table(title="activation QPs: static vs predicted vs dynamic", title_justify="left")
    for column in (
        "mode",
        primary_metric,
        "output error vs FP32",
        "outlier density (mean ± std over inputs)",
        "overhead (% of model FLOPs)",
        "evaluate (s)",
    ):
        table.add_column(column, justify="right")
    for mode, row in compare["modes"].items():
        density = row.get("outlier_density")
        table.add_row(
            mode,
            _format(row["metrics"][primary_metric]),
            f"{row['output_error']:.3g}" if "output_error" in row else "-",
            f"{density['mean']:.5f} ± {density['std_over_inputs']:.5f}" if density else "-",
            f"{row['overhead_percent']:.4f}",
            f"{row['seconds']:.1f}",
        )
    if compare.get("output_error_on") == "log-probabilities":
        table.caption = "output error on log-probabilities (the model ends in a softmax)"
    return table


def print_result(result: dict[str, Any], title: str, console: Console | None = None) -> None:
    console = console or Console()
    console.print(result_table(result, title))
    if "compare" in result:
        console.print(compare_table(result["compare"], result["primary_metric"]))
    print_estimator_choice(result, console)


def print_estimator_choice(result: dict[str, Any], console: Console) -> None:
    """The per-input estimator ``auto`` chose, the candidates' and the static ranges' output
    errors on calibration data, and a note when the static ranges were the closest to FP32."""
    choice = result.get("dynamic_estimator")
    if choice:
        errors = ", ".join(
            f"{name} {error:.4g}" for name, error in choice["calibration_output_error"].items()
        )
        static = choice.get("static_output_error")
        console.print(
            f"per-input ranges: {choice['chosen']} (relative output error vs FP32 on "
            f"calibration data: {errors}"
            + (f"; static ranges {static:.4g})" if static is not None else ")")
        )
        per_layer = choice.get("per_layer")
        if per_layer:
            console.print(
                f"then per layer: {per_layer['label']} (relative output error on the first "
                f"calibration batch {per_layer['output_error_before']:.4g} -> "
                f"{per_layer['output_error_after']:.4g})"
            )
        targets = choice.get("predicted_output_error")
        if targets:
            listed = ", ".join(f"{name} {error:.4g}" for name, error in targets.items())
            console.print(
                f"predictor targets: {choice['predictor_targets']} (relative output error of "
                f"predicted QPs fitted to each candidate's ranges: {listed})"
            )
        layer_targets = choice.get("per_layer_targets")
        if layer_targets:
            console.print(
                f"then predicted ranges per layer: {layer_targets['label']} (relative output "
                f"error on the calibration batches {layer_targets['output_error_before']:.4g}"
                f" -> {layer_targets['output_error_after']:.4g})"
            )
        dynamic_mix = choice.get("dynamic_mix")
        if dynamic_mix:
            adopted = dynamic_mix["adopted"]
            verdict = f"take the {adopted}" if dynamic_mix["changed"] else f"keep their {adopted}"
            listed = ", ".join(f"{mix} {error:.4g}" for mix, error in dynamic_mix["errors"].items())
            console.print(
                f"dynamic ranges {verdict} (relative output error on the calibration batches: "
                f"{listed})"
            )
        second = choice.get("dynamic_second_sweep")
        if second:
            console.print(
                f"then dynamic ranges per layer again, on the same batches (relative output "
                f"error {second['output_error_before']:.4g} -> {second['output_error_after']:.4g})"
            )
        chosen_error = choice["calibration_output_error"][choice["chosen"]]
        if static is not None and static <= chosen_error and not per_layer:
            console.print(
                "[yellow]note: on this calibration data the static ranges are closer to FP32 "
                "than any per-input range; per-input QPs may not pay on this model (compare "
                "with --compare, or keep --activation-ranges static)[/yellow]"
            )
