"""Generation workers for evaluation: `hf` (transformers' generate, CPU or GPU) and `vllm` (GPUs).

    workers = GenerationWorkers(cfg.generation, cfg.tokenizer, cluster)
    outputs = workers.generate(prompt_token_ids)         # list[GenerationOutput], in order
    scores = workers.loglikelihood([(context_ids, continuation_ids), ...])

See docs/eval.md.
"""

from nemo_rl.models.generation.interfaces import GenerationBackendError, GenerationOutput, cut_at_stop
from nemo_rl.models.generation.workers import GenerationWorkers, contiguous_shards

__all__ = ["GenerationBackendError", "GenerationOutput", "GenerationWorkers", "contiguous_shards", "cut_at_stop"]
