"""How the CUDA decode kernel of ``csrc/`` is built: sources, flags, the install-time extension.

setup.py loads this file by path (it imports nothing from the package), so the install-time build
(:func:`extensions`, a torch ``CUDAExtension`` as vLLM builds its csrc) and the just-in-time build of
:mod:`kvquant_vllm.kernels.cuda` compile the same sources with the same flags. A library is stamped with the hash
of the sources it was built from (:func:`source_hash`), so a stale prebuilt library is never loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCE = CSRC / "kvquant_decode.cu"
HEADERS = (CSRC / "kvquant_decode.cuh", CSRC / "kvquant_ptx.cuh")
EXTENSION = "kvquant_vllm._kvquant_decode"  # the module name of the install-time build
# nvcc flags of every build and of the compile check, besides the architecture.
NVCC_FLAGS = ("-O3", "-std=c++20", "--expt-relaxed-constexpr")
SOURCE_MARKER = b"kvquant-decode-source:"


def source_hash() -> str:
    """sha256 of the kernel's sources (16 hex digits)."""
    digest = hashlib.sha256()
    for path in (SOURCE, *HEADERS):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def hash_define() -> str:
    """The compiler flag that stamps a build with :func:`source_hash` (an identifier, stringized in C++: no quotes
    to survive the shells of the build tools)."""
    return f"-DKVQUANT_SOURCE_HASH=h{source_hash()}"


def built_from_sources(library: Path) -> bool:
    """True when the compiled ``library`` carries the stamp of the current sources."""
    return SOURCE_MARKER + b"h" + source_hash().encode() in library.read_bytes()


def extensions() -> list:
    """The CUDA extension for setup.py's ext_modules: built when torch is a CUDA build and nvcc is found, none
    otherwise (a CPU torch; the kernel is then JIT-built on first use where CUDA appears). Archs: torch's
    TORCH_CUDA_ARCH_LIST, else those of the visible GPUs."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # an isolated build environment without torch: nothing to build against
        return []
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:  # CUDA_HOME: where torch found nvcc
        return []
    root = CSRC.parent
    return [cpp_extension.CUDAExtension(
        name=EXTENSION,
        sources=[str(SOURCE.relative_to(root))],
        extra_compile_args={"cxx": ["-O3", "-std=c++20", hash_define()], "nvcc": [*NVCC_FLAGS, hash_define()]},
    )]
