"""The CUDA decode kernel's code against the PyTorch reference, run on the CPU: csrc/kvquant_decode.cuh compiled
by the host compiler with tests/cuda_emulation/cuda_host.h, which runs each CUDA thread as a fiber and the warp
collectives, tensor-core MMAs (from the PTX ISA's fragment layouts) and cp.async copies in software.

This checks the kernel's indexing (bit planes, fragments, pages, tiles, partitions, outlier lists), RoPE and
numerics on random pages; the hardware's own behaviour, and speed, need a GPU (benchmarks/kernels.py).
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kvquant_vllm.kernels import cuda
from kvquant_vllm.kernels.reference import paged_decode_reference
from test_triton_kernels import ROPES, _attention_setup

EMULATION = Path(__file__).parent / "cuda_emulation"
CUDA_INCLUDE = Path("/usr/local/cuda/include")
DTYPES = {torch.float16: (0, "half"), torch.bfloat16: (1, "bfloat16"), torch.float32: (2, "float")}
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float16: dict(rtol=0, atol=3e-3),
             torch.bfloat16: dict(rtol=0, atol=2.5e-2)}

CASES = {
    # query dtype, cache dtype, block size, kv heads, head dim, query heads per kv head, key outlier rate, seq lens,
    # RoPE, SMs the split-K plan assumes
    "fp32-3bit-d64-bs16": (torch.float32, "kvquant3", 16, 2, 64, 1, 0.004, (1, 37, 16, 5), "plain", 1),
    "fp16-4bit-d128-gqa3-overflow": (torch.float16, "kvquant4", 32, 1, 128, 3, 0.08, (70, 1, 32), "llama3", 1),
    "bf16-2bit-d64-gqa4-split": (torch.bfloat16, "kvquant2", 64, 2, 64, 4, 0.004, (300, 64, 7), "yarn", 132),
    "fp32-3bit-nooutliers-gqa12-empty": (torch.float32, "kvquant3-nooutliers", 16, 1, 64, 12, 0.004, (33, 0, 2),
                                         "plain", 1),
    "fp16-3bit-d128-nosink": (torch.float16, "kvquant3-nosink", 32, 2, 128, 1, 0.0, (45, 1), "plain", 1),
    "fp32-3bit-d256-value-outliers": (torch.float32, "kvquant3-valueoutliers", 16, 1, 256, 2, 0.004, (40, 3), "yarn",
                                      1),
    "fp16-3bit-bs256-gqa8-split-midpage": (torch.float16, "kvquant3", 256, 1, 64, 8, 0.05, (600, 255), "llama3", 132),
    "bf16-4bit-d256-gqa5": (torch.bfloat16, "kvquant4", 32, 2, 256, 5, 0.01, (50, 17), "llama3", 1),
    "fp16-2bit-d128-split": (torch.float16, "kvquant2", 16, 2, 128, 2, 0.01, (400, 130, 1), "yarn", 132),
}


class EmulatedDecode(ctypes.Structure):  # struct EmulatedDecode of decode_driver.cpp
    _fields_ = [
        ("out", ctypes.c_void_p), ("query", ctypes.c_void_p), ("query_seq_stride", ctypes.c_int64),
        ("query_head_stride", ctypes.c_int64), ("cache", ctypes.c_void_p), ("page_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64), ("block_table", ctypes.c_void_p), ("block_table_stride", ctypes.c_int64),
        ("seq_lens", ctypes.c_void_p), ("key_scale", ctypes.c_void_p), ("key_offset", ctypes.c_void_p),
        ("key_book", ctypes.c_void_p), ("value_book", ctypes.c_void_p), ("inv_freq", ctypes.c_void_p),
        ("scale", ctypes.c_double), ("max_seq_len", ctypes.c_int64), ("sections", ctypes.c_int64 * 10),
        *((name, ctypes.c_int) for name in ("dtype", "head_dim", "bits", "num_seqs", "num_q_heads", "num_kv_heads",
                                            "block_size", "key_outlier_capacity", "value_outliers", "sink", "sms",
                                            "num_partitions")),
    ]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The kernel compiled for the CPU with every (dtype, head dim, bits) of CASES."""
    if shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_fp16.h").is_file():
        pytest.skip("the emulation needs g++ and the CUDA headers (cuda_fp16.h)")
    from kvquant_vllm.quant.paged import DTYPE_BITS

    cases = {(DTYPES[q][1], head_dim, DTYPE_BITS[dtype.split("-")[0]])
             for q, dtype, _, _, head_dim, *_ in CASES.values()}
    library = tmp_path_factory.mktemp("cuda-emulation") / "decode.so"
    instances = " ".join(f"X({t}, {d}, {b})" for t, d, b in sorted(cases))
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-include", str(EMULATION / "cuda_host.h"),
                    f"-I{cuda.CSRC}", f"-I{CUDA_INCLUDE}", f"-DEMULATED_CASES={instances}",
                    str(EMULATION / "decode_driver.cpp"), "-o", str(library)], check=True, timeout=900)
    lib = ctypes.CDLL(str(library))
    lib.kvquant_emulated_decode.argtypes = [ctypes.POINTER(EmulatedDecode)]
    lib.kvquant_emulated_rope.argtypes = [ctypes.c_int64, ctypes.c_float, ctypes.POINTER(ctypes.c_float),
                                          ctypes.POINTER(ctypes.c_float)]
    return lib


