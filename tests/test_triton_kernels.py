"""Triton store and paged attention kernels (decode and prefill) against the PyTorch references (on the CPU, in
Triton's interpreter: tests/conftest.py turns it on before triton is first imported)."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from calib_helpers import random_calibration
from kvquant_vllm.kernels import ENV_VAR, kernel_backend
from kvquant_vllm.kernels.reference import (
    paged_attention_reference,
    paged_decode_fp16_reference,
    paged_decode_reference,
)
from kvquant_vllm.kernels.triton_attention import paged_decode_attention, paged_decode_fp16, paged_prefill_attention
from kvquant_vllm.kernels.triton_codes import rope_cos_sin
from kvquant_vllm.kernels.triton_store import store_tokens
from kvquant_vllm.quant.kvquant import kvquant_methods
from kvquant_vllm.quant.pagestore import PagedKVQuant
from kvquant_vllm.quant.rope import Rope, default_inv_freq
from kvquant_vllm.quant.synthetic import synthetic_tokens


@pytest.fixture
def triton_runs():
    """The kernels below launch on CPU tensors: only the interpreter runs them."""
    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.fail("triton is not in interpreter mode: set TRITON_INTERPRET=1 before triton is first imported")


interpreted = pytest.mark.usefixtures("triton_runs")


def _llama3_inv_freq(head_dim: int) -> torch.Tensor:
    """Llama 3's frequency scaling (factor 8, low/high frequency factors 1 and 4, 8192 original positions)."""
    inv_freq = default_inv_freq(head_dim, 500000.0)
    wavelen = 2 * torch.pi / inv_freq
    smooth = (8192 / wavelen - 1) / (4 - 1)
    scaled = torch.where(wavelen > 8192, inv_freq / 8, (1 - smooth) * inv_freq / 8 + smooth * inv_freq)
    return torch.where(wavelen < 8192 / 4, inv_freq, scaled)


