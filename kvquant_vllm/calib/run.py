"""Calibration driver: collect activations once, calibrate every layer as a Ray task, write the file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from kvquant_vllm.calib.collect import LayerActivations, collect_activations
from kvquant_vllm.calib.file import default_calibration_path, holds_calibration, write_calibration
from kvquant_vllm.calib.layer import calibrate_layer
from kvquant_vllm.quant.geometry import AttentionGeometry, attention_geometry
from kvquant_vllm.quant.kvquant import CalibrationSpec, KVQuantCalibration, LayerCalibration

logger = logging.getLogger(__name__)


def calibrate_layers(
    activations: list[LayerActivations],
    specs: list[CalibrationSpec],
    geometry: AttentionGeometry,
    positions: torch.Tensor,
    num_workers: int = 0,
    ray_address: str | None = None,
) -> dict[CalibrationSpec, list[LayerCalibration]]:
    """Every layer's calibration for every spec.

    ``num_workers=0`` and no ``ray_address`` runs inline; otherwise one Ray task per (spec, layer),
    on the cluster at ``ray_address`` (``auto``: the one this process runs in) or on a local cluster
    of ``num_workers`` CPUs started for the job. Each layer's activations are shipped once.
    """
    jobs = [(spec, i) for spec in specs for i in range(len(activations))]
    if num_workers == 0 and ray_address is None:
        results = [
            calibrate_layer(activations[i], spec, geometry, positions, seed=i)
            for spec, i in tqdm(jobs, desc="calibrating layers")
        ]
    else:
        results = _run_on_ray(jobs, activations, geometry, positions, num_workers, ray_address)
    by_spec: dict[CalibrationSpec, list[LayerCalibration]] = {spec: [] for spec in specs}
    for (spec, _), layer in zip(jobs, results):
        by_spec[spec].append(layer)
    return by_spec


def _run_on_ray(jobs, activations, geometry, positions, num_workers, ray_address) -> list[LayerCalibration]:
    import ray

    started = not ray.is_initialized()
    if started:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_workers, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(calibrate_layer)
        positions_ref = ray.put(positions)
        act_refs = [ray.put(act) for act in activations]
        refs = [task.remote(act_refs[i], spec, geometry, positions_ref, seed=i) for spec, i in jobs]
        pending = list(refs)
        with tqdm(total=len(refs), desc=f"calibrating layers (Ray, {len(refs)} tasks)") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)
    finally:
        if started:
            ray.shutdown()


def calibrate_model(
    model: str,
    specs: dict[CalibrationSpec, str | Path | None],
    text: str | None = None,
    text_file: str | None = None,
    samples: int = 16,
    seq_len: int = 2048,
    num_workers: int = 0,
    ray_address: str | None = None,
    sink_tokens: int = 1,
) -> list[Path]:
    """Calibrate ``model`` (bundled name or model directory) for every spec (KVQuant's or another
    calibrated method's) and write one file per spec.

    ``specs`` maps each spec to its output path (None: ``MODEL_DIR/kvquant_calibration.safetensors``).
    ``text``: a calibration text (:mod:`kvquant_vllm.calib.text`; None with no ``text_file``: the recommended
    mix). Activations are collected once and shared by all specs. Returns the paths written.
    """
    from kvquant_vllm.calib.text import calibration_windows
    from kvquant_vllm.eval.perplexity import load_eval_model
    from kvquant_vllm.models import resolve_model

    for spec in specs:
        if not isinstance(spec, CalibrationSpec):
            continue
        if spec.bits not in (2, 3, 4):
            raise ValueError(f"--bits must be 2, 3 or 4, got {spec.bits}")
        if not 0 <= spec.outlier_fraction < 0.5:
            raise ValueError(f"--outliers must be a fraction in [0, 0.5), got {spec.outlier_fraction}")
        if not 0 < spec.key_threshold_share <= 1:
            raise ValueError(f"--key-threshold-share must be in (0, 1], got {spec.key_threshold_share}")
    model_dir = resolve_model(model)
    hf_model, tokenizer = load_eval_model(model_dir)
    geometry = attention_geometry(hf_model.config)
    windows, text = calibration_windows(tokenizer, text, text_file, samples, seq_len)
    if windows.shape[0] < samples:
        logger.warning("%s holds only %d windows of %d tokens; calibrating on those", text, windows.shape[0], seq_len)
    activations = collect_activations(hf_model, windows, skip_tokens=sink_tokens)
    del hf_model
    positions = torch.arange(sink_tokens, seq_len).repeat(windows.shape[0])
    info = {"text": text, "samples": int(windows.shape[0]), "seq_len": seq_len, "sink_tokens": sink_tokens}
    calibrated = calibrate_layers(activations, list(specs), geometry, positions, num_workers, ray_address)
    written = []
    for spec, out in specs.items():
        layers = calibrated[spec]
        path = Path(out) if out else default_calibration_path(model_dir)
        write_calibration(path, KVQuantCalibration(spec, geometry, layers, Path(model).name, info))
        logger.info("wrote %s (%s)", path, spec)
        written.append(path)
    return written


def cached_calibrations(
    model: str, specs: list, text: str, samples: int, seq_len: int, num_workers: int = 0,
) -> dict:
    """Calibration files of ``model`` for ``specs`` on ``text`` (samples x seq_len tokens), in the cache folder
    ($KVQUANT_CACHE/calibrations/MODEL/), made in one collection pass for those not there yet (or made by an
    older version for another spec): spec -> path."""
    from kvquant_vllm.models import cache_dir

    folder = cache_dir() / "calibrations" / Path(model).name
    paths = {
        spec: folder / f"{text.replace(':', '-')}-{samples}x{seq_len}-"
        f"{spec.calibrate_flags().replace('--', '').replace(' ', '')}.safetensors"
        for spec in sorted(set(specs), key=str)
    }
    missing = {spec: path for spec, path in paths.items() if not holds_calibration(path, spec)}
    if missing:
        calibrate_model(model, missing, text=text, samples=samples, seq_len=seq_len, num_workers=num_workers)
    return paths
