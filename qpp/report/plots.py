"""PNG plots for run folders (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(names: list[str], most: int) -> list[str]:
    """At most ``most`` names, evenly spaced through the list (first and last kept)."""
    if len(names) <= most:
        return names
    step = (len(names) - 1) / (most - 1)
    return [names[round(i * step)] for i in range(most)]


def plot_predicted_vs_dynamic(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: Path,
    exact_label: str = "dynamic (exact) QP",
    most: int = 12,
) -> Path:
    """One log-log scatter per layer: the predicted QP of each input against the exact
    per-input value it predicts (``exact_label``; the diagonal is a perfect predictor)."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    names = _spread(list(pairs), most)
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        predicted, exact = (t.float().clamp(min=1e-12).numpy() for t in pairs[name])
        axis.scatter(exact, predicted, s=4, alpha=0.5)
        low, high = min(exact.min(), predicted.min()), max(exact.max(), predicted.max())
        axis.plot([low, high], [low, high], color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_yscale("log")
        # Three labelled ticks spread over the data: a layer's QPs often span less than a
        # decade, where log axes would show no label at all (and minor labels overlap).
        bottom, top = max(float(low), 1e-12), max(float(high), 1e-12)
        ticks = sorted({bottom * (top / bottom) ** (k / 2) for k in range(3)})
        labels = [f"{tick:.2g}" for tick in ticks]
        for scale_axis in (axis.xaxis, axis.yaxis):
            scale_axis.set_minor_formatter(NullFormatter())
            scale_axis.set_ticks(ticks, labels)
        axis.set_title(name if len(name) < 40 else "…" + name[-39:], fontsize=7)
        axis.tick_params(labelsize=6)
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    figure.supxlabel(exact_label)
    figure.supylabel("predicted QP")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_density_histograms(densities: dict[str, torch.Tensor], target: float, path: Path) -> Path:
    """Histograms of the achieved outlier fraction per input and layer, one per mode."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.0, 3.6))
    values = {mode: v.float().numpy() for mode, v in densities.items() if v.numel()}
    high = max(float(v.max()) for v in values.values())
    bins = [high * i / 60 for i in range(61)] if high > 0 else 10
    for mode, v in values.items():
        axis.hist(v, bins=bins, alpha=0.5, label=f"{mode} (std {v.std():.4f})")
    axis.axvline(target, color="black", linewidth=0.8, label=f"target ρ = {target}")
    axis.set_xlabel("outlier fraction of one input in one layer")
    axis.set_ylabel("count")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
