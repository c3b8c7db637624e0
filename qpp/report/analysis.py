"""The debugging report of ``qpp analyze``: a terminal table, PNG plots, one HTML page."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qpp.ptq.debug import AnalysisReport, QuantizerAnalysis


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else "nan" if math.isnan(value) else f"{value:.1f}"


def modes_table(
    metrics: dict[str, dict[str, float]], report: AnalysisReport, primary: str
) -> Table:
    table = Table(title="quantization modes (white paper Fig. 9)", title_justify="left")
    table.add_column("mode")
    table.add_column(f"{primary} *", justify="right")
    table.add_column("output SQNR (dB)", justify="right")
    for mode, sqnr in report.modes.items():
        value = metrics.get(mode, {}).get(primary, float("nan"))
        table.add_row(mode, f"{value:.4f}", _db(sqnr))
    return table


def sensitivity_table(report: AnalysisReport, top: int) -> Table:
    table = Table(
        title=f"most sensitive quantizers (top {top} of {len(report.quantizers)})",
        title_justify="left",
    )
    for column in (
        "quantizer",
        "kind",
        "bits",
        "gain if float (dB)",
        "only this (dB)",
        "SQNR (dB)",
    ):
        if column == "quantizer":  # long names wrap instead of being cut: they are the answer
            table.add_column(column, overflow="fold", min_width=32)
        else:
            table.add_column(column, justify="left" if column == "kind" else "right")
    for q in report.most_sensitive(top):
        table.add_row(
            q.name, q.kind, str(q.bits), _db(q.gain_db), _db(q.only_this_db), _db(q.sqnr_db)
        )
    return table


def write_plots(report: AnalysisReport, folder: Path, top: int) -> list[Path]:
    """``sensitivity.png``, ``sqnr.png`` and ``histograms.png`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    chosen = report.most_sensitive(top)
    labels = [_short(q.name) for q in chosen]

    figure, axis = plt.subplots(figsize=(9, 0.35 * len(chosen) + 1.5))
    axis.barh(labels[::-1], [q.gain_db for q in chosen][::-1], color="tab:red")
    axis.set_xlabel("output SQNR gained by keeping the quantizer in float (dB)")
    axis.set_title("per-quantizer sensitivity (all but one)")
    written.append(_save(figure, folder / "sensitivity.png"))

    ordered = sorted(report.quantizers, key=lambda q: q.name)
    figure, axis = plt.subplots(figsize=(max(8, 0.12 * len(ordered)), 4))
    colors = ["tab:blue" if q.kind == "weight" else "tab:orange" for q in ordered]
    values = [min(q.sqnr_db, 80.0) for q in ordered]
    axis.bar(range(len(ordered)), values, color=colors)
    axis.set_ylabel("SQNR (dB)")
    axis.set_xlabel("quantizers (blue: weights, orange: activations), by name")
    axis.set_title("per-quantizer SQNR of the quantized tensor vs its input")
    written.append(_save(figure, folder / "sqnr.png"))

    columns = 3
    rows = max(1, math.ceil(len(chosen) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(12, 2.8 * rows), squeeze=False)
    for axis, q in zip(axes.flat, chosen, strict=False):
        values = report.histograms.get(q.name)
        if values is not None:
            axis.hist(values.float().numpy(), bins=80, color="tab:gray", log=True)
        for limit in (q.grid_min, q.grid_max):
            axis.axvline(limit, color="tab:red", linestyle="--", linewidth=1)
        axis.set_title(_short(q.name), fontsize=8)
    for axis in list(axes.flat)[len(chosen) :]:
        axis.axis("off")
    figure.suptitle("values seen by the most sensitive quantizers; red: grid limits")
    written.append(_save(figure, folder / "histograms.png"))
    return written


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(
    report: AnalysisReport,
    metrics: dict[str, dict[str, float]],
    primary: str,
    title: str,
    folder: Path,
    plots: list[Path],
) -> Path:
    """``index.html``: the modes, every quantizer's numbers, and the plots."""
    modes = [
        [mode, f"{metrics.get(mode, {}).get(primary, float('nan')):.4f}", _db(sqnr)]
        for mode, sqnr in report.modes.items()
    ]
    quantizers = [_row(q) for q in report.quantizers]
    images = "".join(f'<p><img src="{p.name}" alt="{p.stem}"></p>' for p in plots)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Quantization modes</h2>
{_html_table(["mode", primary, "output SQNR (dB)"], modes)}
<h2>Plots</h2>{images}
<h2>Quantizers, most sensitive first</h2>
{
        _html_table(
            [
                "quantizer",
                "kind",
                "bits",
                "gain if float (dB)",
                "only this (dB)",
                "SQNR (dB)",
                "grid min",
                "grid max",
                "observed min",
                "observed max",
            ],
            quantizers,
        )
    }
</body></html>
"""
    path = folder / "index.html"
    path.write_text(page)
    return path


def _row(q: QuantizerAnalysis) -> list[str]:
    return [
        q.name,
        q.kind,
        str(q.bits),
        _db(q.gain_db),
        _db(q.only_this_db),
        _db(q.sqnr_db),
        f"{q.grid_min:.4g}",
        f"{q.grid_max:.4g}",
        f"{q.observed_min:.4g}",
        f"{q.observed_max:.4g}",
    ]


def print_analysis(
    metrics: dict[str, dict[str, float]],
    report: AnalysisReport,
    primary: str,
    top: int,
    console: Console | None = None,
) -> None:
    console = console or Console()
    console.print(modes_table(metrics, report, primary))
    console.print(sensitivity_table(report, top))
