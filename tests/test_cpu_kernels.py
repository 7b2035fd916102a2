"""The C++ CPU kernels (csrc/cpu) against the PyTorch references: attention for every instruction set this CPU runs
(AVX-512, AVX2, portable) and the store byte for byte, on the random pages and tokens of
tests/test_triton_kernels.py."""

import contextlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from calib_helpers import random_calibration
from kvquant_vllm.kernels import ENV_VAR, cpu, cpu_build, kernel_backend
from kvquant_vllm.kernels.reference import paged_attention_reference, paged_decode_reference
from kvquant_vllm.quant.kvquant import kvquant_methods
from kvquant_vllm.quant.paged import PageLayout
from kvquant_vllm.quant.pagestore import PagedKVQuant
import test_triton_kernels as triton_tests
from test_triton_kernels import (
    ATTENTION_CASES,
    ROPES,
    STORE_CASES,
    _attention_setup,
    _keys_values,
    _random_pages,
    _store,
)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the CPU kernels cannot be built here")


def _runnable_isas() -> list[str]:
    """The instruction sets of cpu.INSTRUCTION_SETS that this CPU runs, widest first."""
    best = cpu.instruction_set()
    return list(cpu.INSTRUCTION_SETS[cpu.INSTRUCTION_SETS.index(best):])


def _runnable(isa: str) -> str:
    """``isa``, or a skip where this CPU does not run it."""
    if isa not in _runnable_isas():
        pytest.skip(f"this CPU does not run {isa}")
    return isa


@pytest.fixture(params=cpu.INSTRUCTION_SETS)
def isa(request):
    return _runnable(request.param)


@pytest.fixture(params=("amx", "avx512bf16"))
def bf16_isa(request):
    """The instruction sets whose kernels take a bf16 model's prefill blocks in bf16 products (tiles, or vdpbf16ps)."""
    return _runnable(request.param)


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_decode_matches_reference(case, isa, rng):
    dtype, block_size, heads, head_dim, gqa, outlier_rate, lens, splits, rope = ATTENTION_CASES[case]
    store, cache, block_table, seq_lens, rope = _attention_setup(dtype, block_size, heads, head_dim, gqa,
                                                                 outlier_rate, lens, rope, rng)
    query = torch.randn(len(lens), heads * gqa, head_dim, generator=rng)
    scale = head_dim**-0.5
    expected = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, scale)
    for split_tokens in (cpu.SPLIT_TOKENS, block_size, splits * block_size):  # splits merge to the single pass
        out = cpu.paged_decode_attention(query, cache, block_table, seq_lens, store, rope, scale,
                                         split_tokens=split_tokens, isa=isa)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_prefill_matches_reference(case, isa, rng):
    """Chunks of every length (a whole prompt, a chunk after cached context, one token) in one call."""
    dtype, block_size, heads, head_dim, gqa, outlier_rate, lens, _, rope = ATTENTION_CASES[case]
    store, cache, block_table, seq_lens, rope = _attention_setup(dtype, block_size, heads, head_dim, gqa,
                                                                 outlier_rate, lens, rope, rng)
    chunks = [n if i % 2 == 0 else max(1, n // 3) for i, n in enumerate(lens)]
    query_start_loc = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()])
    query = torch.randn(sum(chunks), heads * gqa, head_dim, generator=rng)
    scale = head_dim**-0.5
    expected = paged_attention_reference(query, cache, block_table, query_start_loc, seq_lens, store, rope, scale)
    for split_tokens in (cpu.SPLIT_TOKENS, block_size):
        out = cpu.paged_prefill_attention(query, cache, block_table.int(), query_start_loc.int(), seq_lens.int(),
                                          store, rope, scale, split_tokens=split_tokens, isa=isa)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunks_call(parts, cache, block_table, store, rope, isa, split_tokens):
    """One prefill call of the chunks ``parts`` [(request, first position, end position, queries [end - first, Hq,
    D])], in that order: each chunk's outputs."""
    sizes = [len(q) for _, _, _, q in parts]
    starts = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    out = cpu.paged_prefill_attention(torch.cat([q for _, _, _, q in parts]), cache,
                                      block_table[[r for r, _, _, _ in parts]], starts,
                                      torch.tensor([end for _, _, end, _ in parts]), store, rope, 0.125,
                                      split_tokens=split_tokens, isa=isa)
    return out.split(sizes)


