"""The white paper's standard PTQ pipeline (Fig. 8) as ``--recipe wp-ptq``."""

import json

import torch
from typer.testing import CliRunner

import qpp
from qpp.cli import app
from qpp.ptq.recipes import WhitePaperRecipe, has_depthwise, white_paper_ptq
from qpp.sim.config import QuantConfig

W4A8 = QuantConfig(weight_bits=4, activation_bits=8)


def test_recipe_beats_round_to_nearest_at_w4a8(depthwise_net, images) -> None:
    reference = qpp.run(depthwise_net, images)
    nearest = qpp.quantize(depthwise_net, images, W4A8)
    qmodel = qpp.prepare(depthwise_net, images[0], W4A8)
    assert has_depthwise(qmodel)
    report = white_paper_ptq(qmodel, images, WhitePaperRecipe(adaround_iterations=300))
    assert list(report.steps) == ["cle", "weight_ranges", "adaround", "activation_ranges"]
    assert all(q.calibrated for q in qmodel.select(kind="activation"))
    for quantizer in qmodel.select(kind="weight"):
        weight = qmodel.weight(quantizer.name)
        assert torch.equal(quantizer(weight), weight)

    def error(model: torch.nn.Module) -> float:
        return float((qpp.run(model, images) - reference).pow(2).mean())

    assert error(qmodel) < 0.7 * error(nearest), (error(qmodel), error(nearest))


def test_without_adaround_the_recipe_corrects_biases(depthwise_net, images) -> None:
    qmodel = qpp.prepare(depthwise_net, images[0], W4A8)
    report = white_paper_ptq(qmodel, images, WhitePaperRecipe(adaround_iterations=0, cle=False))
    assert list(report.steps) == ["weight_ranges", "bias_correction", "activation_ranges"]
    assert report.steps["bias_correction"]["mode"] == "empirical"
    assert len(report.steps["bias_correction"]["corrected"]) == 6


def test_cli_recipe_run_reproduces_with_eval(tmp_path) -> None:
    runner = CliRunner()
    folder = tmp_path / "run"
    args = ["quantize", "digits-cnn", "--weights", "4", "--recipe", "wp-ptq"]
    result = runner.invoke(
        app, [*args, "--adaround-iterations", "50", "--json", "--out", str(folder)]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout)
    assert saved["config"]["recipe"] == "wp-ptq"
    assert set(saved["recipe"]["steps"]) == {"weight_ranges", "adaround", "activation_ranges"}
    again = runner.invoke(app, ["eval", str(folder), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["reproduced"] is True
    bad = runner.invoke(app, [*args[:2], "--recipe", "magic"])
    assert bad.exit_code == 2 and "unknown recipe 'magic'" in bad.stderr


def test_recipe_defaults_to_1000_adaround_iterations_and_adaround_alone_to_10k() -> None:
    from qpp.ptq.adaround import AdaRoundConfig
    from qpp.sim.config import RECIPE_ADAROUND_ITERATIONS

    assert RECIPE_ADAROUND_ITERATIONS == 1000
    assert WhitePaperRecipe().adaround_iterations == RECIPE_ADAROUND_ITERATIONS
    assert QuantConfig().adaround_iterations == RECIPE_ADAROUND_ITERATIONS
    assert AdaRoundConfig().iterations == 10_000
    help_text = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"}).output
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "--adaround-iterations" in line)
    # The option's help may wrap onto the lines before the next option's.
    end = next(i for i in range(start + 1, len(lines)) if "│ --" in lines[i])
    entry = " ".join(line.strip("│ ") for line in lines[start:end])
    assert "[default: 1000]" in entry, entry
