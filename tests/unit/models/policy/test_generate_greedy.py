"""DTensorPolicyWorker.generate_greedy on 2 gloo ranks equals single-process Hugging Face
`generate(do_sample=False)` on the same weights.

The model's end-of-sequence token is chosen so that rank 0's first prompt stops after a few
tokens while rank 1 goes on: the ranks stop at different times, and still run the same number
of forwards (each one all-gathers the FSDP shards; a mismatch would hang or fail).
"""

from __future__ import annotations


import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import VOCAB, policy_config, save_tiny_llama
from transformers import AutoModelForCausalLM

from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

MAX_NEW_TOKENS = 10
WORLD_SIZE = 2


def _prompts() -> list[list[int]]:
    """5 prompts of 2-9 tokens (padded to 6 rows for 2 ranks: the last row is padding)."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, 10, (5,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _prompt_shards(prompts: list[list[int]]) -> list[BatchedDataDict]:
    batch = BatchedDataDict(
        input_ids=torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in prompts], batch_first=True),
        input_lengths=torch.tensor([len(p) for p in prompts]),
    )
    return batch.pad_batch_to_multiple(WORLD_SIZE).shard_by_batch_size(WORLD_SIZE)


def _reference(model, prompts: list[list[int]], eos: int | None) -> list[list[int]]:
    """Hugging Face greedy decoding, one prompt at a time, new tokens up to and including eos."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=eos, pad_token_id=0,
        )
        out.append(generated[0, len(prompt) :].tolist())
    return out


def _generate_on_rank(rank: int, model_dir: str) -> list[list[int]]:
    worker = DTensorPolicyWorker(policy_config(model_dir), seed=1, device="cpu")
    shard = _prompt_shards(_prompts())[rank]
    got = worker.generate_greedy(shard, max_new_tokens=MAX_NEW_TOKENS)
    worker.shutdown()
    return got


@pytest.fixture(scope="module")
def model_and_eos(tmp_path_factory):
    """The tiny Llama saved with an eos that ends rank 0's first continuation early."""
    model_dir = save_tiny_llama(str(tmp_path_factory.mktemp("generate_greedy") / "tiny_llama"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = _prompts()
    without_eos = _reference(model, prompts, eos=None)
    eos = without_eos[0][2]
    model.generation_config.eos_token_id = eos
    model.save_pretrained(model_dir)
    return model_dir, eos


def test_two_ranks_generate_what_single_process_hf_generates(model_and_eos):
    model_dir, eos = model_and_eos
    prompts = _prompts()
    per_rank = run_ranks(WORLD_SIZE, _generate_on_rank, model_dir)
    assert [len(r) for r in per_rank] == [3, 3]  # 5 prompts + 1 padding row
    got = (per_rank[0] + per_rank[1])[: len(prompts)]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = _reference(model, prompts, eos=eos)
    assert got == want
    # the ranks stopped at different times: rank 0's first prompt at its eos, rank 1 later
    assert len(want[0]) <= 3 and want[0][-1] == eos
    assert max(len(w) for w in want[3:]) > len(want[0])
