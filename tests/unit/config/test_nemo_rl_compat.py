"""NeMo RL-shaped SFT configs (fixtures in nemo_rl_configs/, written from the key sets NeMo RL
documents): each loads, or is refused by exactly one error that names the one feature this
build lacks. None fails on an unknown key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config import ConfigError, load_config

CONFIGS = Path(__file__).parent / "nemo_rl_configs"
RECIPES = CONFIGS / "recipes"
# cluster.device is ours (NeMo RL always runs on GPUs); fixing it keeps the batch-split check
# independent of the machine running the test.
ON_GPUS = ["cluster.device=cuda"]


def _load(name: str, *overrides: str):
    return load_config(CONFIGS / name, [*ON_GPUS, *overrides])


def test_base_config_with_every_documented_key_loads_at_its_defaults():
    cfg = _load("sft.yaml")
    dtensor = cfg.policy.dtensor_cfg
    assert dtensor.v2 is True and dtensor.dp_replicate_size == 1 and dtensor.automodel_kwargs == {}
    assert cfg.policy.offload_optimizer_for_logprob is False
    assert cfg.policy.sequence_packing.microbatch_order == "packer"
    assert cfg.logger.swanlab_enabled is False and cfg.logger.swanlab.name == "sft-dev-squad"
    assert cfg.cluster.segment_size is None
    assert cfg.policy.megatron_cfg.enabled is False


def test_lora_recipe_loads_with_its_overrides_and_swanlab():
    cfg = _load("recipes/sft-llama3.2-1b-1n8g-fsdp2tp1-lora.yaml")
    assert cfg.policy.dtensor_cfg.lora_cfg.enabled and cfg.policy.dtensor_cfg.lora_cfg.dim == 16
    assert cfg.policy.hf_config_overrides == {"max_position_embeddings": 2048}
    assert cfg.logger.swanlab_enabled is True
    assert cfg.sft.max_num_steps == 50 and cfg.sft.val_period == 10  # the rest inherited


def test_sequence_packing_recipe_loads_with_largest_first_and_unused_logprob_keys():
    cfg = _load("recipes/sft-qwen2.5-7b-1n8g-fsdp2-seqpack.yaml")
    packing = cfg.policy.sequence_packing
    assert packing.enabled and packing.microbatch_order == "largest_first" and packing.logprob_mb_tokens == 4096
    assert cfg.policy.dtensor_cfg.automodel_kwargs == {"force_hf": True}
    assert cfg.policy.offload_optimizer_for_logprob is True
    entries, milestones = cfg.policy.scheduler_entries()
    assert [e.name.rsplit(".", 1)[1] for e in entries] == ["LinearLR", "ConstantLR"] and milestones == [10]


def test_model_parallel_recipes_load_with_their_layouts():
    hsdp = _load("recipes/sft-llama3.1-70b-8n8g-hsdp.yaml").policy.dtensor_cfg
    assert hsdp.dp_replicate_size == 8 and hsdp.data_parallel_size(64) == 64
    tp = _load("recipes/sft-llama3.1-8b-1n8g-fsdp2tp2.yaml").policy.dtensor_cfg
    assert (tp.tensor_parallel_size, tp.sequence_parallel, tp.data_parallel_size(8)) == (2, True, 4)
    cp = _load("recipes/sft-llama3.1-8b-2n8g-cp2.yaml").policy.dtensor_cfg
    assert (cp.context_parallel_size, cp.tensor_parallel_size, cp.data_parallel_size(16)) == (2, 2, 4)


@pytest.mark.parametrize(
    ("recipe", "feature"),
    [
        ("sft-llama3.1-8b-4n8g-gb200-segments.yaml", "cluster.segment_size: 2 asks for placement by NVLink segment"),
        ("sft-qwen3-30ba3b-1n8g-automodel-liger.yaml", "policy.dtensor_cfg: automodel_kwargs ['use_liger_kernel']: NeMo AutoModel's model options"),
    ],
)
def test_a_recipe_needing_a_missing_feature_gets_one_error_naming_it(recipe, feature):
    with pytest.raises(ConfigError) as error:
        _load(f"recipes/{recipe}")
    assert len(error.value.errors) == 1, error.value.errors
    assert error.value.errors[0].startswith(feature)
    assert "unknown key" not in str(error.value)


def test_megatron_recipe_loads_with_its_layout_and_optimizer_keys():
    cfg = _load("recipes/sft-llama3.1-8b-1n8g-megatron.yaml")
    megatron = cfg.policy.megatron_cfg
    assert megatron.enabled and cfg.policy.optimizer is None
    assert (megatron.tensor_model_parallel_size, megatron.pipeline_model_parallel_size) == (2, 2)
    assert megatron.data_parallel_size(8) == 2
    assert megatron.optimizer.lr == 5.0e-6 and megatron.optimizer.clip_grad == cfg.policy.max_grad_norm
    assert megatron.scheduler.lr_warmup_iters == 50


def test_megatron_recipe_keys_that_cannot_be_honoured_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"policy.megatron_cfg.expert_model_parallel_size: expert parallelism needs a mixture-of-experts"):
        _load("recipes/sft-llama3.1-8b-1n8g-megatron.yaml", "++policy.megatron_cfg.expert_model_parallel_size=2")
    assert _load("recipes/sft-llama3.1-8b-1n8g-megatron.yaml", "policy.megatron_cfg.peft.enabled=true").policy.megatron_cfg.peft.enabled
    with pytest.raises(ConfigError, match=r"policy.megatron_cfg.peft.lora_dtype: 'bf16': the adapters take the base weights' dtype"):
        _load("recipes/sft-llama3.1-8b-1n8g-megatron.yaml", "policy.megatron_cfg.peft.enabled=true", "policy.megatron_cfg.peft.lora_dtype=bf16")
    with pytest.raises(ConfigError, match=r"policy.optimizer must be null with policy.megatron_cfg.enabled=true"):
        _load("recipes/sft-llama3.1-8b-1n8g-megatron.yaml", "policy.optimizer={name: torch.optim.AdamW}")


def test_a_null_optimizer_without_megatron_names_the_key():
    with pytest.raises(ConfigError, match=r"policy.optimizer is null, which only a Megatron config may leave"):
        _load("sft.yaml", "policy.optimizer=null")


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("policy.dtensor_cfg._v2=false", lambda c: c.policy.dtensor_cfg.v2 is False),
        ("++policy.dtensor_cfg.automodel_kwargs.force_hf=false", lambda c: c.policy.dtensor_cfg.automodel_kwargs == {"force_hf": False}),
        ("logger.swanlab.mode=offline", lambda c: c.logger.swanlab.mode == "offline"),
    ],
)
def test_nemo_rl_keys_take_overrides_by_their_own_names(override, value):
    assert value(_load("sft.yaml", override))


def test_the_v2_key_survives_a_round_trip_through_show(tmp_path):
    from nemo_rl.config import config_to_yaml

    cfg = _load("sft.yaml", "policy.dtensor_cfg._v2=false")
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    assert "_v2: false" in saved.read_text()
    assert load_config(saved) == cfg
