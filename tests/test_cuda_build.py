"""The CUDA C++ decode kernel on a machine without a GPU: it compiles for sm_90 (every instantiation, without
spilling much), its Python side imports, reports itself unavailable, refuses bad inputs clearly, and builds at
install time only where torch has CUDA.

The kernel's numerics are checked on the CPU in test_cuda_kernel_emulated.py; on a GPU, benchmarks/kernels.py
checks it against the reference and times it.
"""

import re
import shutil
import subprocess
import sys

import pytest
import torch

from calib_helpers import random_calibration
from kvquant_vllm.kernels import cuda, cuda_build
from kvquant_vllm.quant.kvquant import kvquant_methods
from kvquant_vllm.quant.pagestore import PagedKVQuant
from kvquant_vllm.quant.rope import Rope

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc not found on PATH: the CUDA compile check needs the CUDA toolkit")
MAX_SPILL_BYTES = 32  # ptxas spills a few registers in some instantiations; more would be a regression


@needs_nvcc
def test_one_kernel_per_query_dtype_compiles_for_sm90(tmp_path):
    """The kernel header for sm_90, one instantiation per MMA flavour (f16, bf16, 3xTF32), as the builds compile it.
    Every instantiation (27, several minutes of nvcc) compiles in `make check-cuda`."""
    source = tmp_path / "instances.cu"
    source.write_text('#include "kvquant_decode.cuh"\n' + "".join(
        f"template __global__ void kvquant::paged_decode_kernel<{t}, {d}, {b}>(const kvquant::DecodeParams);\n"
        for t, d, b in (("__half", 128, 3), ("__nv_bfloat16", 64, 2), ("float", 256, 4))))
    result = subprocess.run(["nvcc", "-arch=sm_90", *cuda_build.NVCC_FLAGS, "-Xptxas", "-v", f"-I{cuda.CSRC}",
                             "-c", str(source), "-o", str(tmp_path / "instances.o")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    resources = cuda.ptxas_resources(result.stderr)
    for dtype, head_dim, bits in ((torch.float16, 128, 3), (torch.bfloat16, 64, 2), (torch.float32, 256, 4)):
        info = resources[cuda.kernel_symbol(dtype, head_dim, bits)]
        assert info["spill_stores"] <= MAX_SPILL_BYTES, info


def test_ptxas_report_parsing():
    report = cuda.ptxas_resources(
        "ptxas info    : Compiling entry function '_ZN7kvquant1kE' for 'sm_90'\n"
        "ptxas info    : Function properties for _ZN7kvquant1kE\n"
        "    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 8 bytes cumulative stack size\n"
        "ptxas info    : Compiling entry function '_ZN7kvquant1rE' for 'sm_90'\n"
        "ptxas info    : Used 32 registers, used 1 barriers\n")
    assert report == {
        "_ZN7kvquant1kE": dict(registers=168, stack=8, spill_stores=8, spill_loads=12, static_smem=1024),
        "_ZN7kvquant1rE": dict(registers=32, stack=0, spill_stores=0, spill_loads=0, static_smem=0),
    }


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
        rope=Rope.default(head_dim, 10000.0),
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
    (dict(block_size=8), "block size that is a multiple of 16"),
    (dict(query=torch.zeros(1, 4, 64, dtype=torch.float64)), "query must be float16, bfloat16 or float32"),
    (dict(query=torch.zeros(1, 3, 64, dtype=torch.float16)), "3 query heads are not a multiple of 2 kv heads"),
    (dict(block_table=torch.zeros(1, 2, dtype=torch.int64)), "block_table must be int32"),
    (dict(seq_lens=torch.tensor([20])), "seq_lens must be int32"),
    (dict(rope=torch.zeros(20, 64)), "rope must be a kvquant_vllm.quant.rope.Rope"),
    (dict(rope=Rope.default(128, 10000.0)), "the RoPE rotates 128 channels, the pages hold 64"),
    (dict(cache=torch.zeros(2, 100, dtype=torch.uint8)), "the layout needs"),
    (dict(cache=torch.zeros(2, 2, 4000, dtype=torch.uint8)[:, :, :3000]), "the kvquant cache must hold each page contiguously"),
])
def test_invalid_inputs_fail_clearly(change, error):
    inputs = _inputs(**{k: v for k, v in change.items() if k in ("head_dim", "block_size")})
    inputs.update({k: v for k, v in change.items() if k not in ("head_dim", "block_size")})
    with pytest.raises((TypeError, ValueError), match=error):
        cuda.paged_decode_attention(**inputs)


def test_misaligned_pages_fail_clearly():
    inputs = _inputs()
    size = inputs["store"].layout.page_size_bytes
    inputs["cache"] = torch.zeros(2 * size + 8, dtype=torch.uint8)[8:].view(2, size)
    with pytest.raises(ValueError, match="16-byte aligned"):
        cuda.paged_decode_attention(**inputs)


def test_section_order_matches_page_layout_and_kernel():
    # The op takes the offsets as a list: the Python order, the page layout and the C++ struct must agree.
    assert cuda.SECTION_ORDER == tuple(_inputs()["store"].layout.sections())
    struct = re.search(r"struct PageSections \{(.*?)\};", (cuda.CSRC / "kvquant_decode.cuh").read_text(), re.S)
    assert tuple(re.findall(r"(\w+)[,;]", struct[1])) == cuda.SECTION_ORDER


def test_no_install_time_build_without_cuda_torch():
    """On a CPU torch setup.py declares no extension (pip install -e . builds no CUDA), and no prebuilt library
    is found, so a CUDA machine would build the kernel just in time."""
    if torch.version.cuda is not None:
        pytest.skip("checks a CPU build of torch")
    assert cuda_build.extensions() == []
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=cuda.CSRC.parent, capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stdout.strip() == "kvquant-vllm", result.stderr
    assert cuda.installed_library() is None


def test_prebuilt_library_must_match_the_sources(tmp_path):
    library = tmp_path / "lib.so"
    library.write_bytes(b"\0ELF..." + cuda_build.SOURCE_MARKER + b"h" + cuda_build.source_hash().encode() + b"\0")
    assert cuda_build.built_from_sources(library)
    library.write_bytes(b"\0ELF..." + cuda_build.SOURCE_MARKER + b"h0123456789abcdef\0")
    assert not cuda_build.built_from_sources(library)
    assert cuda_build.hash_define() == f"-DKVQUANT_SOURCE_HASH=h{cuda_build.source_hash()}"
