import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvquant_vllm.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


def test_unknown_method(capsys, tmp_path):
    code, out = _run(capsys, "eval", "ppl", "--model", str(tmp_path), "--text", "pydoc", "--methods", "int4-token,q7")
    assert code == 2
    assert "unknown KV cache method 'q7'" in out.err and "int3-token" in out.err


def test_missing_model(capsys, tmp_path):
    code, out = _run(capsys, "eval", "ppl", "--model", str(tmp_path / "none"), "--text", "pydoc", "--methods", "int4-token")
    assert code == 2
    assert "not found" in out.err and "prepare-model" in out.err


def test_empty_text(capsys, tmp_path, smollm2_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, out = _run(capsys, "eval", "ppl", "--model", str(smollm2_dir), "--text-file", str(empty), "--methods", "int4-token")
    assert code == 2 and "is empty" in out.err


def test_text_and_text_file_are_exclusive(tmp_path):
    with pytest.raises(SystemExit):
        main(["eval", "ppl", "--model", "x", "--text", "pydoc", "--text-file", "y", "--methods", "fp16"])


def test_calibrate_takes_bits_or_a_method(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["calibrate", "x", "--bits", "3", "--method", "cq2", "--text", "pydoc"])
    with pytest.raises(SystemExit):
        main(["calibrate", "x", "--text", "pydoc"])
    code, out = _run(capsys, "calibrate", str(tmp_path), "--method", "kivi2", "--text", "pydoc")
    assert code == 2 and "method 'kivi2' needs no calibration" in out.err


def test_eval_ppl_end_to_end(tmp_path, smollm2_dir):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "kvquant_vllm.cli", "eval", "ppl", "--model", "smollm2-135m", "--text", "pydoc:test",
           "--methods", "int4-token,int3-token", "--seq-len", "128", "--max-windows", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| int3-token | 3.50 |" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["fp16", "int4-token", "int3-token"]
    assert report["windows"] == 2 and report["seq_len"] == 128
    fp16, int4, int3 = (r["ppl"] for r in report["results"])
    assert fp16 < int4 < int3
    assert all(r["tokens"] == 2 * 127 for r in report["results"])


def test_kvquant_method_without_calibration(capsys, smollm2_dir):
    code, out = _run(capsys, "eval", "ppl", "--model", str(smollm2_dir), "--text", "pydoc", "--methods", "kvquant3")
    assert code == 2
    assert "need --calibration PATH" in out.err and "kvquant-vllm calibrate" in out.err


def test_calibration_job_config(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "calibration"
    spec = importlib.util.spec_from_file_location("calibration_job", root / "run.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    load_config = job.load_config
    for config in (root / "configs").glob("*.yaml"):
        assert load_config(config)["bits"] in (2, 3, 4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nbits: 3\nbitz: 4\n")
    with pytest.raises(ValueError, match="unknown keys \\['bitz'\\]"):
        load_config(bad)


def test_calibrate_then_eval(tmp_path, smollm2_dir):
    """The documented flow on the real model, small: calibrate (Ray, 2 workers), then evaluate kvquant3."""
    cal = tmp_path / "cal.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "kvquant_vllm.cli", "calibrate", "smollm2-135m", "--bits", "3", "--text", "pydoc:train",
         "--samples", "1", "--seq-len", "128", "--num-workers", "2", "--out", str(cal)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "kvquant_vllm.cli", "eval", "ppl", "--model", "smollm2-135m", "--text", "pydoc:test",
         "--methods", "kvquant3,kvquant3-uniform,kivi2", "--calibration", str(cal), "--seq-len", "128",
         "--max-windows", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| kvquant3 |" in proc.stdout and "| kvquant3-uniform |" in proc.stdout and "| kivi2 |" in proc.stdout
