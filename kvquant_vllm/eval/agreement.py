"""Greedy agreement: how often a quantized KV cache keeps the model's own chat answers.

The unquantized model answers each chat prompt greedily (its 16-bit answers). Each answer is then teacher-forced
through the model with the KV cache passed through a method's codec (:mod:`kvquant_vllm.eval.fakequant`), and two
numbers are kept per method: the fraction of answer tokens whose argmax is the 16-bit answer's token
(``agreement``), and the perplexity of the answers against the unquantized run's (``ppl_delta``). Prompts and
answers are what users see, so this measures quality where they look, with no outside data.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvquant_vllm.chat import chat_prompts, prompt_ids
from kvquant_vllm.eval.fakequant import fake_quantized
from kvquant_vllm.quant.codec import KVCodec
from kvquant_vllm.quant.geometry import attention_geometry
from kvquant_vllm.quant.kvquant import KVQuantCalibration
from kvquant_vllm.quant.registry import get_codec

DEFAULT_MAX_NEW_TOKENS = 48


@dataclass
class ChatAnswer:
    prompt: list[int]  # token ids of the prompt in the chat template
    answer: list[int]  # the unquantized model's greedy answer, its end-of-turn token included if reached


@dataclass
class AgreementResult:
    method: str
    bits_per_element: float
    agreement: float  # fraction of answer tokens whose argmax is the 16-bit answer's token
    ppl: float  # perplexity of the answer tokens
    ppl_delta: float  # ppl - the unquantized run's
    answer_tokens: int


@torch.inference_mode()
def greedy_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[ChatAnswer]:
    """The unquantized model's greedy answers to one-turn chat ``prompts``."""
    answers = []
    for prompt in tqdm(prompts, desc="16-bit answers"):
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answers.append(ChatAnswer(ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    return answers


@torch.inference_mode()
def teacher_forced(model: torch.nn.Module, answers: Sequence[ChatAnswer], codec: KVCodec) -> tuple[int, float, int]:
    """(answer tokens predicted as the 16-bit argmax, their summed NLL, answer tokens) with the cache through
    ``codec``: each prompt + answer in one forward, predictions of the answer tokens scored."""
    agree, nll, count = 0, 0.0, 0
    with fake_quantized(model, codec):
        for a in tqdm(answers, desc=codec.name, leave=False):
            ids = torch.tensor([a.prompt + a.answer])
            logits = model(ids).logits[0, len(a.prompt) - 1 : -1].float()  # predicts answer[i] at row i
            target = torch.tensor(a.answer)
            agree += int((logits.argmax(-1) == target).sum())
            nll += F.cross_entropy(logits, target, reduction="sum").double().item()
            count += len(a.answer)
    return agree, nll, count


def evaluate_agreement(
    model: torch.nn.Module, answers: Sequence[ChatAnswer], methods: Sequence[str],
    calibrations: Sequence[KVQuantCalibration] = (),
) -> list[AgreementResult]:
    """Agreement and answer perplexity of every method; the unquantized run (agreement 1 by construction) first."""
    geometry = attention_geometry(model.config)
    codecs = [get_codec(m, calibrations, geometry) for m in dict.fromkeys(["fp16", *methods])]
    mean_len = round(sum(len(a.prompt) + len(a.answer) for a in answers) / max(len(answers), 1))
    results: list[AgreementResult] = []
    for codec in tqdm(codecs, desc="methods"):
        agree, nll, count = teacher_forced(model, answers, codec)
        ppl = math.exp(nll / count)
        base = results[0].ppl if results else ppl
        results.append(AgreementResult(codec.name, codec.bits_per_element(geometry.head_dim, mean_len),
                                       agree / count, ppl, ppl - base, count))
    return results


@dataclass
class AgreementReport:
    model: str
    prompts: str  # where the prompts came from
    max_new_tokens: int
    num_prompts: int
    results: list[AgreementResult] = field(default_factory=list)

    def describe(self) -> str:
        return (f"model {self.model}: {self.num_prompts} chat prompts ({self.prompts}), greedy 16-bit answers of up "
                f"to {self.max_new_tokens} tokens teacher-forced through each method")

    def table(self) -> str:
        lines = ["| method | bits/elem | agreement | answer ppl | delta vs fp16 | answer tokens |",
                 "|---|---:|---:|---:|---:|---:|"]
        for r in self.results:
            lines.append(f"| {r.method} | {r.bits_per_element:.2f} | {100 * r.agreement:.1f} % | {r.ppl:.3f} "
                         f"| {r.ppl_delta:+.3f} | {r.answer_tokens} |")
        return "\n".join(lines)

    def to_json(self, command: str) -> str:
        payload = {k: v for k, v in asdict(self).items() if k != "results"}
        payload["command"] = command
        payload["results"] = [asdict(r) for r in self.results]
        return json.dumps(payload, indent=2) + "\n"


def read_prompts(path: str | Path) -> list[str]:
    """One user prompt per non-empty line of a UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt (one per line)")
    return prompts


def run_agreement(
    model: str, methods: Sequence[str], prompts_file: str | Path | None = None,
    calibration_files: Sequence[str | Path] = (), max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompts: int | None = None,
) -> AgreementReport:
    """Resolve the model, answer the prompts (the built-in set by default) and evaluate every method."""
    from kvquant_vllm.calib.file import read_calibration
    from kvquant_vllm.eval.perplexity import check_methods, load_eval_model
    from kvquant_vllm.models import resolve_model

    check_methods(methods, calibration_files)
    prompts = read_prompts(prompts_file) if prompts_file else chat_prompts("test")
    prompts = prompts[:max_prompts]
    hf_model, tokenizer = load_eval_model(resolve_model(model))
    calibrations = [read_calibration(f, attention_geometry(hf_model.config)) for f in calibration_files]
    answers = greedy_answers(hf_model, tokenizer, prompts, max_new_tokens)
    results = evaluate_agreement(hf_model, answers, methods, calibrations)
    source = str(prompts_file) if prompts_file else "built-in: pydoc test topics and the demo's questions"
    return AgreementReport(model, source, max_new_tokens, len(prompts), results)
