"""Layouts refused before any worker starts, naming the number that fails; the tensor-parallel
plan each supported family gets (from its transformers config), and those refused."""

from __future__ import annotations

import pytest
import torch
from tests.unit.models.policy.policy_test_utils import policy_config, save_tiny_llama
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from nemo_rl.config import ConfigError
from nemo_rl.models.parallelize import check_parallel_layout, tensor_parallel_plan, tensor_parallel_problem
from nemo_rl.models.tensor_parallel_styles import PerHeadReplicated

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=32)


@pytest.mark.parametrize(
    "heads, kv_heads, vocab, tp, refused",
    [
        (4, 2, 128, 3, "policy.dtensor_cfg.tensor_parallel_size=3 does not divide the model's num_attention_heads=4"),
        (4, 2, 128, 4, "policy.dtensor_cfg.tensor_parallel_size=4 does not divide the model's num_key_value_heads=2"),
        (8, 8, 130, 4, "policy.dtensor_cfg.tensor_parallel_size=4 does not divide the model's vocab_size=130"),
        (4, 2, 128, 2, None),
    ],
)
def test_tensor_parallel_problem_names_the_number(heads, kv_heads, vocab, tp, refused):
    config = LlamaConfig(num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, **TINY)
    assert tensor_parallel_problem(config, tp) == refused


def test_the_layout_is_checked_from_the_model_config(tmp_path):
    model_dir = save_tiny_llama(str(tmp_path / "model"))  # 4 heads, 2 KV heads, vocabulary 128
    check_parallel_layout(policy_config(model_dir, dtensor_cfg={"tensor_parallel_size": 2}))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=4 does not divide the model's num_key_value_heads=2"):
        check_parallel_layout(policy_config(model_dir, dtensor_cfg={"tensor_parallel_size": 4}))


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config, MistralConfig, Gemma2Config])
def test_declared_plans_become_colwise_and_rowwise_styles(config_class):
    model = _meta_model(config_class(num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **TINY))
    plan = tensor_parallel_plan(model, sequence_parallel=False)
    assert isinstance(plan["model.layers.*.self_attn.q_proj"], ColwiseParallel)
    assert isinstance(plan["model.layers.*.mlp.down_proj"], RowwiseParallel)
    assert isinstance(plan["model.embed_tokens"], RowwiseParallel)
    # vocabulary-parallel logits, left sharded for loss_parallel
    head = plan["lm_head"]
    assert isinstance(head, ColwiseParallel) and head.use_local_output is False
    sp_plan = tensor_parallel_plan(model, sequence_parallel=True)
    for norm in ("model.norm", "model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm"):
        assert isinstance(sp_plan[norm], SequenceParallel), norm


@pytest.mark.parametrize("config_class", [Qwen3Config, Gemma3TextConfig])
def test_per_head_norms_are_replicated_over_the_group(config_class):
    model = _meta_model(config_class(num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128, **TINY))
    plan = tensor_parallel_plan(model, sequence_parallel=False)
    for norm in ("q_norm", "k_norm"):
        assert isinstance(plan[f"model.layers.*.self_attn.{norm}"], PerHeadReplicated)
    assert isinstance(plan["model.layers.*.self_attn.q_proj"], ColwiseParallel)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_fused_projections_gather_their_outputs_whole(sequence_parallel):
    """Phi-3's qkv_proj / gate_up_proj: weight rows split, output gathered back to the fused
    order; o_proj / down_proj take that whole input and split it themselves."""
    config = Phi3Config(num_attention_heads=4, num_key_value_heads=2, vocab_size=128, pad_token_id=0, **TINY)
    plan = tensor_parallel_plan(_meta_model(config), sequence_parallel=sequence_parallel)
    for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        style = plan[f"model.layers.*.{fused}"]
        assert isinstance(style, ColwiseParallel) and style.output_layouts == (Replicate(),), fused
    for after in ("self_attn.o_proj", "mlp.down_proj"):
        style = plan[f"model.layers.*.{after}"]
        assert isinstance(style, RowwiseParallel) and style.input_layouts == (Replicate(),), after
        assert style.output_layouts == ((Shard(1),) if sequence_parallel else (Replicate(),)), after


