"""Lookup tables: constant lookups absorbed exactly, per-row asymmetric grids, export."""

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

import qpp
from qpp.export.onnx import export_onnx
from qpp.export.ort import make_session, run_session
from qpp.graph.hf_import import HFEncoder
from qpp.graph.patterns import lookup_sums, lookups
from qpp.ptq.lookups import LookupConfig, quantize_lookups
from qpp.sim.config import QuantConfig

W4 = QuantConfig(weight_bits=4, activation_bits=8)
TABLES = "model.embeddings.{}_embeddings.weight"


@pytest.fixture(scope="module")
def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=16,
    )  # fmt: skip
    model = BertModel(config).eval()
    with torch.no_grad():  # a token-type row far from zero, as in trained models
        model.embeddings.token_type_embeddings.weight.add_(0.3)
    return HFEncoder(model).eval()


@pytest.fixture(scope="module")
def tokens() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 99, (4, 12), generator=generator)
        mask = torch.ones(4, 12, dtype=torch.int64)
        mask[1, 7:] = 0
        ids[mask == 0] = 0
        batches.append((ids, mask))
    return batches


def _table(qmodel: qpp.QuantizedModel, kind: str) -> torch.Tensor:
    return qmodel.weight(TABLES.format(kind))


def test_the_sum_of_word_token_type_and_position_lookups_is_found(tiny_bert, tokens) -> None:
    qmodel = qpp.prepare(tiny_bert, tokens[0], W4)
    (group,) = lookup_sums(qmodel.graph_module)
    dependent = {lookup.table: lookup.input_dependent for lookup in group.lookups}
    assert dependent == {
        TABLES.format("word"): True,
        TABLES.format("token_type"): False,
        TABLES.format("position"): False,
    }
    assert len(lookups(qmodel.graph_module)) == 3


def test_absorbing_the_token_type_row_keeps_fp32_outputs_exactly(tiny_bert, tokens) -> None:
    qmodel = qpp.prepare(tiny_bert, tokens[0], W4)
    qmodel.set_enabled(False)
    before = qpp.run(qmodel, tokens)
    word = _table(qmodel, "word").clone()
    row = _table(qmodel, "token_type")[0].clone()
    report = quantize_lookups(qmodel, tokens)
    assert report.absorbed == {TABLES.format("token_type"): TABLES.format("word")}
    assert torch.equal(_table(qmodel, "word"), word + row)
    assert torch.count_nonzero(_table(qmodel, "token_type")[0]) == 0
    assert torch.equal(qpp.run(qmodel, tokens), before)


def test_per_row_asymmetric_grids_fit_tables_better_than_symmetric(tiny_bert, tokens) -> None:
    def table_error(config: LookupConfig | None) -> float:
        qmodel = qpp.prepare(tiny_bert, tokens[0], W4)
        if config is not None:
            report = quantize_lookups(qmodel, tokens, config)
            assert len(report.per_row) == 3
        qmodel.compute_weight_encodings()
        quantizer = qmodel.quantizer(TABLES.format("word"))
        table = _table(qmodel, "word")
        assert quantizer.scale.shape == (table.shape[0],)
        if config is not None:
            assert not quantizer.spec.symmetric
        with torch.no_grad():
            return float((quantizer(table) - table).pow(2).mean())

    symmetric = table_error(None)
    asymmetric = table_error(LookupConfig(absorb_constant=False))
    assert asymmetric < 0.9 * symmetric, (asymmetric, symmetric)


def test_a_varying_constant_lookup_is_not_absorbed(tiny_bert, tokens) -> None:
    qmodel = qpp.prepare(tiny_bert, tokens[0], W4)
    positions = _table(qmodel, "position").clone()
    report = quantize_lookups(qmodel, tokens)
    assert TABLES.format("position") not in report.absorbed
    assert torch.equal(_table(qmodel, "position"), positions)


def test_per_row_tables_export_and_ort_matches_the_simulation(
    tiny_bert, tokens, tmp_path: Path
) -> None:
    qmodel = qpp.prepare(tiny_bert, tokens[0], W4)
    quantize_lookups(qmodel, tokens)
    qpp.calibrate(qmodel, tokens)
    path = tmp_path / "bert.onnx"
    export_onnx(qmodel, tokens[0], path)
    simulated = qpp.run(qmodel, tokens)
    deployed = run_session(make_session(path), tokens)[0]
    cosine = torch.cosine_similarity(
        torch.as_tensor(deployed).reshape(simulated.shape), simulated, dim=-1
    )
    assert float(cosine.min()) > 0.999, float(cosine.min())
