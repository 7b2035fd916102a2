"""Method names -> codecs.

Every method the harness (and later the vLLM backend) accepts is listed here, so that
an unknown name fails in one place with the list of known ones. Calibrated methods pick
the calibration whose spec they need from the ones given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvquant_vllm.quant.codec import KVCodec, Unquantized
from kvquant_vllm.quant.cq import CQCodec, CQOptions, CQSpec, CQTables
from kvquant_vllm.quant.fp8 import FP8_FORMATS, FP8Codec
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.intn import INT_BITS, IntChannelCodec, IntTokenCodec
from kvquant_vllm.quant.kivi import KIVICodec
from kvquant_vllm.quant.kvquant import (
    CalibrationSpec,
    KVQuantCalibration,
    KVQuantCodec,
    LayerCalibration,
    kvquant_methods,
)
from kvquant_vllm.quant.skvq import SKVQCodec, SKVQSpec, SKVQTables
from kvquant_vllm.quant.wkvquant import WKVQuantCodec, WKVQuantSpec, WKVQuantTables

# Uncalibrated methods; those that quantize post-RoPE keys need the model's geometry.
CodecFactory = Callable[[AttentionGeometry | None], KVCodec]

_FACTORIES: dict[str, CodecFactory] = {"fp16": lambda geo: Unquantized()}
for _b in INT_BITS:
    _FACTORIES[f"int{_b}-token"] = lambda geo, b=_b: IntTokenCodec(b)
    _FACTORIES[f"int{_b}-channel"] = lambda geo, b=_b: IntChannelCodec(b)


def _post_rope(name: str, build: Callable[[AttentionGeometry], KVCodec]) -> CodecFactory:
    """The factory of a method that quantizes keys after RoPE: its codec needs the model's geometry."""

    def make(geometry: AttentionGeometry | None) -> KVCodec:
        if geometry is None:
            raise ValueError(f"{name} quantizes keys after RoPE and needs the model's geometry")
        return build(geometry)

    return make


_FACTORIES.update({f"kivi{b}": _post_rope(f"kivi{b}", lambda geo, b=b: KIVICodec(b, geo)) for b in (2, 4)})
_FACTORIES.update(
    {f"fp8-{fmt}": _post_rope(f"fp8-{fmt}", lambda geo, fmt=fmt: FP8Codec(fmt, geo)) for fmt in FP8_FORMATS}
)


@dataclass(frozen=True)
class CalibratedMethod:
    """A method that needs a calibration of ``spec``; ``make`` builds its codec from one."""

    spec: Any
    make: Callable[[KVQuantCalibration], KVCodec]


def _calibrated_methods() -> dict[str, CalibratedMethod]:
    methods = {
        name: CalibratedMethod(options.spec, lambda cal, name=name, options=options: KVQuantCodec(name, options, cal))
        for name, options in kvquant_methods().items()
    }
    for spec in (CQSpec("cq1", channels=8), CQSpec("cq2", channels=4)):
        # The -w32 method shares its calibration: the fp16 window is a run-time choice.
        for name, options in ((spec.method, CQOptions(spec)), (f"{spec.method}-w32", CQOptions(spec, window=32))):
            methods[name] = CalibratedMethod(spec, lambda cal, name=name, options=options: CQCodec(name, options, cal))
    for spec in (SKVQSpec("skvq-k2v1.5", key_levels=4, value_levels=3), SKVQSpec("skvq-k4v4", 16, 16)):
        methods[spec.method] = CalibratedMethod(spec, lambda cal, spec=spec: SKVQCodec(spec, cal))
    spec = WKVQuantSpec("wkvquant-k4v4", bits=4)
    methods[spec.method] = CalibratedMethod(spec, lambda cal: WKVQuantCodec(spec, cal))
    return methods


_CALIBRATED = _calibrated_methods()

# Calibration file "method" header -> (spec type, per-layer tables type).
CALIBRATION_FAMILIES: dict[str, tuple[type, type]] = {
    spec.family: (spec, tables)
    for spec, tables in (
        (CalibrationSpec, LayerCalibration), (CQSpec, CQTables), (SKVQSpec, SKVQTables), (WKVQuantSpec, WKVQuantTables)
    )
}


class MissingCalibrationError(ValueError):
    """A calibrated method was asked for without a calibration of the spec it needs."""


def method_names() -> list[str]:
    """Every known method name, in registration order."""
    return [*_FACTORIES, *_CALIBRATED]


def check_method(name: str) -> None:
    """ValueError listing the known names if ``name`` is not one."""
    if name not in _FACTORIES and name not in _CALIBRATED:
        raise ValueError(f"unknown KV cache method {name!r}; known methods: {', '.join(method_names())}")


def needs_calibration(name: str) -> bool:
    check_method(name)
    return name in _CALIBRATED


def calibration_spec(name: str) -> Any:
    """The spec of the calibration that method ``name`` needs."""
    if not needs_calibration(name):
        raise ValueError(f"method {name!r} needs no calibration")
    return _CALIBRATED[name].spec


def get_codec(
    name: str, calibrations: Sequence[KVQuantCalibration] = (), geometry: AttentionGeometry | None = None
) -> KVCodec:
    """The codec for ``name``; calibrated methods take the first of ``calibrations`` that fits."""
    check_method(name)
    if name in _FACTORIES:
        return _FACTORIES[name](geometry)
    method = _CALIBRATED[name]
    for calibration in calibrations:
        if calibration.spec == method.spec:
            return method.make(calibration)
    have = "; ".join(str(c.spec) for c in calibrations) or "none given"
    raise MissingCalibrationError(
        f"method {name!r} needs a calibration file made with `kvquant-vllm calibrate MODEL "
        f"{method.spec.calibrate_flags()} --text ... --out PATH` (pass it with --calibration PATH); "
        f"calibrations given: {have}"
    )