def test_a_tokens_attention_depends_on_its_request_alone(isa, rng):
    """Batch invariance, bit for bit: every token of request 0 gets the same output attended as one prefill chunk
    alone on one thread, as a decode in a batch of decodes of other lengths, and in chunks cut anywhere beside other
    requests' chunks (a one-token chunk included) on two threads. Contexts of 10 pages in splits of 4 pages, so that
    rows before, across and after split boundaries are covered."""
    lens, split_tokens = (150, 37, 300, 5), 64
    store, cache, block_table, _, rope = _attention_setup("kvquant3", 16, 2, 64, 3, 0.01, lens, "llama3", rng)
    queries = [torch.randn(n, 6, 64, generator=rng) for n in lens]
    n = lens[0]
    with _threads(1):
        (alone,) = _chunks_call([(0, 0, n, queries[0])], cache, block_table, store, rope, isa, split_tokens)
    with _threads(2):
        # Request 0 at every length 1 .. n in one decode batch, beside decodes of the other requests.
        rows = [(0, p) for p in range(n)] + [(r, lens[r] - 1) for r in (1, 2, 3)]
        decoded = cpu.paged_decode_attention(
            torch.stack([queries[r][p] for r, p in rows]), cache, block_table[[r for r, _ in rows]],
            torch.tensor([p + 1 for _, p in rows]), store, rope, 0.125, split_tokens=split_tokens, isa=isa)
        assert torch.equal(decoded[:n], alone)
        # The same prompt in chunks of 23, 77, 49 and 1 tokens, each call with other requests' chunks around it.
        cuts, chunked = (0, 23, 100, 149, 150), []
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            other = 1 + i % 3
            parts = [(other, lens[other] - 3, lens[other], queries[other][-3:]), (0, a, b, queries[0][a:b])]
            if i % 2:  # request 0 first in the call
                parts.reverse()
            outs = _chunks_call(parts, cache, block_table, store, rope, isa, split_tokens)
            chunked.append(outs[[r for r, _, _, _ in parts].index(0)])
        assert torch.equal(torch.cat(chunked), alone)


def test_stored_bytes_depend_on_the_token_alone(rng):
    """A request's pages hold the same bytes whether its tokens are stored in one call on one thread, or in chunks
    cut anywhere, on two threads, with other requests' tokens ahead of and behind them in the call; key outlier
    lists filled past their capacity included. Each call's RoPE tables come from its own positions, as the
    backend's metadata builder makes them once per step."""
    store = _store("kvquant3", 16, 2, 64, rng)
    rope = ROPES["llama3"](64)
    lens, cuts = (70, 40, 25), (0, 9, 10, 41, 70)
    blocks = torch.randperm(15, generator=rng).view(3, 5)
    tokens = []
    for n in lens:
        key, value = _keys_values(store, n, 0.05, rng)
        pos = torch.arange(n)
        tokens.append((rope.rotate(key, pos), value))
    fresh = _random_pages(store, 15, rng)

    def write(cache, parts):  # parts: [(request, first position, end position)], one call
        pos = torch.cat([torch.arange(a, b) for _, a, b in parts])
        req = torch.cat([torch.full((b - a,), r) for r, a, b in parts])
        key = torch.cat([tokens[r][0][a:b] for r, a, b in parts])
        value = torch.cat([tokens[r][1][a:b] for r, a, b in parts])
        slots = blocks[req, pos // 16] * 16 + pos % 16
        cpu.store_tokens(cache, key, value, slots, pos, store, *rope.cos_sin(pos), rope.inverse_gain)

    alone = fresh.clone()
    with _threads(1):
        write(alone, [(0, 0, lens[0])])
    batched = fresh.clone()
    with _threads(2):
        write(batched, [(1, 0, 40), (2, 0, 25)])  # the others' pages, so that both caches differ there only
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            other = (1 + i % 2, 0, lens[1 + i % 2])
            write(batched, [other, (0, a, b)] if i % 2 else [(0, a, b), other])
    assert int(store.layout.view(alone, "key_out_count")[blocks[0]].max()) == store.layout.key_outlier_capacity
    assert torch.equal(batched[blocks[0]], alone[blocks[0]])


def test_every_side_table_counts(rng):
    """Key outliers, value outliers and the sink each move the result far past the tolerance, and the kernel
    follows the reference with each of them removed: none is ignored or read from the wrong place."""
    store, cache, block_table, seq_lens, rope = _attention_setup("kvquant3-valueoutliers", 32, 2, 64, 3, 0.05,
                                                                 (70, 33), "llama3", rng)
    lay = store.layout
    assert int(lay.view(cache, "key_out_count")[block_table.flatten()].max()) == lay.key_outlier_capacity
    query = torch.randn(2, 6, 64, generator=rng) * 3
    results = []
    for change in (None, "key_out_count", "value_out_val", "sink"):
        if change == "key_out_count":
            lay.view(cache, change).zero_()
        elif change is not None:  # exact values replaced by other plausible ones
            view = lay.view(cache, change)
            view.copy_(view.flip(-1) if change == "sink" else -view)
        expected = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, 64**-0.5)
        out = cpu.paged_decode_attention(query, cache, block_table, seq_lens, store, rope, 64**-0.5)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        results.append(out)
    for before, after in zip(results, results[1:]):
        assert (before - after).abs().max() > 1e-2


