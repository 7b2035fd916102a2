"""Kernels for kvquant pages: Triton store and attention, the CUDA C++ decode kernel, the C++ CPU attention
kernels, and the PyTorch reference they are tested against. Nothing here imports vLLM.

Which implementation the attention backend uses comes from the environment variable ``KVQUANT_KERNELS``:

    auto    (default) CUDA devices: the CUDA C++ decode kernel when it builds, else Triton; CPUs: the C++ CPU
            kernels when they build (at install or just in time), else torch with one warning
    torch   the vectorized PyTorch path everywhere
    triton  the Triton kernels (on CPU only under ``TRITON_INTERPRET=1``)
    cuda    the CUDA C++ decode kernel (the store stays Triton); an error when it is not available
    cpu     the C++ CPU kernels (store and attention); an error when they are not available
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "KVQUANT_KERNELS"
KERNEL_BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


def cuda_kernels_available() -> bool:
    """True when the CUDA C++ decode kernel can run here (it builds on first use)."""
    try:
        from kvquant_vllm.kernels import cuda
    except ImportError:
        return False
    return cuda.available()


def cpu_kernels_available() -> bool:
    """True when the C++ CPU attention kernels can run here (built at install, or just in time on first use)."""
    from kvquant_vllm.kernels import cpu

    return cpu.available()


def kernel_backend(device: torch.device | str) -> str:
    """'torch', 'triton', 'cuda' or 'cpu': the implementation that ``KVQUANT_KERNELS`` selects for ``device``."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in KERNEL_BACKENDS:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(KERNEL_BACKENDS)}")
    device_type = torch.device(device).type
    if choice == "auto":
        if device_type == "cuda":
            return "cuda" if cuda_kernels_available() else "triton"
        return "cpu" if device_type == "cpu" and cpu_kernels_available() else "torch"
    if choice == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{ENV_VAR}=triton on a CPU runs the kernels in Triton's interpreter (slow; for tests): "
                           f"set TRITON_INTERPRET=1 as well, or use {ENV_VAR}=torch")
    if choice == "cuda" and not cuda_kernels_available():
        raise RuntimeError(f"{ENV_VAR}=cuda, but the CUDA decode kernel cannot run here (it needs a CUDA GPU, "
                           f"nvcc and a CUDA build of torch); use {ENV_VAR}=triton or auto")
    if choice == "cpu" and (device_type != "cpu" or not cpu_kernels_available()):
        raise RuntimeError(f"{ENV_VAR}=cpu, but the C++ CPU kernels cannot run here (they need a CPU device and a "
                           f"C++ compiler to build them; the log says why the build failed); use {ENV_VAR}=torch")
    return choice
