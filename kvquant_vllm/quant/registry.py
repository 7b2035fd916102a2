"""Method names -> codecs.

Every method the harness (and later the vLLM backend) accepts is listed here, so that
an unknown name fails in one place with the list of known ones. Calibrated methods pick
the calibration whose spec they need from the ones given.
"""

from __future__ import annotations

from typing import Callable, Sequence

from kvquant_vllm.quant.codec import KVCodec, Unquantized
from kvquant_vllm.quant.intn import INT_BITS, IntChannelCodec, IntTokenCodec
from kvquant_vllm.quant.kvquant import KVQuantCalibration, KVQuantCodec, kvquant_methods

CodecFactory = Callable[[], KVCodec]

_FACTORIES: dict[str, CodecFactory] = {"fp16": Unquantized}
for _b in INT_BITS:
    _FACTORIES[f"int{_b}-token"] = lambda b=_b: IntTokenCodec(b)
    _FACTORIES[f"int{_b}-channel"] = lambda b=_b: IntChannelCodec(b)

_CALIBRATED = kvquant_methods()


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


def get_codec(name: str, calibrations: Sequence[KVQuantCalibration] = ()) -> KVCodec:
    """The codec for ``name``; calibrated methods take the first of ``calibrations`` that fits."""
    check_method(name)
    if name in _FACTORIES:
        return _FACTORIES[name]()
    options = _CALIBRATED[name]
    for calibration in calibrations:
        if calibration.spec == options.spec:
            return KVQuantCodec(name, options, calibration)
    have = "; ".join(str(c.spec) for c in calibrations) or "none given"
    raise MissingCalibrationError(
        f"method {name!r} needs a calibration file made with `kvquant-vllm calibrate MODEL "
        f"{options.spec.calibrate_flags()} --text ... --out PATH` (pass it with --calibration PATH); "
        f"calibrations given: {have}"
    )
