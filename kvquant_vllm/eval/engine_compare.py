"""Comparing two vLLM engines that should compute the same model (say, one rank and several): prompt logprobs and
argmax tokens of the same windows, and where their greedy continuations part.

A quantized cache makes the model chaotic: rounding differences flip a few codes, and greedy decoding then follows
another near-tied token and continues differently from there. So a continuation that differs is read with the
step at which it parts and how close the tie was there, and the teacher-forced argmax on a text (each position's
greedy token given the text so far) is compared position by position.
"""

from __future__ import annotations

import math

import torch


def prompt_nll_and_argmax(llm, windows: torch.Tensor) -> tuple[float, int, list[int]]:
    """Summed negative log-likelihood and count of the predicted tokens of ``windows`` [n, seq_len] (each window one
    prompt, prompt logprobs), and the engine's argmax token at each of those positions, windows in order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in windows], params, use_tqdm=False)
    nll, argmax = 0.0, []
    for window, out in zip(windows.tolist(), outs):
        for token, logprobs in zip(window[1:], out.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            argmax.append(next(t for t, lp in logprobs.items() if lp.rank == 1))
    return nll, len(argmax), argmax


def greedy_with_logprobs(llm, prompts: list, max_tokens: int) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Greedy continuations of ``prompts`` (text or TokensPrompt): per prompt its tokens and, per step, the top-2
    logprobs (token -> logprob; the chosen token always among them)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


def first_divergence(tokens: list[int], reference: list[int], reference_logprobs: list[dict[int, float]]
                     ) -> tuple[int, float] | None:
    """None if ``tokens`` equals the ``reference`` continuation, else (the first step that differs, how much more
    likely the reference engine found its own token than ``tokens``' one at that step, in nats; inf if that token
    was not among its top 2). The contexts are equal up to that step, so only rounding told the two apart."""
    step = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    if step is None:
        return None
    return step, reference_logprobs[step][reference[step]] - reference_logprobs[step].get(tokens[step], -math.inf)


def argmax_agreement(argmax: list[int], reference: list[int]) -> float:
    """The fraction of positions at which two engines' argmax tokens on the same text are the same."""
    return sum(a == b for a, b in zip(argmax, reference, strict=True)) / len(reference)


def perturb_reductions(model: torch.nn.Module, seed: int | None, relative: float) -> int:
    """Run inside a vLLM worker (``LLM.apply_model``): multiply the output of every row-parallel linear layer of
    ``model`` (where tensor parallelism splits a sum over ranks and all-reduces it: o_proj, down_proj) by
    ``1 + relative * N(0, 1)``, drawn from a generator seeded with ``seed``, every forward; ``seed`` None takes the
    perturbation away. Returns how many layers it perturbs.

    With ``relative`` a few float32 ulps, a one-rank engine then differs from itself as much as the rounding of a
    TP engine's split reductions makes it differ: the band that TP's differences are read against, on the same text
    and engine."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    for handle in getattr(model, "_kvquant_perturbations", []):
        handle.remove()
    model._kvquant_perturbations = []
    if seed is None:
        return 0
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def perturb(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output  # (output, bias) where the layer returns its bias
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device, out.dtype)
        out = out * (1 + relative * noise)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    for module in model.modules():
        if isinstance(module, RowParallelLinear):
            model._kvquant_perturbations.append(module.register_forward_hook(perturb))
    return len(model._kvquant_perturbations)
