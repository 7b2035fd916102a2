"""The load generator's request mix and summary, without a server: the mix is seeded and has every kind of request
the load test relies on; the summary accounts for every request."""

from collections import Counter

import pytest

from kvquant_vllm.loadgen import FAULTS, MixConfig, Outcome, make_mix, request_kwargs, summarize

CORPUS = list(range(20_000))


def _mix(**overrides):
    config = MixConfig(**({"requests": 256, "seed": 3} | overrides))
    return config, make_mix(config, CORPUS, lambda ids: " ".join(map(str, ids)), chat_overhead=10)


def test_mix_is_seeded_and_has_every_kind_of_request():
    config, specs = _mix()
    assert specs == _mix()[1] and specs != _mix(seed=4)[1]
    assert [s.index for s in specs] == list(range(256))
    normal = [s for s in specs if s.fault is None]
    lengths = [s.prompt_tokens for s in normal]
    assert min(lengths) == 8 and max(lengths) == 1500
    assert {s.max_tokens for s in normal} >= {1, 256} and all(1 <= s.max_tokens <= 256 for s in normal)
    kinds = Counter((s.api, s.stream) for s in normal)
    assert len(kinds) == 4 and min(kinds.values()) >= 30, kinds
    streams = [s for s in normal if s.stream]
    cancelled = [s for s in streams if s.cancel_after is not None]
    assert len(cancelled) == round(0.1 * len(streams))
    assert all(1 <= s.cancel_after < s.max_tokens for s in cancelled)
    assert all(s.cancel_after is None for s in normal if not s.stream)
    # Completions carry token ids exactly as long as stated; a quarter of them share a long prefix.
    completions = [s for s in normal if s.api == "completions"]
    assert all(len(s.prompt) == s.prompt_tokens for s in completions)
    shared = Counter(s.prompt[:8] for s in completions).most_common(4)
    assert sum(n for _, n in shared) >= 0.2 * len(completions), shared
    faults = Counter((s.fault, s.api) for s in specs if s.fault)
    assert sum(n for (f, _), n in faults.items() if f == "oversize") == config.oversize
    assert {(f, api) for f in FAULTS[1:] for api in ("chat", "completions")} <= set(faults)
    assert all(s.prompt_tokens > config.max_model_len for s in specs if s.fault == "oversize")


def test_requests_carry_their_faults_and_no_sampling_seed():
    _, specs = _mix()
    kwargs = {s.index: request_kwargs(s, "m") for s in specs}
    for s in specs:
        k = kwargs[s.index]
        assert ("messages" in k) == (s.api == "chat") and k.get("stream", False) == s.stream
        assert (k["max_tokens"] < 0) == (s.fault == "negative_max_tokens")
        assert (k["model"] != "m") == (s.fault == "unknown_model")
        assert k["temperature"] == (0.0 if s.greedy else 0.8)
        # A seeded request whose prefill vLLM 0.32 splits across steps kills a CPU engine.
        assert "seed" not in k and "seed" not in k["extra_body"]
    assert any(not s.greedy for s in specs)


def test_mix_refuses_a_shape_that_cannot_fit():
    with pytest.raises(ValueError, match="must fit in max_model_len 1024"):
        MixConfig(requests=64, max_model_len=1024)
    with pytest.raises(ValueError, match="too few"):
        MixConfig(requests=8)


def test_summary_accounts_for_every_request():
    _, specs = _mix(requests=16)
    outcomes = [Outcome(index=0, status="completed", token_ids=[1, 2, 3], ttft_s=0.5, itl_s=[0.1, 0.3]),
                Outcome(index=1, status="cancelled", token_ids=[4], ttft_s=1.5),
                Outcome(index=2, status="rejected_4xx", http_status=400),
                Outcome(index=3, status="failed", reason="HTTP 500: boom")]
    result = summarize(specs, outcomes, wall_s=2.0)
    assert (result["completed"], result["cancelled"], result["rejected_4xx"], result["failed"]) == (1, 1, 1, 1)
    assert result["lost"] == 12 and result["failures"] == ["#3: HTTP 500: boom"]
    assert result["output_tokens"] == 4 and result["output_tokens_per_s"] == 2.0
    assert result["ttft_p50_s"] == 1.0 and result["itl_p99_s"] == pytest.approx(0.298)