def emulated_decode(lib, query, cache, block_table, seq_lens, store, rope, scale, sms):
    """What cuda.paged_decode_attention computes, with the kernel run on the CPU; also the number of partitions."""
    lay = store.layout
    pages = cache.view(cache.shape[0], -1)
    block_table, seq_lens = block_table.int().contiguous(), seq_lens.int().contiguous()
    tables = [t.float().contiguous() for t in (store.key_scale, store.key_offset, store.key_books[1],
                                               store.value_books[1], rope.inv_freq)]
    out = torch.full_like(query, float("nan"))
    args = EmulatedDecode(
        out.data_ptr(), query.data_ptr(), query.stride(0), query.stride(1), pages.data_ptr(), pages.stride(0),
        lay.head_stride, block_table.data_ptr(), block_table.stride(0), seq_lens.data_ptr(),
        *(t.data_ptr() for t in tables), scale * rope.scaling, int(seq_lens.max()),
        (ctypes.c_int64 * 10)(*cuda._section_offsets(lay)), DTYPES[query.dtype][0], lay.head_dim, lay.bits,
        query.shape[0], query.shape[1], lay.num_kv_heads, lay.block_size, lay.key_outlier_capacity,
        lay.value_outliers_per_vector, int(store.sink), sms, 0,
    )
    assert lib.kvquant_emulated_decode(ctypes.byref(args)) == 0, "instantiation not compiled in"
    return out, args.num_partitions


@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_matches_reference(case, emulator, rng):
    q_dtype, dtype, block_size, heads, head_dim, gqa, outlier_rate, lens, rope, sms = CASES[case]
    store, cache, block_table, seq_lens, rope = _attention_setup(dtype, block_size, heads, head_dim, gqa,
                                                                 outlier_rate, lens, rope, rng)
    query = torch.randn(len(lens), heads * gqa, head_dim, generator=rng).to(q_dtype)
    scale = head_dim**-0.5
    expected = paged_decode_reference(query, cache, block_table, seq_lens, store, rope, scale)
    out, partitions = emulated_decode(emulator, query, cache, block_table, seq_lens, store, rope, scale, sms)
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[q_dtype])
    if sms > 1:
        assert partitions > 1, "the case is meant to run the split-K merge"


@pytest.mark.parametrize("rope", ROPES)
def test_emulated_rope_angles_are_exact_at_any_position(rope, emulator):
    """The query's rotation by a tile's first position: fp64 angle reduced modulo 2 pi, equal to the float64 rotation
    up to position 2**30 (on a GPU the fast sincos on [-pi, pi] adds at most 2^-21.4)."""
    r = ROPES[rope](128)
    positions = torch.tensor([0, 1, 2, 255, 4095, 32767, 131071, 1 << 20, 1 << 30])
    cos, sin = torch.empty(len(positions), 64), torch.empty(len(positions), 64)
    c, s = ctypes.c_float(), ctypes.c_float()
    for i, position in enumerate(positions.tolist()):
        for j, inv_freq in enumerate(r.inv_freq.tolist()):
            emulator.kvquant_emulated_rope(position, inv_freq, ctypes.byref(c), ctypes.byref(s))
            cos[i, j], sin[i, j] = c.value, s.value
    exact_cos, exact_sin = r.cos_sin(positions)
    torch.testing.assert_close(cos * r.scaling, exact_cos[:, :64], rtol=0, atol=3e-7)
    torch.testing.assert_close(sin * r.scaling, exact_sin[:, :64], rtol=0, atol=3e-7)
