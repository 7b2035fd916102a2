"""How the C++ CPU attention kernels of ``csrc/cpu`` are compiled: sources and flags, shared by ``setup.py`` (the
build at install) and the just-in-time build of :mod:`kvquant_vllm.kernels.cpu`. Standard library only, so that
``setup.py`` can load this file before deciding whether torch is there to build against.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
# ops.cpp holds the torch op; each attention_<isa>.cpp compiles the kernel for one instruction set.
SOURCES = ("ops.cpp", "attention_avx512.cpp", "attention_avx2.cpp", "attention_scalar.cpp")
# No -march: each instruction set is enabled inside its own source, and the op picks one at run time.
# OpenMP: at::parallel_for runs on OpenMP threads in torch's CPU builds (its loop is inline in the headers).
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
EXTENSION = "kvquant_vllm._cpu_kernels"  # the module that setup.py builds


def source_hash() -> str:
    """Hash of every file in csrc/cpu (sources and headers): names a just-in-time build."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