def test_unknown_plan_entries_are_refused_naming_them():
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **TINY)
    config.base_model_tp_plan = {"layers.*.mlp.gate_proj": "packed_colwise"}
    with pytest.raises(ValueError, match=r"plan entries .*gate_proj.*packed_colwise.*custom_parallel_plan"):
        tensor_parallel_plan(_meta_model(config), sequence_parallel=False)


def test_policy_sends_each_data_parallel_shard_to_its_whole_tensor_parallel_group():
    from nemo_rl.data.batched_data_dict import BatchedDataDict
    from nemo_rl.models.policy.lm_policy import Policy

    policy = object.__new__(Policy)  # only the split: no workers
    policy.world_size, policy.group_size, policy.dp_size = 4, 2, 2
    policy.dp_rank_of_worker = [0, 0, 1, 1]  # what the DTensor workers report (TP 2)
    batch = BatchedDataDict(input_ids=torch.arange(8)[:, None])
    shards = policy._shards(batch)
    rows = [s["input_ids"][:, 0].tolist() for s in shards]
    assert rows == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]
    # Megatron's rank order (tp-cp-dp-pp) under PP 2: the data-parallel replicas alternate.
    policy.dp_rank_of_worker = [0, 1, 0, 1]
    rows = [s["input_ids"][:, 0].tolist() for s in policy._shards(batch)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]]


PLAN = {"model.layers.*.mlp.down_proj": RowwiseParallel()}


def test_custom_parallel_plan_is_imported_by_dotted_path_or_refused_naming_the_key():
    from nemo_rl.models.parallelize import load_parallel_plan

    model = _meta_model(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **TINY))
    assert load_parallel_plan(f"{__name__}.PLAN", model, sequence_parallel=False) is PLAN
    with pytest.raises(ValueError, match=r"custom_parallel_plan='no_such_module.PLAN': cannot import it"):
        load_parallel_plan("no_such_module.PLAN", model, sequence_parallel=False)
    with pytest.raises(ValueError, match=r"custom_parallel_plan=.*TINY.*expected a dict of module-name patterns"):
        load_parallel_plan(f"{__name__}.TINY", model, sequence_parallel=False)


def _trainable_after_sequence_parallel(rank: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh

    from nemo_rl.config.schema import LoRAConfig
    from nemo_rl.models.lora import apply_lora
    from nemo_rl.models.parallelize import apply_tensor_parallel

    torch.distributed.init_process_group("gloo")
    model = AutoModelForCausalLM.from_config(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **TINY))
    apply_lora(model, LoRAConfig(enabled=True, dim=2, alpha=4, target_modules=["q_proj", "down_proj"]))
    mesh = init_device_mesh("cpu", (1,))
    apply_tensor_parallel(model, mesh, tensor_parallel_plan(model, sequence_parallel=True))
    trainable = sorted(name for name, param in model.named_parameters() if param.requires_grad)
    torch.distributed.destroy_process_group()
    return trainable


def test_frozen_weights_stay_frozen_under_sequence_parallelism():
    """torch's SequenceParallel re-creates the norms' weights as trainable parameters; under LoRA
    they must stay frozen, or the norms train too (the TP + SP + LoRA run would differ from one
    process)."""
    from tests.unit.distributed_helpers import run_ranks

    (trainable,) = run_ranks(1, _trainable_after_sequence_parallel)
    assert trainable == sorted(
        f"model.layers.0.{module}.{adapter}.weight"
        for module in ("self_attn.q_proj", "mlp.down_proj")
        for adapter in ("lora_A", "lora_B")
    )
