"""vLLM integration, loaded by vLLM through the ``vllm.general_plugins`` entry point."""

from __future__ import annotations


def register() -> None:
    """Entry point for ``vllm.general_plugins``; runs in every vLLM process and must stay idempotent.

    The KV cache dtypes and the attention backend register here once they exist.
    """
