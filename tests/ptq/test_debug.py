"""``qpp analyze``: the debugging flow of white paper Fig. 9."""

import json
import math

import torch
from typer.testing import CliRunner

import qpp
from qpp.cli import app
from qpp.ptq.debug import analyze, sqnr_db
from qpp.sim.config import LayerOverride, QuantConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_sqnr() -> None:
    x = torch.ones(100)
    assert math.isinf(sqnr_db(x, x))
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < 1e-4


def test_analysis_finds_the_quantizer_made_coarse(depthwise_net, images) -> None:
    # One 2-bit weight among 8-bit ones must come out as the most sensitive quantizer.
    config = QuantConfig(overrides={"conv3.weight": LayerOverride(bits=2)})
    qmodel = qpp.quantize(depthwise_net, images, config)
    report = analyze(qmodel, images[:1])
    assert math.isinf(report.modes["fp32 (all quantizers off)"])
    assert report.modes["weights and activations"] < report.modes["activations only"]
    assert report.quantizers[0].name == "conv3.weight"
    assert report.quantizers[0].gain_db > 3
    assert report.quantizers[0].sqnr_db == min(q.sqnr_db for q in report.quantizers)


def test_cli_analyze_writes_table_plots_and_html(tmp_path) -> None:
    folder = tmp_path / "analysis"
    args = ["analyze", "digits-cnn", "--weights", "4", "--samples", "16", "--out", str(folder)]
    result = CliRunner().invoke(app, [*args, "--top", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "most sensitive quantizers (top 5 of 14)" in result.stdout
    saved = json.loads((folder / "analysis.json").read_text())
    assert len(saved["most_sensitive"]) == 5
    assert saved["metrics"]["fp32 (all quantizers off)"]["top1"] > 90
    for name in ("sensitivity.png", "sqnr.png", "histograms.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
    page = (folder / "index.html").read_text()
    assert all(f'src="{n}"' in page for n in ("sensitivity.png", "sqnr.png", "histograms.png"))
    assert saved["most_sensitive"][0] in page
