"""Tensor and pipeline parallelism on vLLM's CPU platform, whatever the cache dtype.

vLLM 0.32 on CPU refuses ``distributed_executor_backend="ray"`` ("current platform cpu does not support ray"),
and its eager pipeline stages after the first fail their first step (see
:class:`~kvquant_vllm.vllm_plugin.cpu_worker.PipelineCPUWorker`). Both are what a CPU machine needs to run the
layouts a kvquant cache is served in on GPUs (``--tensor-parallel-size``, ``--pipeline-parallel-size``, Ray
across machines), so the plugin fills them in:

- Ray: the executor places one worker per device that Ray schedules (``ray_device_key``) and asks Ray which
  accelerator each worker got. On CPU a worker's device is a CPU slot: the placement group gets one
  ``{"CPU": 1}`` bundle per rank, the workers run in those bundles and report no accelerator ids (the CPU
  worker binds its threads from ``VLLM_CPU_OMP_THREADS_BIND`` by local rank, as under the multiprocessing
  executor). vLLM's default Ray executor (V2) only.
- Pipeline stages: engines with more than one stage use the CPU worker that allocates the stage's input
  buffers.
"""

from __future__ import annotations

import ray
from vllm.platforms import current_platform
from vllm.v1.executor import ray_executor_v2
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

RAY_RESOURCE = "CPU"
CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
PIPELINE_CPU_WORKER = "kvquant_vllm.vllm_plugin.cpu_worker.PipelineCPUWorker"


class CpuRayWorkerProc(RayWorkerProc):
    """vLLM's Ray worker, placed in a CPU bundle: it has no accelerator ids to report."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), []


def _actor_resources() -> dict:
    # The bundle reserves the rank's CPU; Ray takes num_cpus only as its own argument, which vLLM sets to 0.
    return {}


def enable_ray_executor() -> None:
    """Let vLLM's Ray executor run on the CPU platform (no-op on any other platform); idempotent."""
    if not current_platform.is_cpu():
        return
    type(current_platform).ray_device_key = RAY_RESOURCE
    ray_executor_v2.RayWorkerProc = CpuRayWorkerProc
    RayExecutorV2._get_actor_resource_kwargs = staticmethod(_actor_resources)


def use_pipeline_worker(vllm_config) -> None:
    """After the CPU platform has chosen its worker: the pipeline-stage worker for engines with several stages."""
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1 and parallel.worker_cls == CPU_WORKER:
        parallel.worker_cls = PIPELINE_CPU_WORKER
