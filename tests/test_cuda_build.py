"""The CUDA C++ decode kernel on a machine without a GPU: it compiles for sm_90 (every instantiation),
and its Python side imports, reports itself unavailable and refuses CPU tensors clearly.

Correctness and speed against the reference need a GPU: benchmarks/kernels.py runs them there.
"""

import itertools
import re
import shutil
import subprocess
import sys

import pytest
import torch

from calib_helpers import random_calibration
from kvquant_vllm.kernels import cuda
from kvquant_vllm.quant.kvquant import kvquant_methods
from kvquant_vllm.quant.pagestore import PagedKVQuant

# Mangled template arguments of the query dtypes: __half, __nv_bfloat16, float.
MANGLED_DTYPES = ("6__half", "13__nv_bfloat16", "f")


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc not found on PATH: the CUDA compile check needs the CUDA toolkit")
def test_kernel_compiles_for_sm90(tmp_path):
    # -Xptxas -v names every kernel that ptxas compiled: all (dtype, head dim, bits) instantiations must be there.
    result = subprocess.run([*cuda.check_command(tmp_path), "-Xptxas", "-v"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    compiled = set(re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", result.stderr))
    for dtype, head_dim, bits in itertools.product(MANGLED_DTYPES, cuda.HEAD_DIMS, cuda.BITS):
        assert f"_ZN7kvquant19paged_decode_kernelI{dtype}Li{head_dim}ELi{bits}EEEvNS_12DecodeParamsE" in compiled
    for dtype, head_dim in itertools.product(MANGLED_DTYPES, cuda.HEAD_DIMS):
        assert f"_ZN7kvquant26paged_decode_reduce_kernelI{dtype}Li{head_dim}EEEvNS_12DecodeParamsE" in compiled


def _inputs(head_dim: int = 64, heads: int = 2, gqa: int = 2, block_size: int = 16, seq_len: int = 20):
    rng = torch.Generator().manual_seed(0)
    cal = random_calibration(kvquant_methods()["kvquant3"].spec, rng, heads, head_dim)
    store = PagedKVQuant("kvquant3", cal, 0, block_size)
    blocks = -(-seq_len // block_size)
    return dict(
        query=torch.randn(1, heads * gqa, head_dim, dtype=torch.float16),
        cache=torch.zeros(blocks, store.layout.page_size_bytes, dtype=torch.uint8),
        block_table=torch.arange(blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        store=store,
        cos_sin_cache=torch.zeros(seq_len, head_dim, dtype=torch.float32),
        scale=head_dim ** -0.5,
    )


def test_imports_without_vllm():
    code = "import sys, kvquant_vllm.kernels.cuda; assert 'vllm' not in sys.modules, 'vllm was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_unavailable_without_gpu():
    assert cuda.available() is False


def test_cpu_tensors_fail_clearly():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cuda.paged_decode_attention(**_inputs())


@pytest.mark.parametrize("change, error", [
    (dict(head_dim=96), "head dim 96 is not supported"),
    (dict(query=torch.zeros(1, 4, 64, dtype=torch.float64)), "query must be float16, bfloat16 or float32"),
    (dict(query=torch.zeros(1, 3, 64, dtype=torch.float16)), "3 query heads are not a multiple of 2 kv heads"),
    (dict(block_table=torch.zeros(1, 2, dtype=torch.int64)), "block_table must be int32"),
    (dict(seq_lens=torch.tensor([20])), "seq_lens must be int32"),
    (dict(cos_sin_cache=torch.zeros(20, 32)), "cos_sin_cache must be float32"),
    (dict(cache=torch.zeros(2, 100, dtype=torch.uint8)), "the layout needs"),
])
def test_invalid_inputs_fail_clearly(change, error):
    inputs = _inputs(**{k: v for k, v in change.items() if k == "head_dim"})
    inputs.update({k: v for k, v in change.items() if k != "head_dim"})
    with pytest.raises((TypeError, ValueError), match=error):
        cuda.paged_decode_attention(**inputs)


def test_section_order_matches_page_layout_and_kernel():
    # The op takes the offsets as a list: the Python order, the page layout and the C++ struct must agree.
    assert cuda.SECTION_ORDER == tuple(_inputs()["store"].layout.sections())
    struct = re.search(r"struct PageSections \{(.*?)\};", (cuda.CSRC / "kvquant_decode.cuh").read_text(), re.S)
    assert tuple(re.findall(r"(\w+)[,;]", struct[1])) == cuda.SECTION_ORDER