@pytest.mark.parametrize("rope", ["plain", "yarn"])
def test_rope_at_long_positions(rope, rng):
    """Decode at position 20,000 (the kernel's angles reduced exactly) and a prefill chunk after it."""
    store, cache, block_table, seq_lens, rope = _attention_setup("kvquant4", 256, 1, 64, 2, 0.01, (20_001,), rope,
                                                                 rng)
    query = torch.randn(1, 2, 64, generator=rng) * 4
    expected = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, 0.125)
    out = cpu.paged_decode_attention(query, cache, block_table, seq_lens, store, rope, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    query = torch.randn(20, 2, 64, generator=rng) * 4
    query_start_loc = torch.tensor([0, 20])
    expected = paged_attention_reference(query, cache, block_table, query_start_loc, seq_lens, store, rope, 0.125)
    out = cpu.paged_prefill_attention(query, cache, block_table, query_start_loc, seq_lens, store, rope, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["4bit-bs32-d128-gqa3-overflow-split", "3bit-bs256-gqa8-overflow"])
def test_bf16_tile_products(case, bf16_isa, rng):
    """AMX and AVX512-BF16: bf16 queries in prefill blocks of 16 rows or more take bf16 products (keys, weights and
    values rounded to bf16, sums in float32, as vLLM's CPU attention has them): within bf16 rounding of the float32
    reference, and the rows past the last block of 16 as the float32 kernel."""
    dtype, block_size, heads, head_dim, gqa, outlier_rate, lens, _, rope = ATTENTION_CASES[case]
    store, cache, block_table, seq_lens, rope = _attention_setup(dtype, block_size, heads, head_dim, gqa,
                                                                 outlier_rate, lens, rope, rng)
    chunks = [n if i % 2 == 0 else max(1, n // 3) for i, n in enumerate(lens)]
    query_start_loc = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()])
    query = torch.randn(sum(chunks), heads * gqa, head_dim, generator=rng).bfloat16()
    scale = head_dim**-0.5
    expected = paged_attention_reference(query, cache, block_table, query_start_loc, seq_lens, store, rope, scale)
    out = cpu.paged_prefill_attention(query, cache, block_table, query_start_loc, seq_lens, store, rope, scale,
                                      isa=bf16_isa)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    out32 = cpu.paged_prefill_attention(query.float(), cache, block_table, query_start_loc, seq_lens, store, rope,
                                        scale, isa=bf16_isa)
    assert not torch.equal(out, out32)
    # Every item of a chunk but its last holds a multiple of 16 tokens, so the float32 rows are the chunk's last
    # (tokens x gqa) % 16 rows (token-major) of every kv head.
    float32_rows = 0
    for first, n in zip(query_start_loc.tolist(), chunks):
        for row in range(n * gqa - n * gqa % 16, n * gqa):
            token, q_heads = first + row // gqa, slice(row % gqa, heads * gqa, gqa)
            assert torch.equal(out[token, q_heads], out32[token, q_heads])
            float32_rows += 1
    assert float32_rows > 0


def test_bf16_tile_rows_do_not_depend_on_the_thread_count(bf16_isa, rng):
    """AMX and AVX512-BF16: a prefill item takes up to 768 rows on one thread and 16 tokens' rows where many threads
    need items; a row's bf16 products and softmax steps are the same either way, bit for bit."""
    lens = (300, 41)
    store, cache, block_table, _, rope = _attention_setup("kvquant3", 32, 2, 64, 3, 0.01, lens, "llama3", rng)
    parts = [(r, 0, n, torch.randn(n, 6, 64, generator=rng).bfloat16()) for r, n in enumerate(lens)]
    with _threads(1):
        one = _chunks_call(parts, cache, block_table, store, rope, bf16_isa, 128)
    with _threads(8):
        many = _chunks_call(parts, cache, block_table, store, rope, bf16_isa, 128)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_queries(q_dtype, rng):
    """16-bit queries are attended as float32 (what the reference does with them)."""
    store, cache, block_table, seq_lens, rope = _attention_setup("kvquant3", 16, 2, 64, 2, 0.01, (40, 9), "plain",
                                                                 rng)
    query = torch.randn(2, 4, 64, generator=rng).to(q_dtype)
    expected = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, 0.125)
    out = cpu.paged_decode_attention(query, cache, block_table, seq_lens, store, rope, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_empty_sequences_and_strided_queries(rng):
    """A decode of an empty sequence gives zeros; a query that is a view into a packed qkv tensor is read in
    place; block tables of int64."""
    store, cache, block_table, seq_lens, rope = _attention_setup("kvquant3", 16, 2, 64, 2, 0.01, (40, 9), "plain",
                                                                 rng)
    seq_lens = torch.tensor([40, 0])
    qkv = torch.randn(2, 4 + 2 + 2, 64, generator=rng)
    query = qkv[:, :4]
    expected = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, 0.125)
    out = cpu.paged_decode_attention(query, cache, block_table.long(), seq_lens, store, rope, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out[1].abs().max() == 0


def test_bad_inputs_are_clear_errors(rng):
    store, cache, block_table, seq_lens, rope = _attention_setup("kvquant3", 16, 2, 64, 2, 0.01, (40, 9), "plain",
                                                                 rng)
    query = torch.randn(2, 4, 64)
    with pytest.raises(ValueError, match=r"query heads are not a multiple of 2 kv heads"):
        cpu.paged_decode_attention(torch.randn(2, 3, 64), cache, block_table, seq_lens, store, rope, 0.125)
    with pytest.raises(ValueError, match=r"query must be \[tokens, heads, 64\]"):
        cpu.paged_decode_attention(torch.randn(2, 4, 32), cache, block_table, seq_lens, store, rope, 0.125)
    with pytest.raises(TypeError, match="must be uint8"):
        cpu.paged_decode_attention(query, cache.float(), block_table, seq_lens, store, rope, 0.125)
    with pytest.raises(ValueError, match="the layout needs"):
        cpu.paged_decode_attention(query, cache[:, :100], block_table, seq_lens, store, rope, 0.125)
    with pytest.raises(ValueError, match="isa must be one of amx, avx512bf16, avx512, avx2, scalar"):
        cpu.paged_decode_attention(query, cache, block_table, seq_lens, store, rope, 0.125, isa="neon")
    with pytest.raises(RuntimeError, match=r"needs 4 blocks, the block table holds 3"):
        cpu.paged_decode_attention(query, cache, block_table, torch.tensor([49, 9]), store, rope, 0.125)
    bad_table = block_table.clone()
    bad_table[0, 1] = cache.shape[0]
    with pytest.raises(RuntimeError, match="is outside the"):
        cpu.paged_decode_attention(query, cache, bad_table, seq_lens, store, rope, 0.125)


def _store_both(store, torch_cache, cpu_cache, key, value, slots, positions, rope):
    """The torch store and the C++ store of the same post-RoPE tokens."""
    triton_tests._store_both(store, torch_cache, cpu_cache, key, value, slots, positions, rope, cpu.store_tokens)


@pytest.mark.parametrize("case", STORE_CASES)
def test_store_writes_the_same_bytes(case, rng):
    """Sequences written in chunks (prefill chunks, then decode tokens), full key outlier lists included."""
    store, torch_cache, cpu_cache, blocks = triton_tests.store_case_in_chunks(case, rng, cpu.store_tokens)
    if "overflow" in case:
        assert int(store.layout.view(torch_cache, "key_out_count")[blocks].max()) == store.layout.key_outlier_capacity
    assert torch.equal(cpu_cache, torch_cache)


def test_store_rewrite_from_the_middle_and_padding(rng):
    """A page refilled from offset 8 forgets the old key outliers at offsets >= 8 and keeps those before; a decode
    batch of several sequences with padding slots; values on codebook midpoints and flat vectors."""
    store = _store("kvquant3", 16, 2, 64, rng)
    torch_cache = _random_pages(store, 6, rng)
    cpu_cache = torch_cache.clone()
    rope = ROPES["plain"](64)
    old_key, old_value = _keys_values(store, 32, 0.03, rng)
    pos = torch.arange(32)
    _store_both(store, torch_cache, cpu_cache, old_key, old_value, torch.tensor([3, 1])[pos // 16] * 16 + pos % 16,
                pos, rope)
    new_key, _ = _keys_values(store, 12, 0.03, rng)
    new_value = torch.randint(-2, 3, (12, 2, 64), generator=rng).float()  # ties and midpoints
    new_value[6:] = 5.0
    new_value[torch.arange(12), :, torch.randint(0, 64, (12,), generator=rng)] = 50.0
    pos = torch.arange(8, 20)
    _store_both(store, torch_cache, cpu_cache, new_key, new_value, torch.tensor([3, 5])[pos // 16] * 16 + pos % 16,
                pos, rope)
    key, value = _keys_values(store, 5, 0.03, rng)
    slots = torch.tensor([-1, 3 * 16 + 8, 5 * 16 + 4, -1, 1 * 16 + 0])
    _store_both(store, torch_cache, cpu_cache, key, value, slots, torch.tensor([0, 8, 20, 0, 16]), rope)
    assert torch.equal(cpu_cache, torch_cache)


def test_nan_values_store_valid_outlier_channels(rng):
    """A model that overflows hands over NaN values: the store still writes each vector's value outliers at distinct
    channels of the vector (the search for the largest deviation must not run past it when no deviation is a
    number), and the other tokens as torch does."""
    store = _store("kvquant3-valueoutliers", 16, 1, 256, rng)  # three value outliers per vector
    torch_cache = _random_pages(store, 2, rng)
    cpu_cache = torch_cache.clone()
    key, value = _keys_values(store, 4, 0.01, rng)
    value[1] = float("nan")
    value[2, :, ::2] = float("nan")
    positions = torch.arange(1, 5)
    _store_both(store, torch_cache, cpu_cache, key, value, positions, positions, ROPES["plain"](256))
    channels = store.layout.view(cpu_cache, "value_out_idx")[0, 0, 1:5].long()  # [tokens, 3]
    assert bool((channels < 256).all())
    assert all(len(set(row.tolist())) == 3 for row in channels)
    view = store.layout.view
    assert torch.equal(view(cpu_cache, "key_codes")[0, 0, 1:5], view(torch_cache, "key_codes")[0, 0, 1:5])
    for section in ("value_codes", "value_scale", "value_offset", "value_out_idx", "value_out_val"):
        finite = [1, 4]  # the offsets of tokens 0 and 3
        assert torch.equal(view(cpu_cache, section)[0, 0, finite], view(torch_cache, section)[0, 0, finite]), section


def test_sections_in_the_order_of_the_cpp_struct():
    """The op takes PageLayout.sections() offsets in their order: the C++ struct Sections must list the same names."""
    header = (cpu_build.CSRC / "attention.h").read_text()
    body = re.search(r"struct Sections \{(.*?)\};", header, re.S).group(1)
    names = re.findall(r"\w+", body.replace("int64_t", ""))
    assert names == list(PageLayout(3, 16, 2, 64).sections())


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert kernel_backend("cpu") == "cpu"
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert kernel_backend("cpu") == "cpu"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert kernel_backend("cpu") == "torch"
    monkeypatch.setenv(ENV_VAR, "cpu")
    monkeypatch.setattr("kvquant_vllm.kernels.cpu_kernels_available", lambda: False)
    with pytest.raises(RuntimeError, match="KVQUANT_KERNELS=cpu, but the C.. CPU kernels cannot run here"):
        kernel_backend("cpu")
    monkeypatch.setenv(ENV_VAR, "auto")
    assert kernel_backend("cpu") == "torch"


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu, "_load_op", broken)
    cpu.available.cache_clear()
    try:
        assert not cpu.available() and not cpu.available()
    finally:
        cpu.available.cache_clear()
    warnings = [r for r in caplog.records if "CPU attention kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler" in warnings[0].getMessage()


def test_imports_without_vllm():
    code = "import sys, kvquant_vllm.kernels.cpu; assert 'vllm' not in sys.modules, 'vllm was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("heads", [range(0, 1), range(1, 2), range(2, 3)])
def test_a_tensor_parallel_rank_computes_bit_for_bit_what_one_rank_computes_for_its_heads(heads, rng):
    """SmolLM2's shape (9 query, 3 kv heads, D 64) at TP=3: rank r stores kv head r with the calibration sliced to
    it and attends with query heads 3r..3r+2, with the C++ kernels; its page segments and its prefill and decode
    outputs are those of the whole model's store and kernels for that head and those query heads, bit for bit
    (decode with the same context splits: how many is chosen from the work per rank). What makes an engine at TP=3
    differ from TP=1 is the rounding of the reductions split over ranks, which kvquant's codes amplify
    (benchmarks/results/parallel-cpu.md)."""
    calibration = random_calibration(kvquant_methods()["kvquant3"].spec, rng, 3, 64)
    whole = PagedKVQuant("kvquant3", calibration, 0, 16)
    rank = PagedKVQuant("kvquant3", calibration.kv_heads(heads), 0, 16)
    rope = ROPES["llama3"](64)
    lens = (40, 23)  # each sequence stored as a prefill of all but its last 5 tokens, then those 5
    block_table = torch.tensor([[4, 0, 6], [2, 5, 1]])
    key, value = _keys_values(whole, sum(lens), 0.03, rng)  # [tokens, 3, 64] pre-RoPE, key outliers included
    query = torch.randn(sum(lens), 9, 64, generator=rng) * 3
    starts, seq_lens = torch.tensor([0, lens[0], sum(lens)]), torch.tensor(lens)
    results = {}
    for name, store, kv, q_heads in [("whole", whole, range(3), range(9)),
                                     ("rank", rank, heads, range(3 * heads.start, 3 * heads.stop))]:
        cache = torch.zeros(7, store.layout.page_size_bytes, dtype=torch.uint8)
        for i, n in enumerate(lens):
            for pos in (torch.arange(n - 5), torch.arange(n - 5, n)):
                tokens = starts[i] + pos
                cpu.store_tokens(cache, rope.rotate(key[tokens][:, kv.start:kv.stop], pos),
                                 value[tokens][:, kv.start:kv.stop], block_table[i, pos // 16] * 16 + pos % 16, pos,
                                 store, *rope.cos_sin(pos), rope.inverse_gain)
        q = query[:, q_heads.start:q_heads.stop]
        prefill = cpu.paged_prefill_attention(q, cache, block_table, starts, seq_lens, store, rope, 0.125)
        decode = cpu.paged_decode_attention(q[starts[1:] - 1], cache, block_table, seq_lens, store, rope, 0.125,
                                            split_tokens=32)
        results[name] = cache, prefill, decode
    (whole_cache, *whole_out), (rank_cache, *rank_out) = results["whole"], results["rank"]
    head_stride = whole.layout.head_stride
    assert rank.layout.head_stride == head_stride
    assert torch.equal(rank_cache.view(7, 1, head_stride), whole_cache.view(7, 3, head_stride)[:, heads.start:heads.stop])
    assert int(rank.layout.view(rank_cache, "key_out_count").sum()) > 0  # the outlier lists are compared too
    for w, r in zip(whole_out, rank_out):
        assert torch.equal(r, w[:, 3 * heads.start:3 * heads.stop])
