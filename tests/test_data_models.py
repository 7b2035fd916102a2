import os

import pytest

from kvquant_vllm.data import TextSourceError, load_text, parse_source
from kvquant_vllm.fsutil import atomic_path
from kvquant_vllm.models import prepare_model, resolve_model


def test_pydoc_source_and_splits():
    full = load_text("pydoc")
    train, test = load_text("pydoc:train"), load_text("pydoc:test")
    assert len(full) > 300_000
    assert "The \"if\" statement" in full or "if_stmt" in full
    assert train and test and full.startswith(train) and full.endswith(test)
    assert len(train) + len(test) + 2 == len(full)
    assert load_text("pydoc:validation") == test


def test_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world")
    assert load_text(text_file=f) == "hello world"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TextSourceError, match="is empty"):
        load_text(text_file=tmp_path / "empty.txt")
    with pytest.raises(TextSourceError, match="does not exist"):
        load_text(text_file=tmp_path / "missing.txt")
    with pytest.raises(TextSourceError, match="exactly one"):
        load_text("pydoc", f)


def test_unknown_sources():
    with pytest.raises(TextSourceError, match="unknown text source 'books'.*pydoc"):
        parse_source("books")
    with pytest.raises(TextSourceError, match="unknown split 'dev'"):
        parse_source("pydoc:dev")


def test_hub_source_unreachable_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TextSourceError, match="could not be loaded.*--text pydoc"):
        load_text("wikitext2:test")


def test_prepared_model(smollm2_dir):
    import json

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)
    assert "quantization_config" not in config
    assert (smollm2_dir / "tokenizer.json").is_file()
    # Idempotent: a second call finds the directory and rewrites nothing.
    before = os.stat(smollm2_dir / "model.safetensors").st_mtime_ns
    assert prepare_model("smollm2-135m") == smollm2_dir
    assert os.stat(smollm2_dir / "model.safetensors").st_mtime_ns == before
    assert resolve_model("smollm2-135m") == smollm2_dir
    assert resolve_model(str(smollm2_dir)) == smollm2_dir


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*prepare-model smollm2-135m"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="needs config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown bundled model"):
        prepare_model("llama-7b")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_path(dest, directory=True) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest, directory=True) as tmp:
        (tmp / "done").write_text("x")
    assert [p.name for p in dest.iterdir()] == ["done"]
