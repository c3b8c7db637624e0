"""``qpp analyze``: quantize a model, then run the debugging flow and write its report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qpp.api import calibrate, limit_samples, prepare, run
from qpp.data import check_batches
from qpp.ptq.debug import AnalysisConfig, AnalysisReport, analyze, enabled_only, mode_quantizers
from qpp.ptq.recipes import run_recipe
from qpp.report.analysis import write_html, write_plots
from qpp.runs import prepare_output, remove_unused_output
from qpp.sim.config import QuantConfig
from qpp.sources import SourceSpec, resolve_source


def analyze_job(
    source: SourceSpec,
    config: QuantConfig,
    folder: Path,
    samples: int = 32,
    top: int = 12,
    force: bool = False,
    show_progress: bool = True,
) -> tuple[dict[str, Any], AnalysisReport]:
    """Quantize ``source`` (plain calibration or ``config.recipe``), evaluate the four modes
    of the debugging flow with the task metric, measure per-quantizer sensitivity on
    ``samples`` evaluation samples, and write ``index.html``, PNG plots and ``analysis.json``
    into ``folder``."""
    started = time.perf_counter()
    created = prepare_output(folder, force)
    try:
        entry = resolve_source(source)
        fp32 = entry.load_model()
        batches = limit_samples(
            check_batches(entry.calibration_set(), "calibration"), config.calibration_samples
        )
        qmodel = prepare(fp32, batches[0], config)
        if config.recipe is None:
            calibrate(qmodel, batches, show_progress)
        else:
            run_recipe(config.recipe, qmodel, batches, config.adaround_iterations, show_progress)
        evaluation = entry.evaluation_set()
        reference = run(fp32, evaluation.batches, "fp32", show_progress)
        metrics = {}
        for mode, chosen in mode_quantizers(qmodel).items():
            with enabled_only(qmodel, chosen):
                outputs = run(qmodel, evaluation.batches, mode, show_progress)
            metrics[mode] = entry.metrics(outputs, reference, evaluation)
        subset = limit_samples(list(evaluation.batches), samples)
        report = analyze(qmodel, subset, AnalysisConfig(), show_progress)
    except BaseException:
        if created is not None:
            remove_unused_output(folder, created)
        raise
    plots = write_plots(report, folder, top)
    title = f"qpp analyze {source.model}: W{config.weight_bits}A{config.activation_bits}"
    write_html(report, metrics, entry.primary_metric, title, folder, plots)
    result = {
        "model": source.model,
        "config": config.to_dict(),
        "primary_metric": entry.primary_metric,
        "metrics": metrics,
        "output_sqnr_db": report.modes,
        "quantizers": [asdict(q) for q in report.quantizers],
        "most_sensitive": [q.name for q in report.most_sensitive(top)],
        "files": [p.name for p in plots] + ["index.html", "analysis.json"],
        "output_dir": str(folder),
        "seconds": round(time.perf_counter() - started, 3),
    }
    (folder / "analysis.json").write_text(json.dumps(result, indent=1, default=str))
    return result, report
