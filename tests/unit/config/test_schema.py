"""Schema refinements: the scheduler's two forms, data.default, cross-section checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from nemo_rl.config.schema import PolicyConfig, SchedulerEntry, SchedulerMilestones

REPO = Path(__file__).resolve().parents[3]

POLICY = {
    "model_name": "m",
    "tokenizer": {"name": "m"},
    "train_global_batch_size": 4,
    "train_micro_batch_size": 1,
    "max_total_sequence_length": 64,
}


def policy(**changes) -> PolicyConfig:
    return PolicyConfig.model_validate({**POLICY, **changes})


def test_scheduler_list_form_with_milestones():
    cfg = policy(
        scheduler=[
            {"name": "torch.optim.lr_scheduler.LinearLR", "kwargs": {"start_factor": 0.1}},
            {"name": "torch.optim.lr_scheduler.ConstantLR"},
            {"milestones": [10]},
        ]
    )
    entries, milestones = cfg.scheduler_entries()
    assert [e.name for e in entries] == [
        "torch.optim.lr_scheduler.LinearLR",
        "torch.optim.lr_scheduler.ConstantLR",
    ]
    assert entries[0].kwargs == {"start_factor": 0.1} and milestones == [10]


def test_scheduler_single_mapping_and_none():
    entries, milestones = policy(
        scheduler={"name": "torch.optim.lr_scheduler.ConstantLR"}
    ).scheduler_entries()
    assert [e.name for e in entries] == ["torch.optim.lr_scheduler.ConstantLR"] and milestones == []
    assert policy(scheduler=None).scheduler_entries() == ([], [])


def test_scheduler_accepts_model_instances():
    cfg = policy(
        scheduler=[SchedulerEntry(name="a"), SchedulerEntry(name="b"), SchedulerMilestones(milestones=[3])]
    )
    assert cfg.scheduler_entries()[1] == [3]


def test_scheduler_error_comes_from_one_form_only():
    with pytest.raises(ValidationError) as info:
        policy(scheduler=[{"name": "a"}, {"milestones": ["x"]}])
    locs = [error["loc"] for error in info.value.errors()]
    assert locs == [("scheduler", "list", 1, "milestones", "milestones", 0)]


def test_scheduler_milestone_count_is_checked():
    with pytest.raises(ValidationError, match=r"policy\.scheduler: 2 schedulers need 1 milestones"):
        policy(scheduler=[{"name": "a"}, {"name": "b"}])


def test_packing_and_dynamic_batching_are_mutually_exclusive():
    with pytest.raises(ValidationError, match="mutually exclusive"):
        policy(sequence_packing={"enabled": True}, dynamic_batching={"enabled": True})


@pytest.mark.parametrize("section", ["sequence_packing", "dynamic_batching"])
def test_token_budget_must_hold_the_longest_sample(section):
    with pytest.raises(ValidationError, match=rf"policy.{section}.train_mb_tokens=32 is less than"):
        policy(**{section: {"enabled": True, "train_mb_tokens": 32}})
    assert getattr(policy(**{section: {"enabled": True, "train_mb_tokens": 64}}), section).enabled
    assert policy(**{section: {"enabled": False, "train_mb_tokens": 8}})  # off: not checked


def test_compile_is_off_and_the_chunked_loss_on_by_default():
    cfg = policy()
    assert cfg.dtensor_cfg.compile is False and cfg.dtensor_cfg.chunked_loss is True


@pytest.mark.parametrize(
    "dtensor_cfg, refused",
    [
        ({"sequence_parallel": True}, "sequence_parallel=true .* needs tensor_parallel_size > 1"),
        ({"custom_parallel_plan": "my.plan"}, "custom_parallel_plan='my.plan' .* needs tensor_parallel_size > 1"),
        ({"context_parallel_size": 2, "dp_replicate_size": 2}, "context_parallel_size=2 with dp_replicate_size=2: HSDP"),
        ({"context_parallel_size": 2, "attn_implementation": "eager"}, "context_parallel_size=2 with attn_implementation='eager'"),
        ({"context_parallel_size": 2, "compile": True}, "context_parallel_size=2 with compile=true"),
        ({"tensor_parallel_size": 2, "compile": True}, "tensor_parallel_size=2 with compile=true: .* set compile to false"),
    ],
)
def test_tensor_parallel_only_keys_need_tensor_parallelism(dtensor_cfg, refused):
    with pytest.raises(ValidationError, match=refused):
        policy(dtensor_cfg=dtensor_cfg)
    # their defaults, as NeMo RL's recipes spell them out, load; with TP they are honoured
    policy(dtensor_cfg={"sequence_parallel": False, "custom_parallel_plan": None})
    policy(dtensor_cfg={"tensor_parallel_size": 2, "sequence_parallel": True, "custom_parallel_plan": "my.plan"})
    policy(dtensor_cfg={"tensor_parallel_size": 2, "sequence_parallel": True, "lora_cfg": {"enabled": True}})


@pytest.mark.parametrize(
    "dtensor_cfg, world_size, refused",
    [
        ({"tensor_parallel_size": 4}, 6, r"world size 6 is not a multiple of .*tensor_parallel_size=4 .* = 4"),
        ({"tensor_parallel_size": 2, "dp_replicate_size": 2}, 6, r"world size 6 .*dp_replicate_size=2 = 4"),
        ({"context_parallel_size": 4}, 6, r"world size 6 is not a multiple of .*context_parallel_size=4 .* = 4"),
        # cp ranks share their rows: 8 rows over 8 / (2 x 2) = 2 data-parallel ranks
        ({"context_parallel_size": 2, "tensor_parallel_size": 2}, 8, None),
        # 8 rows over 8 / 2 = 4 data-parallel ranks, not 8: the batch check uses that size
        ({"tensor_parallel_size": 2}, 8, None),
        ({"tensor_parallel_size": 2}, 32, r"over 16 data-parallel ranks \(32 workers / tensor_parallel_size=2"),
    ],
)
def test_batch_split_uses_the_data_parallel_size(dtensor_cfg, world_size, refused):
    from nemo_rl.config.schema import batch_split_problem

    problem = batch_split_problem(policy(dtensor_cfg=dtensor_cfg, train_global_batch_size=8, train_micro_batch_size=1), world_size)
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and re.search(refused, problem), problem


def test_gpu_monitoring_takes_nemo_rl_keys_with_positive_intervals():
    from nemo_rl.config.schema import LoggerConfig

    cfg = LoggerConfig.model_validate({"gpu_monitoring": {"collection_interval": 5, "flush_interval": 30}})
    assert (cfg.gpu_monitoring.collection_interval, cfg.gpu_monitoring.flush_interval) == (5, 30)
    assert LoggerConfig().gpu_monitoring.collection_interval == 10 == LoggerConfig().gpu_monitoring.flush_interval
    with pytest.raises(ValidationError, match="flush_interval"):
        LoggerConfig.model_validate({"gpu_monitoring": {"flush_interval": 0}})
    with pytest.raises(ValidationError, match="gpu_monitoring.sample_every"):
        LoggerConfig.model_validate({"gpu_monitoring": {"sample_every": 3}})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtensor_cfg": {"dp_replicate_size": 0}}, "greater than or equal to 1"),
        ({"dtensor_cfg": {"automodel_kwargs": {"backend": {"attn": "te"}}}}, "automodel_kwargs ['backend']"),
        ({"sequence_packing": {"microbatch_order": "smallest_first"}}, "'packer' or 'largest_first'"),
        ({"dynamic_batching": {"logprob_mb_tokens": 0}}, "greater than or equal to 1"),
        ({"optimizer": None}, "policy.optimizer is null"),
    ],
)
def test_nemo_rl_policy_keys_refuse_what_this_build_does_not_do(changes, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        policy(**changes)


def test_nemo_rl_policy_keys_at_their_defaults_change_nothing():
    default = policy()
    spelled_out = policy(
        dtensor_cfg={"_v2": True, "dp_replicate_size": 1, "automodel_kwargs": {}},
        sequence_packing={"microbatch_order": "packer"},
        offload_optimizer_for_logprob=False,
        hf_config_overrides={},
    )
    assert spelled_out == default


def test_megatron_backend_takes_a_null_optimizer_and_refuses_both_backends_at_once():
    megatron = {"enabled": True, "tensor_model_parallel_size": 2}
    cfg = policy(megatron_cfg=megatron, optimizer=None, dtensor_cfg={"enabled": False})
    assert cfg.parallel_layout().model_parallel_size() == 2
    with pytest.raises(ValidationError, match="pick one backend"):
        policy(megatron_cfg=megatron, optimizer=None)
    with pytest.raises(ValidationError, match="policy.optimizer must be null"):
        policy(megatron_cfg=megatron, dtensor_cfg={"enabled": False})


@pytest.mark.parametrize(
    ("megatron", "message"),
    [
        ({"expert_model_parallel_size": 2}, "policy.megatron_cfg.expert_model_parallel_size: expert parallelism"),
        ({"context_parallel_size": 2}, "policy.megatron_cfg.context_parallel_size: Megatron's context parallelism"),
        ({"fp8_cfg": {"enabled": True}}, "policy.megatron_cfg.fp8_cfg.enabled: FP8"),
        ({"sequence_parallel": True}, "policy.megatron_cfg.sequence_parallel=true needs tensor_model_parallel_size > 1"),
        ({"optimizer": {"bf16": True}}, "policy.megatron_cfg.optimizer.bf16=True contradicts policy.precision='float32'"),
        ({"tensor_model_parallel_sise": 2}, "policy.megatron_cfg: unknown key"),
    ],
)
def test_megatron_keys_that_cannot_be_honoured_are_refused_by_name(megatron, message):
    with pytest.raises(ValidationError) as error:
        policy(megatron_cfg={"enabled": True, **megatron}, optimizer=None, dtensor_cfg={"enabled": False}, precision="float32")
    assert message in str(error.value)


def test_disabled_megatron_section_is_not_checked():
    assert policy(megatron_cfg={"enabled": False, "fp8_cfg": {"enabled": True, "unknown": 1}}).megatron_cfg.enabled is False


def test_val_generation_is_off_by_default_and_its_keys_are_checked():
    from nemo_rl.config.schema import SFTConfig

    assert SFTConfig(max_num_steps=1).val_generation.enabled is False
    cfg = SFTConfig(max_num_steps=1, val_generation={"enabled": True, "num_prompts": 4, "metric": "math"})
    assert (cfg.val_generation.num_prompts, cfg.val_generation.metric) == (4, "math")
    for bad in ({"metric": "bleu"}, {"num_prompts": 0}, {"max_new_tokens": 0}, {"num_prompt": 3}):
        with pytest.raises(ValidationError):
            SFTConfig(max_num_steps=1, val_generation=bad)


def test_answer_only_loss_mask_is_on_by_default_and_refused_beside_only_unmask_final():
    from nemo_rl.config.loader import load_config

    sft_tiny = REPO / "configs" / "sft_tiny.yaml"
    assert load_config(sft_tiny).data.answer_only_loss_mask is True
    assert load_config(sft_tiny, ["data.answer_only_loss_mask=false"]).data.answer_only_loss_mask is False
    with pytest.raises(ValueError, match=re.escape("sft.only_unmask_final=true with data.answer_only_loss_mask=false")):
        load_config(sft_tiny, ["data.answer_only_loss_mask=false", "sft.only_unmask_final=true"])
