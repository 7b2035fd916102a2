"""How the C++ CPU attention kernels of ``csrc/cpu`` are built: sources, flags, the install-time extension.

setup.py loads this file by path (it imports nothing from the package), so the install-time build
(:func:`extensions`, a torch ``CppExtension``) and the just-in-time build of :mod:`kvquant_vllm.kernels.cpu` compile
the same sources with the same flags. A library is stamped with the hash of the sources it was built from
(:func:`source_hash`), so a stale prebuilt library is never loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
# ops.cpp holds the attention op, each attention_<isa>.cpp compiles its kernel for one instruction set (AMX,
# AVX512-BF16, AVX-512, AVX2, portable); store.cpp holds the store op.
SOURCES = ("ops.cpp", "attention_amx.cpp", "attention_avx512bf16.cpp", "attention_avx512.cpp", "attention_avx2.cpp",
           "attention_scalar.cpp", "store.cpp")
HEADERS = ("attention.h", "attention_kernel.h", "simd_amx.h", "simd_avx512bf16.h", "simd_avx512.h", "simd_avx2.h",
           "simd_scalar.h")
# No -march: each instruction set is enabled inside its own source, and the op picks one at run time.
# OpenMP: at::parallel_for runs on OpenMP threads in torch's CPU builds (its loop is inline in the headers).
# No contraction of products and sums into FMAs: the store rounds every operation as torch does (the kernels call
# FMAs explicitly where they want them).
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)
EXTENSION = "kvquant_vllm._cpu_kernels"  # the module name of the install-time build
SOURCE_MARKER = b"kvquant-cpu-source:"


def source_hash() -> str:
    """sha256 of the kernels' sources and headers (16 hex digits)."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((CSRC / name).read_bytes())
    return digest.hexdigest()[:16]


def hash_define() -> str:
    """The compiler flag that stamps a build with :func:`source_hash` (stringized in C++)."""
    return f"-DKVQUANT_SOURCE_HASH=h{source_hash()}"


def built_from_sources(library: Path) -> bool:
    """True when the compiled ``library`` carries the stamp of the current sources."""
    return SOURCE_MARKER + b"h" + source_hash().encode() in library.read_bytes()


def extensions() -> list:
    """The CPU kernels' extension for setup.py's ext_modules when torch is importable (pip install
    --no-build-isolation, after the dependencies), none otherwise (pip's isolated build environment: the kernels are
    then built just in time on first use). Optional: a machine whose compiler fails still installs."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return []
    root = CSRC.parents[1]
    return [cpp_extension.CppExtension(
        name=EXTENSION,
        sources=[str((CSRC / name).relative_to(root)) for name in SOURCES],
        extra_compile_args=[*CFLAGS, hash_define()],
        extra_link_args=list(LDFLAGS),
        optional=True,
    )]
