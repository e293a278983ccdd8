"""Generation over Ray workers: the same greedy outputs on 1 and 2 workers; vllm refused without vLLM."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import ray

from nemo_rl.config.eval_schema import GenerationConfig
from nemo_rl.config.schema import TokenizerConfig
from nemo_rl.distributed import RayVirtualCluster, init_ray, shutdown_ray
from nemo_rl.models.generation import GenerationBackendError, GenerationWorkers, contiguous_shards
from nemo_rl.models.generation.hf_worker import HfGenerationWorker
from nemo_rl.models.generation.workers import worker_class

TINY_MODEL = str(Path(__file__).resolve().parents[4] / "assets" / "tiny-llama")


def test_contiguous_shards_keep_order_and_balance():
    assert contiguous_shards(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert contiguous_shards([1], 2) == [[1], []]
    assert sum(contiguous_shards(list(range(10)), 4), []) == list(range(10))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_is_refused_with_the_install_command():
    with pytest.raises(GenerationBackendError, match=r"generation.backend=vllm.*uv sync --extra vllm"):
        worker_class("vllm")


@pytest.fixture(scope="module")
def ray_2cpu(tmp_path_factory):
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    started_here = not ray.is_initialized()
    init_ray(str(tmp_path_factory.mktemp("ray")), num_cpus=2)
    yield
    if started_here:
        shutdown_ray()
    if saved is None:
        del os.environ["RAY_ADDRESS"]
    else:
        os.environ["RAY_ADDRESS"] = saved


@pytest.mark.ray
def test_greedy_outputs_do_not_depend_on_the_worker_count(ray_2cpu):
    cfg = GenerationConfig(model_name=TINY_MODEL, max_new_tokens=10, batch_size=2)
    tokenizer_cfg = TokenizerConfig(name=TINY_MODEL)
    prompts = [[1] + [100 + 37 * i + j for j in range(1 + i % 5)] for i in range(7)]
    in_process = HfGenerationWorker(cfg, tokenizer_cfg).generate(prompts)
    results = {}
    for count in (1, 2):
        cluster = RayVirtualCluster(1, count, use_gpus=False)
        try:
            workers = GenerationWorkers(cfg, tokenizer_cfg, cluster)
            try:
                results[count] = workers.generate(prompts)
                pairs = [(p, [5, 9]) for p in prompts]
                results[f"ll{count}"] = workers.loglikelihood(pairs)
            finally:
                workers.shutdown()
        finally:
            cluster.shutdown()
    assert [o.token_ids for o in results[1]] == [o.token_ids for o in in_process]
    assert [o.token_ids for o in results[2]] == [o.token_ids for o in in_process]
    assert results["ll2"] == pytest.approx(results["ll1"], abs=1e-5)
