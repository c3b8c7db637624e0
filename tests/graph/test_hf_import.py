"""Loading Hugging Face folders: the positional wrapper, and one clear error per broken folder."""

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from qpp.errors import ModelLoadError
from qpp.graph.hf_import import HFEncoder, load_hf_folder, looks_like_hf_folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialized BERT written by save_pretrained."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).eval().save_pretrained(folder)
    return folder


def test_wrapper_returns_last_hidden_state(bert_folder: Path) -> None:
    model = load_hf_folder(bert_folder)
    assert isinstance(model, HFEncoder)
    assert not model.training

    input_ids = torch.randint(0, 99, (3, 7))
    attention_mask = torch.ones(3, 7, dtype=torch.int64)
    attention_mask[1, 4:] = 0
    with torch.no_grad():
        hidden = model(input_ids, attention_mask)
        expected = BertModel.from_pretrained(bert_folder).eval()(
            input_ids=input_ids, attention_mask=attention_mask
        )
    assert isinstance(hidden, torch.Tensor)
    assert hidden.shape == (3, 7, 32)
    torch.testing.assert_close(hidden, expected.last_hidden_state)


def test_looks_like_hf_folder(bert_folder: Path, tmp_path: Path) -> None:
    assert looks_like_hf_folder(bert_folder)
    assert looks_like_hf_folder(str(bert_folder))
    assert not looks_like_hf_folder(tmp_path)
    assert not looks_like_hf_folder(tmp_path / "missing")
    assert not looks_like_hf_folder(bert_folder / "config.json")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf_folder(tmp_path / "missing")


def test_file_instead_of_folder(bert_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder"):
        load_hf_folder(bert_folder / "config.json")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_hf_folder(tmp_path)


def test_folder_without_weights(bert_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((bert_folder / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_hf_folder(tmp_path)


def test_corrupt_weights(bert_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((bert_folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_hf_folder(tmp_path)


def test_weights_of_another_model(bert_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(bert_folder / "model.safetensors")
    kept = {name: tensor for name, tensor in state.items() if "layer.1." not in name}
    (tmp_path / "config.json").write_text((bert_folder / "config.json").read_text())
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lack"):
        load_hf_folder(tmp_path)
