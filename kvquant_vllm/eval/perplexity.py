"""Perplexity over non-overlapping windows, with the KV cache passed through a codec."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvquant_vllm.eval.fakequant import fake_quantized
from kvquant_vllm.quant.geometry import attention_geometry
from kvquant_vllm.quant.codec import KVCodec
from kvquant_vllm.quant.kvquant import KVQuantCalibration
from kvquant_vllm.quant.registry import MissingCalibrationError, check_method, get_codec, needs_calibration


@dataclass
class PplResult:
    method: str
    bits_per_element: float
    ppl: float
    delta: float  # ppl - ppl of the unquantized run of the same invocation
    tokens: int  # predicted tokens
    windows: int

    def as_dict(self) -> dict:
        return asdict(self)


def make_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Split token ids [n] into non-overlapping windows [num_windows, seq_len]; the tail is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.inference_mode()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, codec: KVCodec, desc: str = "") -> tuple[float, int]:
    """Summed negative log-likelihood (float64) and count of predicted tokens over ``windows``."""
    total, count = 0.0, 0
    with fake_quantized(model, codec):
        for w in tqdm(windows, desc=desc or codec.name, leave=False):
            logits = model(w[None]).logits[0, :-1].float()
            total += F.cross_entropy(logits, w[1:], reduction="sum").double().item()
            count += w.numel() - 1
    return total, count


def evaluate_methods(
    model: torch.nn.Module,
    windows: torch.Tensor,
    methods: list[str],
    calibrations: Sequence[KVQuantCalibration] = (),
) -> list[PplResult]:
    """Perplexity of every method on the same windows; the unquantized run is always first."""
    # Build every codec before running any, so a bad name or a missing calibration fails at once.
    geometry = attention_geometry(model.config)
    codecs = [get_codec(m, calibrations, geometry) for m in dict.fromkeys(["fp16", *methods])]
    seq_len = windows.shape[1]
    results: list[PplResult] = []
    for codec in tqdm(codecs, desc="methods"):
        nll, count = window_nll(model, windows, codec)
        ppl = math.exp(nll / count)
        base = results[0].ppl if results else ppl
        bits = codec.bits_per_element(geometry.head_dim, seq_len)
        results.append(PplResult(codec.name, bits, ppl, ppl - base, count, windows.shape[0]))
    return results


def load_eval_model(model_dir: str | Path) -> tuple[torch.nn.Module, object]:
    """A Hugging Face causal LM in float32 on CPU (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    attention_geometry(model.config)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [n] int64 of ``text``, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def format_table(results: list[PplResult]) -> str:
    """A markdown table: method, bits per element, perplexity, delta, tokens."""
    lines = [
        "| method | bits/elem | ppl | delta vs fp16 | tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.method} | {r.bits_per_element:.2f} | {r.ppl:.3f} | {r.delta:+.3f} | {r.tokens} |")
    return "\n".join(lines)


@dataclass
class PplReport:
    """One invocation's results with what is needed to reproduce them."""

    model: str
    text: str
    seq_len: int
    windows: int
    results: list[PplResult] = field(default_factory=list)

    def describe(self) -> str:
        return f"model {self.model}, text {self.text}: {self.windows} windows x {self.seq_len} tokens"

    def to_json(self, command: str) -> str:
        payload = {k: v for k, v in asdict(self).items() if k != "results"}
        payload["command"] = command
        payload["results"] = [r.as_dict() for r in self.results]
        return json.dumps(payload, indent=2) + "\n"


def check_methods(methods: Sequence[str], calibration_files: Sequence[str | Path]) -> None:
    """Fail before any model loads on an unknown method, or on calibrated methods without a calibration file."""
    for m in methods:
        check_method(m)
    if any(needs_calibration(m) for m in methods) and not calibration_files:
        raise MissingCalibrationError(
            "calibrated methods need --calibration PATH; make one with "
            "`kvquant-vllm calibrate MODEL (--bits B | --method NAME) --out PATH`"
        )


def run_ppl(
    model: str,
    methods: list[str],
    seq_len: int = 2048,
    max_windows: int | None = None,
    text: str | None = None,
    text_file: str | None = None,
    calibration_files: Sequence[str | Path] = (),
) -> PplReport:
    """Resolve the model, load the text, and evaluate every method (plus fp16) on the same windows.

    Calibrated methods need ``calibration_files`` (no calibration on the fly: it would hide which
    text the tables came from).
    """
    from kvquant_vllm.calib.file import read_calibration
    from kvquant_vllm.data import load_text
    from kvquant_vllm.models import resolve_model

    check_methods(methods, calibration_files)
    model_dir = resolve_model(model)
    corpus = load_text(text, text_file)
    hf_model, tokenizer = load_eval_model(model_dir)
    geometry = attention_geometry(hf_model.config)
    calibrations = [read_calibration(f, geometry) for f in calibration_files]
    windows = make_windows(tokenize(tokenizer, corpus), seq_len, max_windows)
    results = evaluate_methods(hf_model, windows, methods, calibrations)
    return PplReport(model, text or str(text_file), seq_len, windows.shape[0], results)
