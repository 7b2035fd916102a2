"""Ray job entry point for KVQuant calibration.

    ray job submit --working-dir . -- python calibration/run.py calibration/configs/smollm2-135m.yaml

Inside a Ray job (RAY_ADDRESS is set) the per-layer tasks go to that cluster; run directly, a
local cluster of ``num_workers`` CPUs is started.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import yaml

from kvquant_vllm.calib.run import calibrate_model
from kvquant_vllm.quant.kvquant import CalibrationSpec

CONFIG_KEYS = {"model", "bits", "outliers", "fisher", "text", "text_file", "samples", "seq_len", "num_workers", "out"}


def load_config(path: str | Path) -> dict:
    config = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
    for key in ("model", "bits"):
        if key not in config:
            raise ValueError(f"{path}: '{key}' is required")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML file, see calibration/configs/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    spec = CalibrationSpec(
        bits=int(config["bits"]), outlier_fraction=float(config.get("outliers", 0.01)), fisher=config.get("fisher", True)
    )
    (path,) = calibrate_model(
        config["model"],
        {spec: config.get("out")},
        text=config.get("text"),
        text_file=config.get("text_file"),
        samples=int(config.get("samples", 16)),
        seq_len=int(config.get("seq_len", 2048)),
        num_workers=int(config.get("num_workers", os.cpu_count() or 1)),
        ray_address="auto" if os.environ.get("RAY_ADDRESS") else None,
    )
    print(path)


if __name__ == "__main__":
    main()
