"""hf/ written by all ranks from their shards is the model: `from_pretrained` loads it as is and
its tensors equal the whole (gathered) model's, for FSDP (dp 2) and tensor-parallel (tp 2)
shards, in one file or split over several with an index, in the dtype asked for."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import make_batch, policy_config, save_tiny_llama
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.hf_export import INDEX_FILE, save_hf_checkpoint_sharded
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker


def _train_and_export(rank, model_dir, dtensor_cfg, hf_path, hf_dtype, max_shard_size):
    worker = DTensorPolicyWorker(policy_config(model_dir, dtensor_cfg=dtensor_cfg), seed=1, device="cpu")
    local = make_batch(0).shard_by_batch_size(worker.dp_size)[worker.dp_rank]
    worker.train(local, NLLLoss(), MicroBatchPlan(2))  # weights that differ from the checkpoint's
    if max_shard_size is None:  # the worker's own path (checkpointing.hf_dtype)
        worker.save_checkpoint(weights_path=None, hf_path=hf_path, hf_dtype=hf_dtype)
    else:
        save_hf_checkpoint_sharded(
            get_model_state_dict(worker.model),
            hf_path,
            dtype=getattr(torch, hf_dtype),
            config=worker.model.config,
            generation_config=worker.model.generation_config,
            tied_keys=worker.tied_keys,
            max_shard_size=max_shard_size,
        )
    whole = get_model_state_dict(worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    worker.shutdown()
    return whole if rank == 0 else None


# (policy.dtensor_cfg, hf dtype, max_shard_size (None: through the worker's save_checkpoint), tied)
CASES = {
    "dp2_fp32_worker_tied": ({}, "float32", None, True),
    "tp2_bf16_worker_untied": ({"tensor_parallel_size": 2}, "bfloat16", None, False),
    "dp2_index_untied": ({}, "float32", 40_000, False),
    "tp2_index_fp16_tied": ({"tensor_parallel_size": 2}, "float16", 40_000, True),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_parallel_export_loads_as_the_whole_model(tmp_path, case):
    dtensor_cfg, hf_dtype, max_shard_size, tied = CASES[case]
    model_dir = save_tiny_llama(str(tmp_path / "base"), tie_word_embeddings=tied)
    hf_path = str(tmp_path / "hf")
    whole, _ = run_ranks(2, _train_and_export, model_dir, dtensor_cfg, hf_path, hf_dtype, max_shard_size)

    assert not os.path.exists(f"{hf_path}.incomplete")
    index_path = os.path.join(hf_path, INDEX_FILE)
    if max_shard_size is None:
        assert os.listdir(hf_path).count("model.safetensors") == 1 and not os.path.exists(index_path)
    else:
        weight_map = json.load(open(index_path))["weight_map"]
        assert len(set(weight_map.values())) > 1
    dtype = getattr(torch, hf_dtype)
    loaded = AutoModelForCausalLM.from_pretrained(hf_path, dtype="auto")
    assert loaded.config.tie_word_embeddings == tied
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    got = loaded.state_dict()
    assert set(got) == set(whole)
    for name, tensor in whole.items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], tensor.to(dtype)), name
