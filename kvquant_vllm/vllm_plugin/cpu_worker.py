"""vLLM's CPU worker for pipeline stages that run eagerly (imported by vLLM's workers only, by qualified name)."""

from __future__ import annotations

from vllm.distributed.parallel_state import get_pp_group
from vllm.v1.worker.cpu_worker import CPUWorker


class PipelineCPUWorker(CPUWorker):
    """vLLM 0.32's CPU model runner allocates the buffers in which a pipeline stage receives the previous stage's
    hidden states (``intermediate_tensors``) only in its warm-up run, which eager execution skips, so every stage
    but the first fails its first step (``assert self.intermediate_tensors is not None``). This worker allocates
    them once the model is loaded, as that warm-up run does."""

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        super().load_model(load_dummy_weights=load_dummy_weights)
        runner = self.model_runner
        if not get_pp_group().is_first_rank and runner.intermediate_tensors is None:
            runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
