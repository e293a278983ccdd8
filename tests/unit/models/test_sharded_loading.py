"""Each rank reads only its shards of the HF weights, and the loaded model is the HF model.

Two ranks, data-parallel (FSDP shards dim 0) and tensor-parallel (heads, vocabulary): every
parameter's local shard equals the matching slice of `from_pretrained`'s tensor exactly, the
buffers (rotary inv_freq) equal the HF model's, tied weights stay one parameter, and the bytes
a rank reads are about half the checkpoint with no tensor read whole unless it is replicated.
"""

from __future__ import annotations

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import policy_config, save_tiny_llama
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker
from nemo_rl.models.sharded_loading import build_meta_model, load_hf_shards, local_slice
from nemo_rl.utils.hf_config import load_hf_config


def _load(rank, model_dir, dtensor_cfg):
    worker = DTensorPolicyWorker(policy_config(model_dir, dtensor_cfg=dtensor_cfg), seed=1, device="cpu")
    model = worker.model
    shards = {}
    for name, param in model.named_parameters():
        offset, shape = local_slice(param)
        local = param.to_local() if isinstance(param, DTensor) else param
        shards[name] = (offset, shape, local.detach().clone(), tuple(param.shape))
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    report = worker.load_report
    result = {
        "shards": shards,
        "buffers": buffers,
        "tied": head.weight is embed.weight,
        "slices": report.slices,
        "bytes_read": report.bytes_read,
        "checkpoint_bytes": report.checkpoint_bytes,
    }
    worker.shutdown()
    return result


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("hf")), tie_word_embeddings=request.param)


@pytest.mark.parametrize("dtensor_cfg", [{}, {"tensor_parallel_size": 2}], ids=["dp2", "tp2"])
def test_each_rank_loads_exactly_its_shards(model_dir, dtensor_cfg):
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    want = dict(reference.named_parameters())
    results = run_ranks(2, _load, model_dir, dtensor_cfg)
    for rank, got in enumerate(results):
        assert set(got["shards"]) == set(want)
        assert got["tied"] == reference.config.tie_word_embeddings
        for name, (offset, shape, local, full_shape) in got["shards"].items():
            expected = want[name].detach()[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            assert full_shape == tuple(want[name].shape), name
            assert torch.equal(local, expected), f"rank {rank}: {name}"
        for name, buf in reference.named_buffers():
            assert torch.equal(got["buffers"][name], buf), name
        # Only its slices: about half the checkpoint, and no tensor of the sharded matrices whole.
        assert got["bytes_read"] < 0.6 * got["checkpoint_bytes"]
        sharded = [n for n in got["slices"] if n.endswith(("q_proj.weight", "up_proj.weight", "embed_tokens.weight"))]
        assert sharded
        for name in sharded:
            assert got["slices"][name][1] != tuple(want[name].shape), f"rank {rank} read all of {name}"
    # Together the two ranks cover every element of each (sharded) parameter once.
    for name in want:
        rows = sorted((r["shards"][name][0], r["shards"][name][1]) for r in results)
        if rows[0] != rows[1]:
            assert sum(torch.Size(shape).numel() for _, shape in rows) == want[name].numel(), name


def test_missing_weight_is_refused_by_name(tmp_path):
    model_dir = save_tiny_llama(str(tmp_path), tie_word_embeddings=False)
    from safetensors.torch import load_file, save_file

    path = f"{model_dir}/model.safetensors"
    tensors = load_file(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    model = build_meta_model(model_dir, config=load_hf_config(model_dir))
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        load_hf_shards(model, model_dir, device="cpu")


def test_meta_build_draws_no_random_numbers(tmp_path):
    model_dir = save_tiny_llama(str(tmp_path))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model = build_meta_model(model_dir, config=load_hf_config(model_dir))
    assert torch.equal(before, torch.get_rng_state())
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


def test_lora_adapters_are_those_of_a_loaded_model(tmp_path):
    """The adapters drawn after loading from the saved RNG state equal `apply_lora`'s on the
    `from_pretrained` model (so LoRA runs repeat the earlier whole-model loading exactly)."""
    from nemo_rl.config.schema import LoRAConfig
    from nemo_rl.models.lora import apply_lora

    model_dir = save_tiny_llama(str(tmp_path))
    lora_cfg = LoRAConfig(enabled=True, dim=4, alpha=8, lora_A_init="uniform")
    torch.manual_seed(7)
    want = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_lora(want, lora_cfg)

    torch.manual_seed(7)
    got = build_meta_model(model_dir, config=load_hf_config(model_dir))
    rng_state = torch.get_rng_state()
    targets = apply_lora(got, lora_cfg)
    load_hf_shards(got, model_dir, device="cpu", lora_targets=targets, lora_rng_state=rng_state)

    want_params = dict(want.named_parameters())
    assert set(dict(got.named_parameters())) == set(want_params)
    assert any(".lora_A." in name for name in want_params)
    for name, param in got.named_parameters():
        assert torch.equal(param, want_params[name]), name
    assert got.get_output_embeddings().weight is got.get_input_embeddings().weight
