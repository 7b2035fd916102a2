"""The calibration file: one safetensors file, a JSON header in its metadata, tensors per layer.

Header (metadata key ``kvquant``): format version, model name and fingerprint (layers, kv heads,
head dim, RoPE), method family and calibration spec (for KVQuant: bits, outlier fraction, Fisher
weighting, key position and granularity), and where the calibration text came from (source,
samples, length). Tensors: ``layers.{i}.{name}`` for every tensor of the family's per-layer tables
(for KVQuant: key_scale, key_offset, key_codebook, value_codebook, key_qnorm, value_qnorm).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from kvquant_vllm.fsutil import atomic_path
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.kvquant import KVQuantCalibration
from kvquant_vllm.quant.registry import CALIBRATION_FAMILIES

FORMAT_VERSION = 1
HEADER_KEY = "kvquant"
DEFAULT_FILENAME = "kvquant_calibration.safetensors"


class CalibrationError(ValueError):
    """A calibration file that is missing, corrupted, or made for another model or method."""


def default_calibration_path(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / DEFAULT_FILENAME


def write_calibration(path: str | os.PathLike, cal: KVQuantCalibration) -> Path:
    """Write ``cal`` to ``path`` atomically."""
    from safetensors.torch import save_file

    header = {
        "format_version": FORMAT_VERSION,
        "method": cal.spec.family,
        "model": cal.model_name,
        "fingerprint": cal.geometry.fingerprint(),
        "spec": asdict(cal.spec),
        **cal.info,
    }
    tensors = {
        f"layers.{i}.{name}": getattr(layer, name).float().contiguous()
        for i, layer in enumerate(cal.layers)
        for name in layer.TENSORS
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    return path


def read_calibration(path: str | os.PathLike, geometry: AttentionGeometry | None = None) -> KVQuantCalibration:
    """Read and validate a calibration file; with ``geometry``, also check it was made for that model."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist; create it with `kvquant-vllm calibrate`")
    return parse_calibration(path.read_bytes(), geometry, str(path))


def holds_calibration(path: str | os.PathLike, spec) -> bool:
    """Whether ``path`` is a readable calibration file made for ``spec`` (False for a missing, stale or other
    spec's file: the caller re-creates it)."""
    try:
        return read_calibration(path).spec == spec
    except CalibrationError:
        return False


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes: an 8-byte little-endian header length, then JSON."""
    length = int.from_bytes(data[:8], "little")
    if len(data) < 8 + length:
        raise ValueError(f"header of {length} bytes, file of {len(data)}")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def parse_calibration(data: bytes, geometry: AttentionGeometry | None = None, source: str = "calibration"
                      ) -> KVQuantCalibration:
    """Validate and decode the bytes of a calibration file (named ``source`` in errors); with ``geometry``, also
    check it was made for that model."""
    from safetensors.torch import load

    remedy = "re-create it with `kvquant-vllm calibrate MODEL (--bits B | --method NAME) --out PATH`"
    try:
        metadata = _safetensors_metadata(data)
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CalibrationError(f"calibration file {source} is corrupted or truncated ({e}); {remedy}") from e
    if HEADER_KEY not in metadata:
        raise CalibrationError(f"{source} is not a kvquant calibration file (no '{HEADER_KEY}' header); {remedy}")
    try:
        header = json.loads(metadata[HEADER_KEY])
        version = header["format_version"]
        family = header.get("method", "kvquant")
        if family not in CALIBRATION_FAMILIES:
            raise ValueError(f"unknown method {family!r}, known: {', '.join(CALIBRATION_FAMILIES)}")
        spec_type, tables_type = CALIBRATION_FAMILIES[family]
        from_header = getattr(spec_type, "from_header", None)  # a spec whose old files need defaults filled in
        spec = from_header(header["spec"]) if from_header else spec_type(**header["spec"])
        file_geo = AttentionGeometry(**header["fingerprint"])
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"{source}: malformed header ({e}); {remedy}") from e
    if version != FORMAT_VERSION:
        raise CalibrationError(
            f"{source}: calibration format version {version}, this kvquant-vllm reads version {FORMAT_VERSION}; "
            f"{remedy}"
        )
    if geometry is not None and file_geo != geometry:
        raise CalibrationError(
            f"{source} was made for model {header.get('model')!r} with {file_geo}, "
            f"but the model being used has {geometry}; calibrate this model with `kvquant-vllm calibrate`"
        )
    expected = tables_type.shapes(file_geo, spec)
    layers = []
    for i in range(file_geo.num_layers):
        fields = {}
        for name, shape in expected.items():
            key = f"layers.{i}.{name}"
            t = tensors.get(key)
            if t is None:
                raise CalibrationError(f"{source}: tensor {key} is missing; {remedy}")
            if tuple(t.shape) != shape:
                raise CalibrationError(f"{source}: tensor {key} has shape {tuple(t.shape)}, expected {shape}; {remedy}")
            if not torch.isfinite(t).all():
                raise CalibrationError(f"{source}: tensor {key} holds NaN or infinite values; {remedy}")
            fields[name] = t.float()
        layers.append(tables_type(**fields))
    info = {k: v for k, v in header.items() if k not in ("format_version", "method", "model", "fingerprint", "spec")}
    # The model's geometry carries its RoPE, which the file records by type and theta only.
    return KVQuantCalibration(spec, file_geo if geometry is None else geometry, layers, header.get("model", ""), info)
