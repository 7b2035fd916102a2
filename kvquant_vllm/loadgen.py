"""A bounded, seeded request mix for an OpenAI-compatible vLLM server, the asyncio driver that sends it at a fixed
concurrency, and the summary of what came back.

Every request ends in exactly one outcome: ``completed`` (a full, well-formed answer), ``cancelled`` (a stream the
client closed on purpose), ``rejected_4xx`` (a request built to be refused, refused with a 4xx) or ``failed``
(a 5xx, a dropped connection, a timeout, a truncated stream, a wrong token count, an unexpected 4xx or a bad
request accepted). So a run accounts for every request it sent.

The mix: real text (Python's documentation topics) cut into prompts of log-uniform length (most short, a tail up
to the maximum; the extremes are always present), log-uniform ``max_tokens``, completions (token-id prompts, part of
them sharing long prefixes so that the prefix cache hits) and chat, streaming and not, greedy and sampled,
a fraction of the streams cancelled mid-stream, prompts over the model's context and malformed requests.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np

# What a request built to fail is: oversize (prompt longer than max_model_len), and two malformed kinds.
FAULTS = ("oversize", "negative_max_tokens", "unknown_model")


@dataclass(frozen=True)
class MixConfig:
    """The shape of a request mix; ``requests`` includes the faulty ones."""

    requests: int
    seed: int = 0
    max_model_len: int = 2048
    prompt_tokens: tuple[int, int] = (8, 1500)
    max_tokens: tuple[int, int] = (1, 256)
    stream_fraction: float = 0.5
    chat_fraction: float = 0.5
    cancel_fraction: float = 0.1  # of the streams
    greedy_fraction: float = 0.75
    shared_prefix_fraction: float = 0.25  # of the completions
    shared_prefixes: int = 4
    oversize: int = 3
    malformed: int = 4  # alternately a negative max_tokens and an unknown model name

    def __post_init__(self) -> None:
        faults = self.oversize + self.malformed
        if self.requests < faults + 4:
            raise ValueError(f"--requests {self.requests} is too few: {faults} faulty requests plus at least 4 "
                             f"normal ones are needed")
        lo, hi = self.prompt_tokens
        if not 1 <= lo <= hi or hi + self.max_tokens[1] > self.max_model_len:
            raise ValueError(f"prompt lengths {lo}-{hi} plus up to {self.max_tokens[1]} new tokens must fit in "
                             f"max_model_len {self.max_model_len}")


@dataclass(frozen=True)
class RequestSpec:
    index: int
    api: str  # "completions" (prompt: token ids) or "chat" (prompt: the user message)
    stream: bool
    prompt: tuple[int, ...] | str
    prompt_tokens: int  # as sent; for chat, the message's tokens plus the template's
    max_tokens: int
    greedy: bool
    cancel_after: int | None = None  # streams only: close the stream once this many tokens arrived
    fault: str | None = None  # one of FAULTS, or None


@dataclass
class Outcome:
    index: int
    status: str  # completed | cancelled | rejected_4xx | failed
    reason: str = ""
    http_status: int | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None  # streams: first token
    itl_s: list[float] = field(default_factory=list)  # streams: gaps between token-bearing chunks


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)) - 0.5))))


def make_mix(config: MixConfig, corpus: list[int], decode, chat_overhead: int) -> list[RequestSpec]:
    """The seeded request list (shuffled). ``corpus``: token ids of running text; ``decode``: token ids -> str;
    ``chat_overhead``: tokens the chat template adds to a user message."""
    rng = random.Random(config.seed)
    lo, hi = config.prompt_tokens

    def window(n: int) -> tuple[int, ...]:
        start = rng.randrange(len(corpus) - n)
        return tuple(corpus[start : start + n])

    prefixes = [window(rng.randrange(hi // 3, 2 * hi // 3)) for _ in range(config.shared_prefixes)]
    faults = ["oversize"] * config.oversize + [FAULTS[1 + i % 2] for i in range(config.malformed)]
    normal = config.requests - len(faults)
    # The extremes first, so that every mix has them: (shortest, longest) prompt x (fewest, most) new tokens.
    extremes = [(lo, config.max_tokens[1]), (hi, config.max_tokens[1]), (hi, config.max_tokens[0]),
                (lo, config.max_tokens[0])]
    streams = set(rng.sample(range(normal), round(normal * config.stream_fraction)))
    cancelled = set(rng.sample(sorted(streams), round(len(streams) * config.cancel_fraction)))
    specs = []
    for i in range(normal):
        length, max_tokens = extremes[i] if i < len(extremes) else (
            _log_uniform(rng, lo, hi), _log_uniform(rng, *config.max_tokens))
        cancel_after = None
        if i in cancelled:
            max_tokens = max(max_tokens, 8)  # room to cancel mid-stream
            cancel_after = rng.randrange(1, max_tokens)
        chat = rng.random() < config.chat_fraction
        if chat:
            content = decode(window(max(1, length - chat_overhead)))
            prompt, tokens = content, max(1, length - chat_overhead) + chat_overhead
        elif rng.random() < config.shared_prefix_fraction:
            prefix = rng.choice(prefixes)
            prompt = prefix + window(max(lo, length) - len(prefix)) if length > len(prefix) else prefix[:length]
            tokens = len(prompt)
        else:
            prompt = window(length)
            tokens = length
        specs.append(RequestSpec(index=0, api="chat" if chat else "completions", stream=i in streams, prompt=prompt,
                                 prompt_tokens=tokens, max_tokens=max_tokens,
                                 greedy=rng.random() < config.greedy_fraction, cancel_after=cancel_after))
    for j, fault in enumerate(faults):
        length = config.max_model_len + 1 + rng.randrange(500) if fault == "oversize" else rng.randrange(lo, 64)
        # Each malformed kind goes once to each API; the oversize prompts alternate.
        chat = (j if fault == "oversize" else (j - config.oversize) // 2) % 2 == 1
        prompt = decode(window(length)) if chat else window(length)
        specs.append(RequestSpec(index=0, api="chat" if chat else "completions", stream=j % 3 == 2, prompt=prompt,
                                 prompt_tokens=length, max_tokens=16, greedy=True, fault=fault))
    rng.shuffle(specs)
    return [RequestSpec(**{**s.__dict__, "index": k}) for k, s in enumerate(specs)]


def model_mix(model_dir: str, config: MixConfig) -> list[RequestSpec]:
    """:func:`make_mix` over Python's documentation topics in ``model_dir``'s tokenizer and chat template."""
    from transformers import AutoTokenizer

    from kvquant_vllm.data import load_text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus = tokenizer(load_text("pydoc"), add_special_tokens=False)["input_ids"]
    template = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                             add_generation_prompt=True)
    overhead = len(tokenizer(template, add_special_tokens=False)["input_ids"])
    return make_mix(config, corpus, tokenizer.decode, overhead)


# ----------------------------------------------------------------------------------------------------- driver
def request_kwargs(spec: RequestSpec, model: str) -> dict:
    """The `openai` client arguments of ``spec`` (the faults built in)."""
    kwargs = {
        "model": model + "-unknown" if spec.fault == "unknown_model" else model,
        "max_tokens": -5 if spec.fault == "negative_max_tokens" else spec.max_tokens,
        "temperature": 0.0 if spec.greedy else 0.8,
        "extra_body": {"return_token_ids": True},
    }
    if not spec.greedy:
        # No per-request seed: in vLLM 0.32 a seeded request whose prefill is split across steps kills a CPU
        # engine (it rewinds the request's generator offset, which a CPU generator does not have).
        kwargs |= {"top_p": 0.95}
    if spec.stream:
        kwargs |= {"stream": True, "stream_options": {"include_usage": True}}
    if spec.api == "chat":
        kwargs["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        kwargs["prompt"] = list(spec.prompt)
    return kwargs


def _check_answer(spec: RequestSpec, out: Outcome, usage) -> str:
    """Why a finished answer is malformed ("" if it is not)."""
    n = len(out.token_ids)
    if out.finish_reason not in ("length", "stop"):
        return f"finish_reason {out.finish_reason!r}"
    if usage is None:
        return "no usage"
    if usage.completion_tokens != n:
        return f"usage says {usage.completion_tokens} completion tokens, {n} token ids arrived"
    if (out.finish_reason == "length" and n != spec.max_tokens) or not 1 <= n <= spec.max_tokens:
        return f"{n} tokens with finish_reason {out.finish_reason} for max_tokens {spec.max_tokens}"
    if out.prompt_token_ids is None or len(out.prompt_token_ids) != usage.prompt_tokens:
        return "prompt token ids missing or not matching usage"
    if spec.api == "completions" and tuple(out.prompt_token_ids) != spec.prompt:
        return "the server's prompt token ids differ from those sent"
    return ""


async def _send(client, model: str, spec: RequestSpec) -> Outcome:
    import openai

    out = Outcome(index=spec.index, status="failed")
    create = client.chat.completions.create if spec.api == "chat" else client.completions.create
    start = time.perf_counter()
    try:
        response = await create(**request_kwargs(spec, model))
        if spec.stream:
            usage = await _read_stream(spec, response, out, start)
            if out.status == "cancelled":
                return out
        else:
            choice = response.choices[0]
            out.token_ids = list(getattr(choice, "token_ids", None) or [])
            out.text = (choice.message.content or "") if spec.api == "chat" else choice.text
            out.prompt_token_ids = response.prompt_token_ids if spec.api == "chat" else choice.prompt_token_ids
            out.finish_reason, usage = choice.finish_reason, response.usage
        out.latency_s = time.perf_counter() - start
        if spec.fault:
            out.reason = f"a request with fault {spec.fault} was accepted"
            return out
        out.reason = _check_answer(spec, out, usage)
        out.status = "failed" if out.reason else "completed"
    except openai.APIStatusError as e:
        out.http_status = e.status_code
        if 400 <= e.status_code < 500 and spec.fault:
            out.status = "rejected_4xx"
        else:
            out.reason = f"HTTP {e.status_code}: {str(e)[:300]}"
    except Exception as e:  # timeouts, dropped connections, error events inside a stream: all are failures
        out.reason = f"{type(e).__name__}: {str(e)[:300]}"
    out.latency_s = time.perf_counter() - start
    return out


async def _read_stream(spec: RequestSpec, stream, out: Outcome, start: float):
    """Consume a stream into ``out`` (closing it early for a cancelled spec); returns the usage chunk's usage."""
    usage, last = None, None
    async for chunk in stream:
        now = time.perf_counter()
        usage = chunk.usage or usage
        if spec.api == "chat" and getattr(chunk, "prompt_token_ids", None) is not None:
            out.prompt_token_ids = chunk.prompt_token_ids
        for choice in chunk.choices:
            ids = getattr(choice, "token_ids", None) or []
            if spec.api == "completions" and getattr(choice, "prompt_token_ids", None) is not None:
                out.prompt_token_ids = choice.prompt_token_ids
            out.text += (choice.delta.content or "") if spec.api == "chat" else choice.text
            out.finish_reason = choice.finish_reason or out.finish_reason
            if ids:
                if last is None:
                    out.ttft_s = now - start
                else:
                    out.itl_s.append(now - last)
                last = now
                out.token_ids += ids
        if spec.cancel_after is not None and len(out.token_ids) >= spec.cancel_after and out.finish_reason is None:
            out.status = "cancelled"
            break
    if out.status == "cancelled":  # closed outside the iteration: an async generator cannot close itself
        await stream.close()
        out.latency_s = time.perf_counter() - start
    return usage