ROPES = {
    "plain": lambda d: Rope.default(d, 10000.0),
    "llama3": lambda d: Rope(_llama3_inv_freq(d)),
    # YaRN: interpolated frequencies and cos/sin scaled by the attention factor.
    "yarn": lambda d: Rope(default_inv_freq(d, 10000.0) / torch.linspace(1.0, 4.0, d // 2), 1.1386),
}


def _store(dtype: str, block_size: int, heads: int, head_dim: int, rng: torch.Generator) -> PagedKVQuant:
    return PagedKVQuant(dtype, random_calibration(kvquant_methods()[dtype].spec, rng, heads, head_dim), 0, block_size)


def _keys_values(store: PagedKVQuant, length: int, outlier_rate: float, rng: torch.Generator):
    return synthetic_tokens(store.key_scale, store.key_offset, length, outlier_rate, rng)


def _random_pages(store: PagedKVQuant, num_blocks: int, rng: torch.Generator) -> torch.Tensor:
    """Pages of random bytes (what a reused page holds) with empty key outlier lists."""
    cache = torch.randint(0, 256, (num_blocks, store.layout.page_size_bytes), dtype=torch.uint8, generator=rng)
    store.layout.view(cache, "key_out_count").zero_()
    return cache


# ------------------------------------------------------------------------------------------------- RoPE
@triton.jit
def _rope_probe(position_ptr, inv_freq_ptr, cos_ptr, sin_ptr, N: tl.constexpr, HALF: tl.constexpr):
    n = tl.arange(0, N)
    c = tl.arange(0, HALF)
    cos, sin = rope_cos_sin(tl.load(position_ptr + n)[:, None], tl.load(inv_freq_ptr + c)[None, :])
    tl.store(cos_ptr + n[:, None] * HALF + c[None, :], cos)
    tl.store(sin_ptr + n[:, None] * HALF + c[None, :], sin)


@interpreted
@pytest.mark.parametrize("rope", ROPES)
def test_rope_from_inverse_frequencies_is_exact_at_any_position(rope):
    """cos and sin computed in the kernels equal the float64 rotation to fp32 rounding up to position 2**20."""
    r = ROPES[rope](128)
    positions = torch.tensor([0, 1, 2, 255, 4095, 32767, 131071, 1 << 20], dtype=torch.int32)
    cos, sin = (torch.empty(8, 64) for _ in range(2))
    _rope_probe[(1,)](positions, r.inv_freq, cos, sin, N=8, HALF=64)
    exact_cos, exact_sin = r.cos_sin(positions)
    torch.testing.assert_close(cos * r.scaling, exact_cos[:, :64], rtol=0, atol=3e-7)
    torch.testing.assert_close(sin * r.scaling, exact_sin[:, :64], rtol=0, atol=3e-7)


def test_rope_round_trip_and_scaling():
    r = ROPES["yarn"](64)
    x = torch.randn(50, 2, 64)
    positions = torch.arange(1000, 1050)
    assert (r.unrotate(r.rotate(x, positions), positions) - x).abs().max() < 1e-5
    assert torch.allclose(r.rotate(x, positions).norm(dim=-1), x.norm(dim=-1) * r.scaling, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- attention
ATTENTION_CASES = {
    # dtype, block size, kv heads, head dim, query heads per kv head, key outlier rate, seq lens, splits, RoPE
    "3bit-bs16-d64": ("kvquant3", 16, 2, 64, 1, 0.004, (1, 37, 16, 5), 1, "plain"),
    "4bit-bs32-d128-gqa3-overflow-split": ("kvquant4", 32, 1, 128, 3, 0.08, (70, 1, 32), 3, "llama3"),
    "2bit-bs64-d64-gqa4-split": ("kvquant2", 64, 2, 64, 4, 0.004, (130, 64, 7), 2, "yarn"),
    "3bit-no-outliers": ("kvquant3-nooutliers", 16, 2, 64, 3, 0.004, (33, 2), 2, "plain"),
    "3bit-no-sink-empty-lists": ("kvquant3-nosink", 32, 2, 128, 1, 0.0, (45, 1), 1, "plain"),
    "3bit-d256-three-value-outliers": ("kvquant3-valueoutliers", 16, 1, 256, 2, 0.004, (20, 3), 2, "yarn"),
    "3bit-bs256-gqa8-overflow": ("kvquant3", 256, 1, 64, 8, 0.05, (300, 255), 2, "llama3"),
    "4bit-bs256-d128-many-entries": ("kvquant4", 256, 2, 128, 2, 0.01, (260,), 2, "plain"),
}


def _attention_setup(dtype, block_size, heads, head_dim, gqa, outlier_rate, lens, rope, rng):
    store = _store(dtype, block_size, heads, head_dim, rng)
    pages_per_seq = -(-max(lens) // block_size)
    num_blocks = len(lens) * pages_per_seq + 3
    cache = _random_pages(store, num_blocks, rng)
    # Non-contiguous, shuffled block ids; the unused tail of each row points anywhere.
    block_table = torch.randperm(num_blocks, generator=rng)[: len(lens) * pages_per_seq].view(len(lens), -1)
    for row, n in zip(block_table, lens):
        key, value = _keys_values(store, n, outlier_rate, rng)
        pos = torch.arange(n)
        store.store(cache, key, value, row[pos // block_size] * block_size + pos % block_size, pos)
    return store, cache, block_table, torch.tensor(lens), ROPES[rope](head_dim)


@interpreted
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_decode_matches_reference(case, rng):
    dtype, block_size, heads, head_dim, gqa, outlier_rate, lens, splits, rope = ATTENTION_CASES[case]
    store, cache, block_table, seq_lens, rope = _attention_setup(dtype, block_size, heads, head_dim, gqa,
                                                                 outlier_rate, lens, rope, rng)
    query = torch.randn(len(lens), heads * gqa, head_dim, generator=rng)
    scale = head_dim**-0.5
    expected = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, scale)
    for table, lengths in ((block_table, seq_lens), (block_table.int(), seq_lens.int())):
        out = paged_decode_attention(query, cache, table, lengths, store, rope, scale, num_splits=splits)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if splits > 1:  # the split-K path and the single pass agree
        single = paged_decode_attention(query, cache, block_table, seq_lens, store, rope, scale, num_splits=1)
        torch.testing.assert_close(single, expected, rtol=1e-4, atol=1e-5)


@interpreted
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_prefill_matches_reference(case, rng):
    """Chunks of every length (a whole prompt, a chunk after cached context, one token) in one launch."""
    dtype, block_size, heads, head_dim, gqa, outlier_rate, lens, _, rope = ATTENTION_CASES[case]
    store, cache, block_table, seq_lens, rope = _attention_setup(dtype, block_size, heads, head_dim, gqa,
                                                                 outlier_rate, lens, rope, rng)
    chunks = [n if i % 2 == 0 else max(1, n // 3) for i, n in enumerate(lens)]
    query_start_loc = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()])
    query = torch.randn(sum(chunks), heads * gqa, head_dim, generator=rng)
    scale = head_dim**-0.5
    expected = paged_attention_reference(query, cache, block_table, query_start_loc, seq_lens, store, rope, scale)
    out = paged_prefill_attention(query, cache, block_table.int(), query_start_loc.int(), seq_lens.int(), store, rope,
                                  scale)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@interpreted
def test_key_outliers_matter_and_fill_their_lists(rng):
    """The overflow case really fills lists, and without the key outliers the result moves far past the tolerance."""
    dtype, block_size, heads, head_dim, gqa, outlier_rate, lens, _, rope = \
        ATTENTION_CASES["4bit-bs32-d128-gqa3-overflow-split"]
    store, cache, block_table, seq_lens, rope = _attention_setup(dtype, block_size, heads, head_dim, gqa,
                                                                 outlier_rate, lens, rope, rng)
    counts = store.layout.view(cache, "key_out_count")[block_table.flatten()]
    assert int(counts.max()) == store.layout.key_outlier_capacity
    query = torch.randn(len(lens), heads * gqa, head_dim, generator=rng)
    scale = head_dim**-0.5
    out = paged_decode_attention(query, cache, block_table, seq_lens, store, rope, scale)
    store.layout.view(cache, "key_out_count").zero_()
    without = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, scale)
    assert (out - without).abs().max() > 1e-2


@interpreted
@pytest.mark.parametrize("q_dtype, tol", [(torch.float16, 2e-3)])  # the interpreter's tl.dot has no bfloat16
def test_half_precision_queries(q_dtype, tol, rng):
    store, cache, block_table, seq_lens, rope = _attention_setup("kvquant3", 16, 2, 64, 2, 0.01, (40, 9), "plain",
                                                                 rng)
    query = torch.randn(2, 4, 64, generator=rng).to(q_dtype)
    scale = 64**-0.5
    expected = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, scale)
    out = paged_decode_attention(query, cache, block_table, seq_lens, store, rope, scale)
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tol)
    query_start_loc = torch.tensor([0, 40, 49])
    query = torch.randn(49, 4, 64, generator=rng).to(q_dtype)
    expected = paged_attention_reference(query, cache, block_table, query_start_loc, seq_lens, store, rope, scale)
    out = paged_prefill_attention(query, cache, block_table, query_start_loc, seq_lens, store, rope, scale)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tol)


@interpreted
@pytest.mark.parametrize("block_size, heads, head_dim, gqa, splits", [(16, 2, 64, 4, 1), (32, 1, 128, 3, 2)])
def test_fp16_baseline_matches_reference(block_size, heads, head_dim, gqa, splits, rng):
    lens = (1, 2 * block_size + 3, block_size)
    pages_per_seq = -(-max(lens) // block_size)
    num_blocks = len(lens) * pages_per_seq + 2
    key_cache, value_cache = (torch.randn(num_blocks, block_size, heads, head_dim, generator=rng).half()
                              for _ in range(2))
    block_table = torch.randperm(num_blocks, generator=rng)[: len(lens) * pages_per_seq].view(len(lens), -1)
    seq_lens = torch.tensor(lens)
    # Slots past a sequence's end hold NaN: they must not leak into any output.
    filled = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for row, n in zip(block_table, lens):
        pos = torch.arange(n)
        filled[row[pos // block_size] * block_size + pos % block_size] = True
    for c in (key_cache, value_cache):
        c.view(-1, heads, head_dim)[~filled] = float("nan")
    query = torch.randn(len(lens), heads * gqa, head_dim, generator=rng)
    scale = head_dim**-0.5
    expected = paged_decode_fp16_reference(query, key_cache, value_cache, block_table, seq_lens, scale)
    out = paged_decode_fp16(query, key_cache, value_cache, block_table, seq_lens, scale, num_splits=splits)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out16 = paged_decode_fp16(query.half(), key_cache, value_cache, block_table.int(), seq_lens.int(), scale)
    torch.testing.assert_close(out16.float(), expected, rtol=0, atol=3e-3)


# ----------------------------------------------------------------------------------------------- store
def _store_both(store, torch_cache, kernel_cache, key, value, slots, positions, rope, kernel_store=store_tokens):
    """The torch store (keys un-rotated by quant.rope) and a kernel's store (Triton's by default) of the same
    post-RoPE tokens."""
    key_post = rope.rotate(key, positions).to(value.dtype)
    store.store(torch_cache, rope.unrotate(key_post.float(), positions), value, slots, positions)
    kernel_store(kernel_cache, key_post, value, slots, positions, store, *rope.cos_sin(positions), rope.inverse_gain)


STORE_CASES = {
    # dtype, block size, kv heads, head dim, chunks of one sequence, key outlier rate, input dtype, RoPE
    "3bit-bs16-d64": ("kvquant3", 16, 2, 64, (5, 1, 20), 0.004, torch.float32, "plain"),
    "4bit-bs32-d128-overflow-fp16": ("kvquant4", 32, 3, 128, (40, 1, 1, 7), 0.08, torch.float16, "llama3"),
    "2bit-bs16": ("kvquant2", 16, 1, 64, (3, 17), 0.004, torch.float32, "yarn"),
    "3bit-no-outliers": ("kvquant3-nooutliers", 16, 2, 64, (9, 12), 0.004, torch.float32, "plain"),
    "3bit-no-sink": ("kvquant3-nosink", 64, 2, 64, (70,), 0.004, torch.float32, "plain"),
    "3bit-d256-three-value-outliers": ("kvquant3-valueoutliers", 16, 1, 256, (7, 12), 0.004, torch.float32, "plain"),
    "3bit-8-heads": ("kvquant3", 32, 8, 64, (33, 2), 0.02, torch.bfloat16, "plain"),
}


def store_case_in_chunks(case, rng, kernel_store=store_tokens):
    """STORE_CASES[case]'s sequence written in its chunks (prefill chunks, then decode tokens) by the torch store
    and by ``kernel_store`` into two copies of the same random pages: (store, torch pages, kernel pages, the
    sequence's blocks)."""
    dtype, block_size, heads, head_dim, chunks, outlier_rate, in_dtype, rope = STORE_CASES[case]
    store = _store(dtype, block_size, heads, head_dim, rng)
    rope = ROPES[rope](head_dim)
    length = sum(chunks)
    blocks = torch.randperm(length // block_size + 4, generator=rng)[: -(-length // block_size)]
    torch_cache = _random_pages(store, length // block_size + 4, rng)
    kernel_cache = torch_cache.clone()
    key, value = _keys_values(store, length, outlier_rate, rng)
    start = 0
    for n in chunks:
        pos = torch.arange(start, start + n)
        _store_both(store, torch_cache, kernel_cache, key[pos], value[pos].to(in_dtype),
                    blocks[pos // block_size] * block_size + pos % block_size, pos, rope, kernel_store)
        start += n
    return store, torch_cache, kernel_cache, blocks


@interpreted
@pytest.mark.parametrize("case", STORE_CASES)
def test_store_writes_the_same_bytes(case, rng):
    store, torch_cache, triton_cache, blocks = store_case_in_chunks(case, rng)
    counts = store.layout.view(torch_cache, "key_out_count")[blocks]
    if "overflow" in case:
        assert int(counts.max()) == store.layout.key_outlier_capacity
    assert torch.equal(triton_cache, torch_cache)


@interpreted
def test_store_edge_values(rng):
    """Values on codebook midpoints (integers: 0 is the midpoint of the uniform 3-bit book) and flat vectors
    (scale clamped to 1e-4), each with one far outlier."""
    store = _store("kvquant3", 16, 2, 64, rng)
    torch_cache = _random_pages(store, 2, rng)
    triton_cache = torch_cache.clone()
    key, _ = _keys_values(store, 16, 0.004, rng)
    value = torch.randint(-2, 3, (16, 2, 64), generator=rng).float()
    value[8:] = 5.0
    value[torch.arange(16), :, torch.randint(0, 64, (16,), generator=rng)] = 50.0
    pos = torch.arange(16)
    _store_both(store, torch_cache, triton_cache, key, value, 16 + pos, pos, ROPES["plain"](64))
    assert torch.equal(triton_cache, torch_cache)


@interpreted
def test_store_rewrite_from_the_middle_drops_stale_outliers(rng):
    """A page refilled from offset 8 (a new request after a shared prefix) forgets the old outliers at
    offsets >= 8 and keeps those before; a decode batch of several sequences with padding slots."""
    store = _store("kvquant3", 16, 2, 64, rng)
    torch_cache = _random_pages(store, 6, rng)
    triton_cache = torch_cache.clone()
    rope = ROPES["plain"](64)
    old_key, old_value = _keys_values(store, 32, 0.03, rng)
    pos = torch.arange(32)
    slots = torch.tensor([3, 1])[pos // 16] * 16 + pos % 16
    _store_both(store, torch_cache, triton_cache, old_key, old_value, slots, pos, rope)
    assert (store.layout.view(torch_cache, "key_out_count")[3] > 0).all()
    new_key, new_value = _keys_values(store, 12, 0.03, rng)
    pos = torch.arange(8, 20)
    slots = torch.tensor([3, 5])[pos // 16] * 16 + pos % 16
    _store_both(store, torch_cache, triton_cache, new_key, new_value, slots, pos, rope)
    assert torch.equal(triton_cache, torch_cache)

    # One decode token each for three sequences, interleaved with padding.
    key, value = _keys_values(store, 5, 0.03, rng)
    slots = torch.tensor([-1, 3 * 16 + 8, 5 * 16 + 4, -1, 1 * 16 + 0])
    positions = torch.tensor([0, 8, 20, 0, 16])
    _store_both(store, torch_cache, triton_cache, key, value, slots, positions, rope)
    assert torch.equal(triton_cache, torch_cache)


# -------------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("value, device, expected", [
    (None, "cpu", "torch"), ("auto", "cpu", "torch"), ("torch", "cpu", "torch"), ("Triton", "cpu", "triton"),
    ("", "cpu", "torch"),
])
def test_kernel_backend_choice(value, device, expected, monkeypatch):
    monkeypatch.setattr("kvquant_vllm.kernels.cpu_kernels_available", lambda: False)  # auto on CPU: see test_cpu_kernels
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    assert kernel_backend(device) == expected


@pytest.mark.parametrize("cuda_ok, expected", [(True, "cuda"), (False, "triton")])
def test_kernel_backend_auto_on_cuda(cuda_ok, expected, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "auto")
    monkeypatch.setattr("kvquant_vllm.kernels.cuda_kernels_available", lambda: cuda_ok)
    monkeypatch.setattr("kvquant_vllm.kernels.cpu_kernels_available", lambda: False)
    assert kernel_backend("cuda") == expected
    assert kernel_backend("cpu") == "torch"


def test_kernel_backend_errors(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "tensorrt")
    with pytest.raises(ValueError, match=r"KVQUANT_KERNELS='tensorrt' is not one of auto, torch, triton, cuda, cpu"):
        kernel_backend("cpu")
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        kernel_backend("cpu")
    monkeypatch.setenv(ENV_VAR, "cuda")
    monkeypatch.setattr("kvquant_vllm.kernels.cuda_kernels_available", lambda: False)
    with pytest.raises(RuntimeError, match="KVQUANT_KERNELS=cuda"):
        kernel_backend("cuda")


def test_kernels_import_without_vllm():
    """The GPU benchmark machine has torch and triton only."""
    code = ("import sys, kvquant_vllm.kernels, kvquant_vllm.kernels.reference, kvquant_vllm.kernels.triton_attention, "
            "kvquant_vllm.kernels.triton_store; assert 'vllm' not in sys.modules, 'vllm was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_kernels_compile_for_sm90():
    """Every Triton kernel, as its launcher calls it for the benchmark's and the bundled model's shapes, compiles
    to an sm_90 cubin with Triton's compiler (which checks more than the interpreter does)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "kvquant_vllm.kernels.compile_check", "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    compiled = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")]
    # 6 layouts x (store, decode, split merge, prefill) + 5 key-outlier passes + the fp16 baseline and its merge
    assert len(compiled) == 31
    assert set(compiled) == {"_store_kernel", "_key_outlier_kernel", "_kvquant_attention_kernel",
                             "_reduce_splits_kernel", "_fp16_decode_kernel"}
