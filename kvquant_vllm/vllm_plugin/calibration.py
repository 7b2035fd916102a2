"""Finding and checking the calibration file of the model an engine serves."""

from __future__ import annotations

import functools
from pathlib import Path

from kvquant_vllm.calib.file import CalibrationError, default_calibration_path, read_calibration
from kvquant_vllm.quant.geometry import UnsupportedModelError, attention_geometry
from kvquant_vllm.quant.kvquant import KVQuantCalibration, kvquant_methods

SUPPORTED_HEAD_DIMS = (64, 128, 256)


def calibration_path(model: str, additional_config: dict | None) -> Path:
    """``--additional-config '{"kvquant_calibration": PATH}'``, else ``MODEL_DIR/kvquant_calibration.safetensors``."""
    explicit = (additional_config or {}).get("kvquant_calibration")
    return Path(explicit) if explicit else default_calibration_path(model)


# One read per process even though every attention layer asks.
_read = functools.cache(read_calibration)


def load_calibration(dtype: str, model: str, hf_config, additional_config: dict | None) -> KVQuantCalibration:
    """The validated calibration for serving ``model`` with cache dtype ``dtype``.

    Raises UnsupportedModelError for models KVQuant cannot serve and CalibrationError (naming the
    calibrate command) for a missing file, or one made for another model or another bit width.
    """
    geometry = attention_geometry(hf_config)
    if geometry.head_dim not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedModelError(
            f"head dim {geometry.head_dim} is not supported by --kv-cache-dtype {dtype} "
            f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
        )
    spec = kvquant_methods()[dtype].spec
    command = f"kvquant-vllm calibrate {model} {spec.calibrate_flags()}"
    path = calibration_path(model, additional_config)
    if not path.is_file():
        raise CalibrationError(
            f"--kv-cache-dtype {dtype} needs a calibration file for {model}, and {path} does not exist. "
            f"Create it with `{command}`, or point to one with "
            f"--additional-config '{{\"kvquant_calibration\": \"PATH\"}}'"
        )
    calibration = _read(path.resolve(), geometry)
    if calibration.spec != spec:
        raise CalibrationError(
            f"{path} was calibrated with `{calibration.spec.calibrate_flags()}`, but --kv-cache-dtype {dtype} "
            f"needs `{spec.calibrate_flags()}`; create it with `{command}`"
        )
    return calibration