async def drive(base_url: str, model: str, specs: list[RequestSpec], concurrency: int,
                timeout_s: float) -> tuple[list[Outcome], float]:
    """Send ``specs`` in order with at most ``concurrency`` in flight; (outcomes by index, wall seconds).
    The client never retries: a retried 5xx or dropped connection would hide a failure."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=timeout_s)
    pending = iter(specs)
    outcomes: list[Outcome] = []

    async def worker() -> None:
        for spec in pending:
            outcomes.append(await _send(client, model, spec))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return sorted(outcomes, key=lambda o: o.index), wall


# ---------------------------------------------------------------------------------------------------- summary
def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(specs: list[RequestSpec], outcomes: list[Outcome], wall_s: float) -> dict:
    """Counts per outcome, throughput and latency percentiles; ``failures`` lists the first reasons."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("completed", "cancelled", "rejected_4xx", "failed")}
    answered = [o for o in outcomes if o.status in ("completed", "cancelled")]
    ttft = [o.ttft_s for o in answered if o.ttft_s is not None]
    itl = [gap for o in answered for gap in o.itl_s]
    latency = [o.latency_s for o in outcomes if o.status == "completed"]
    output_tokens = sum(len(o.token_ids) for o in answered)
    return {
        "requests": len(specs),
        **counts,
        "lost": len(specs) - sum(counts.values()),
        "expected_4xx": sum(s.fault is not None for s in specs),
        "failures": [f"#{o.index}: {o.reason}" for o in outcomes if o.status == "failed"][:20],
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall_s,
        "requests_per_s": counts["completed"] / wall_s,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
    }
