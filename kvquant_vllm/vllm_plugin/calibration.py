"""Finding and checking the calibration file of the model an engine serves, and handing it to every worker.

The process that builds the engine's config validates the file and puts its bytes into the config
(``additional_config``); vLLM hands that config to every worker, over the multiprocessing and the Ray
executors alike, so workers on other machines need no copy of the file and all decode the same tables.
Each tensor-parallel rank keeps the tables of the kv heads it holds.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

from kvquant_vllm.calib.file import CalibrationError, default_calibration_path, parse_calibration, read_calibration
from kvquant_vllm.quant.geometry import AttentionGeometry, UnsupportedModelError, attention_geometry
from kvquant_vllm.quant.kvquant import KVQuantCalibration, kvquant_methods
from kvquant_vllm.vllm_plugin.sharding import local_kv_heads

SUPPORTED_HEAD_DIMS = (64, 128, 256)
# additional_config key under which the engine's config carries the calibration file: {"path": str, "data": base64}.
SHIPPED_KEY = "kvquant_calibration_shipped"


def calibration_path(model: str, additional_config: dict | None) -> Path:
    """``--additional-config '{"kvquant_calibration": PATH}'``, else ``MODEL_DIR/kvquant_calibration.safetensors``."""
    explicit = (additional_config or {}).get("kvquant_calibration")
    return Path(explicit) if explicit else default_calibration_path(model)


# One read per process even though every attention layer asks.
_read = functools.cache(read_calibration)


@functools.cache
def _decode_shipped(path: str, data: str, geometry: AttentionGeometry) -> KVQuantCalibration:
    return parse_calibration(base64.b64decode(data), geometry, f"{path} (as shipped with the engine config)")


def load_calibration(dtype: str, model: str, hf_config, additional_config: dict | None) -> KVQuantCalibration:
    """The validated calibration for serving ``model`` with cache dtype ``dtype``: the one that ``additional_config``
    carries (see :func:`ship_calibration`), else the calibration file.

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
    shipped = (additional_config or {}).get(SHIPPED_KEY)
    if shipped:
        path = shipped["path"]
        calibration = _decode_shipped(path, shipped["data"], geometry)
    else:
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


def ship_calibration(vllm_config) -> None:
    """Validate the calibration file of a kvquant engine (errors before anything starts) and put its bytes into
    ``vllm_config.additional_config``, in the process that builds the config, for every worker to decode."""
    model, dtype = vllm_config.model_config, vllm_config.cache_config.cache_dtype
    settings = {k: v for k, v in (vllm_config.additional_config or {}).items() if k != SHIPPED_KEY}
    load_calibration(dtype, model.model, model.hf_config, settings)
    path = calibration_path(model.model, settings).resolve()
    shipped = {"path": str(path), "data": base64.b64encode(path.read_bytes()).decode("ascii")}
    # A new dict: the caller's (LLM(additional_config=...)) may serve another engine.
    vllm_config.additional_config = settings | {SHIPPED_KEY: shipped}


def rank_calibration(dtype: str, vllm_config, num_kv_heads: int) -> KVQuantCalibration:
    """The calibration of the kv heads that this worker's tensor-parallel rank holds; ``num_kv_heads``: how many
    vLLM gave the rank's attention layer."""
    model = vllm_config.model_config
    calibration = load_calibration(dtype, model.model, model.hf_config, vllm_config.additional_config)
    heads = local_kv_heads(calibration.geometry.num_kv_heads)
    if len(heads) != num_kv_heads:
        raise UnsupportedModelError(
            f"--kv-cache-dtype {dtype}: this rank's attention holds {num_kv_heads} kv heads, but vLLM's "
            f"tensor-parallel sharding gives it heads {heads.start}..{heads.stop - 1} of the model's "
            f"{calibration.geometry.num_kv_heads}; this model shards its kv heads in a way kvquant caches do not "
            "follow: use another --kv-cache-dtype or --tensor-parallel-size 1"
        )
    return calibration.kv_heads(heads)
