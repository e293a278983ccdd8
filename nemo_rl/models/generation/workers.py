"""Generation over data-parallel workers: `GenerationWorkers(cfg, tokenizer_cfg, cluster)`.

The backend (`generation.backend`: `hf` or `vllm`) is one worker class per reserved slot of a
`RayVirtualCluster`, each holding a whole replica of the model. Prompts are split into
contiguous shards, one per worker, and the results concatenated in the prompts' order, so
with greedy decoding the outputs do not depend on the number of workers.
"""

from __future__ import annotations

from nemo_rl.config.eval_schema import GenerationConfig
from nemo_rl.config.schema import TokenizerConfig
from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
from nemo_rl.distributed.worker_group import RayWorkerGroup
from nemo_rl.models.generation.interfaces import GenerationBackendError, GenerationOutput


def worker_class(backend: str) -> type:
    if backend == "hf":
        from nemo_rl.models.generation.hf_worker import HfGenerationWorker

        return HfGenerationWorker
    if backend == "vllm":
        from nemo_rl.models.generation.vllm_worker import VllmGenerationWorker, require_vllm

        require_vllm()  # on the driver, before any worker starts
        return VllmGenerationWorker
    raise ValueError(f"generation.backend={backend!r}; expected 'hf' or 'vllm'")


def contiguous_shards(items: list, count: int) -> list[list]:
    """`items` in `count` contiguous runs whose lengths differ by at most one (earlier ones longer)."""
    size, extra = divmod(len(items), count)
    shards, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


class GenerationWorkers:
    """`cluster.world_size` replicas of the checkpoint, generating in parallel."""

    def __init__(self, generation_cfg: GenerationConfig, tokenizer_cfg: TokenizerConfig, cluster: RayVirtualCluster):
        if generation_cfg.backend == "vllm" and not cluster.use_gpus:
            raise GenerationBackendError("generation.backend=vllm needs GPUs (cluster.device=cuda); on CPU use generation.backend=hf")
        self.cfg = generation_cfg
        self.group = RayWorkerGroup(
            cluster,
            worker_class(generation_cfg.backend),
            init_kwargs={
                "generation_cfg": generation_cfg,
                "tokenizer_cfg": tokenizer_cfg,
                "device": "cuda" if cluster.use_gpus else "cpu",
            },
            name_prefix=f"generation-{generation_cfg.backend}",
        )
        self.world_size = self.group.world_size

    def describe(self) -> str:
        return self.group.run_all("describe")[0]

    def generate(self, prompts: list[list[int]]) -> list[GenerationOutput]:
        """One completion per prompt (token ids), in the prompts' order. Rank r samples with
        seed `generation.seed + r`; greedy decoding needs no seed."""
        futures = self.group.run_sharded_async("generate", contiguous_shards(prompts, self.world_size))
        return [output for shard in self.group.gather(futures) for output in shard]

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log P(continuation | context) for each (context ids, continuation ids)."""
        futures = self.group.run_sharded_async("loglikelihood", contiguous_shards(pairs, self.world_size))
        return [score for shard in self.group.gather(futures) for score in shard]

    def shutdown(self) -> None:
        self.group.shutdown()
