"""Keep the calibration file that lives beside a model's weights out of vLLM's weight loading.

vLLM loads every ``*.safetensors`` of a model directory that has no weight index (single-file
checkpoints such as SmolLM2), which would include ``kvquant_calibration.safetensors``.
"""

from __future__ import annotations

import os

from kvquant_vllm.calib.file import DEFAULT_FILENAME


def skip_calibration_file() -> None:
    import vllm.model_executor.model_loader.default_loader as default_loader

    original = default_loader.filter_duplicate_safetensors_files
    if getattr(original, "_kvquant", False):
        return

    def filter_duplicate_safetensors_files(files: list[str], folder: str, index_file: str) -> list[str]:
        return [f for f in original(files, folder, index_file) if os.path.basename(f) != DEFAULT_FILENAME]

    filter_duplicate_safetensors_files._kvquant = True
    default_loader.filter_duplicate_safetensors_files = filter_duplicate_safetensors_files
