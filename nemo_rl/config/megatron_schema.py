"""`policy.megatron_cfg`: NeMo RL's Megatron-core backend keys, typed.

Every key NeMo RL's SFT configs carry is declared here. A key is honoured by the Megatron worker
(nemo_rl/models/policy/workers/megatron_policy_worker.py), or applies only to a kind of model or
hardware this build does not have and is refused when set to anything but its inert value (the
error names the key), or is a kernel-fusion switch that changes speed, never results (honoured
where Transformer Engine is installed; see docs/megatron.md).

While `enabled: false` the section is accepted as written (NeMo RL's DTensor recipes carry it
with GPU values) and nothing in it is checked or used.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MegatronOptimizerConfig(_Section):
    """Megatron's `OptimizerConfig` keys (its Adam is AdamW whenever weight_decay > 0)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(5.0e-6, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    # null: follow policy.precision (the master weights stay fp32 either way).
    bf16: bool | None = None
    fp16: bool | None = None
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1.0e-8
    sgd_momentum: float = 0.9
    use_distributed_optimizer: bool = True
    # Keeps optimizer states in lower precision through Transformer Engine's FusedAdam (GPU).
    use_precision_aware_optimizer: bool = False
    clip_grad: float | None = Field(1.0, ge=0)
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = Field(0.0, ge=0, le=1)


class MegatronSchedulerConfig(_Section):
    """Megatron's `OptimizerParamScheduler`: warm-up from lr_warmup_init to optimizer.lr over
    lr_warmup_iters steps, then `lr_decay_style` down to optimizer.min_lr at lr_decay_iters."""

    start_weight_decay: float | None = None
    end_weight_decay: float | None = None
    weight_decay_incr_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "constant"
    lr_decay_iters: int | None = Field(None, ge=1)
    lr_warmup_iters: int = Field(0, ge=0)
    lr_warmup_init: float = Field(0.0, ge=0)


class MegatronDDPConfig(_Section):
    """Megatron's `DistributedDataParallelConfig` keys."""

    grad_reduce_in_fp32: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Megatron's own FSDP (use_custom_fsdp) shards by this strategy; refused below, so inert.
    data_parallel_sharding_strategy: str = "no_shard"
    use_custom_fsdp: bool = False
    average_in_collective: bool = False


class MegatronPeftConfig(_Section):
    """LoRA on the Megatron linears (nemo_rl/models/megatron/lora.py); NeMo RL's keys and defaults.
    target_modules empty: linear_qkv, linear_proj, linear_fc1, linear_fc2 of every layer, minus
    exclude_modules."""

    enabled: bool = False
    target_modules: list[str] = Field(default_factory=list)
    exclude_modules: list[str] = Field(default_factory=list)
    dim: int = Field(32, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dropout_position: Literal["pre", "post"] = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    a2a_experimental: bool = False
    lora_dtype: str | None = None


class MegatronFP8Config(_Section):
    enabled: bool = False
    fp8: str = "e4m3"
    fp8_recipe: str = "blockwise"
    fp8_param: bool = False


# Kernel fusions: the same numbers, computed by Transformer Engine / apex kernels when present.
FUSION_KEYS = ("apply_rope_fusion", "bias_activation_fusion", "moe_permute_fusion")


class MegatronConfig(BaseModel):
    # Unchecked while disabled (NeMo RL's DTensor recipes carry this section); see the module doc.
    model_config = ConfigDict(extra="allow")

    enabled: bool = False
    env_vars: dict[str, str] = Field(default_factory=dict)
    # 0: keep the allocator's cache; 1: empty it after each step; 2: also after each micro-batch.
    empty_unused_memory_level: Literal[0, 1, 2] = 0
    activation_checkpointing: bool = False
    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    virtual_pipeline_model_parallel_size: int | None = Field(None, ge=1)
    context_parallel_size: int = Field(1, ge=1)
    expert_tensor_parallel_size: int | None = Field(1, ge=1)
    expert_model_parallel_size: int = Field(1, ge=1)
    # The dtype of activations sent between pipeline stages; null: policy.precision.
    pipeline_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    num_layers_in_first_pipeline_stage: int | None = Field(None, ge=1)
    num_layers_in_last_pipeline_stage: int | None = Field(None, ge=1)
    sequence_parallel: bool = False
    # MoE router settings: they apply to mixture-of-experts layers only (this build's Megatron
    # models are dense, so they have nothing to act on).
    freeze_moe_router: bool = False
    moe_router_dtype: str | None = None
    moe_router_load_balancing_type: str = "aux_loss"
    moe_router_bias_update_rate: float = 1e-3
    moe_per_layer_logging: bool = False
    moe_enable_deepep: bool = False
    moe_token_dispatcher_type: str = "alltoall"
    moe_shared_expert_overlap: bool = False
    apply_rope_fusion: bool = False
    bias_activation_fusion: bool = False
    moe_permute_fusion: bool = False
    # NeMo RL keeps logits in the compute dtype until the loss; here the loss always sees fp32.
    defer_fp32_logits: bool = False
    peft: MegatronPeftConfig = Field(default_factory=MegatronPeftConfig)
    optimizer: MegatronOptimizerConfig = Field(default_factory=MegatronOptimizerConfig)
    scheduler: MegatronSchedulerConfig = Field(default_factory=MegatronSchedulerConfig)
    distributed_data_parallel_config: MegatronDDPConfig = Field(default_factory=MegatronDDPConfig)
    fp8_cfg: MegatronFP8Config = Field(default_factory=MegatronFP8Config)

    @model_validator(mode="before")
    @classmethod
    def _only_check_when_enabled(cls, data: Any) -> Any:
        """Disabled: nothing in the section is used, so nothing in it is checked (NeMo RL's DTensor
        recipes carry it with values for other hardware)."""
        if isinstance(data, dict) and data.get("enabled") in (False, "false", "False", None):
            return {"enabled": False}
        return data

    @model_validator(mode="after")
    def _refuse_what_cannot_be_honoured(self) -> MegatronConfig:
        if not self.enabled:
            return self
        if self.extra_keys():
            raise ValueError(
                f"policy.megatron_cfg: unknown key(s) {self.extra_keys()}; known keys: {sorted(type(self).model_fields)}"
            )
        peft, lora = self.peft, self.peft.enabled
        refusals = {
            "expert_model_parallel_size": (
                self.expert_model_parallel_size > 1,
                "expert parallelism needs a mixture-of-experts model; this build's Megatron backend builds dense models only; set it to 1",
            ),
            "expert_tensor_parallel_size": (
                (self.expert_tensor_parallel_size or 1) > 1,
                "applies to mixture-of-experts layers, which this build's Megatron models do not have; set it to 1",
            ),
            "context_parallel_size": (
                self.context_parallel_size > 1,
                "Megatron's context parallelism needs Transformer Engine's attention (GPU); it is not available in this build; set it to 1",
            ),
            "fp8_cfg.enabled": (self.fp8_cfg.enabled, "FP8 training needs Transformer Engine on Hopper or newer GPUs; not available in this build"),
            "distributed_data_parallel_config.use_custom_fsdp": (
                self.distributed_data_parallel_config.use_custom_fsdp,
                "Megatron's own FSDP is not available in this build; use the distributed optimizer (optimizer.use_distributed_optimizer)",
            ),
            "optimizer.optimizer_cpu_offload": (
                self.optimizer.optimizer_cpu_offload,
                "optimizer offloading is not available in this build's Megatron backend; set it to false",
            ),
            "virtual_pipeline_model_parallel_size": (
                (self.virtual_pipeline_model_parallel_size or 1) > 1,
                "interleaved (virtual) pipeline stages are not available in this build; set it to null",
            ),
            # LoRA (peft): checked only when it is on.
            "peft.lora_A_init_method": (
                lora and peft.lora_A_init_method not in ("xavier", "uniform"),
                f"{peft.lora_A_init_method!r} is not one of 'xavier', 'uniform'",
            ),
            "peft.lora_B_init_method": (
                lora and peft.lora_B_init_method != "zero",
                f"{peft.lora_B_init_method!r}: only 'zero' (the adapted model starts equal to the base) is available",
            ),
            "peft.a2a_experimental": (
                lora and peft.a2a_experimental,
                "the all-to-all adapter communication is for expert-parallel MoE layers; set it to false",
            ),
            "peft.lora_dtype": (
                lora and peft.lora_dtype is not None,
                f"{peft.lora_dtype!r}: the adapters take the base weights' dtype (policy.precision); set it to null",
            ),
            "peft.target_modules": (
                lora and bool(peft.target_modules and peft.exclude_modules),
                "give target_modules or exclude_modules, not both (exclude_modules applies when target_modules is empty)",
            ),
            "peft.dropout": (
                lora and peft.dropout > 0 and self.tensor_model_parallel_size > 1,
                "LoRA dropout with tensor_model_parallel_size > 1 would draw different masks on the tensor-parallel "
                "ranks for the activations they share; set dropout to 0 or use tensor_model_parallel_size 1",
            ),
            "peft.enabled": (
                lora and self.sequence_parallel,
                "LoRA with sequence_parallel=true is not available in this build; set sequence_parallel to false",
            ),
        }
        for key, (refused, reason) in refusals.items():
            if refused:
                raise ValueError(f"policy.megatron_cfg.{key}: {reason}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "policy.megatron_cfg.sequence_parallel=true needs tensor_model_parallel_size > 1; set it to false"
            )
        if self.optimizer.bf16 and self.optimizer.fp16:
            raise ValueError("policy.megatron_cfg.optimizer: bf16 and fp16 are both true; set one of them")
        return self

    def extra_keys(self) -> list[str]:
        return sorted(self.model_extra or {})

    def model_parallel_size(self) -> int:
        """Ranks that share one copy of the data: a tensor x pipeline x context-parallel group."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def layout_problem(self, world_size: int) -> str | None:
        needed = self.model_parallel_size()
        if world_size % needed:
            return (
                f"world size {world_size} is not a multiple of policy.megatron_cfg.tensor_model_parallel_size="
                f"{self.tensor_model_parallel_size} x pipeline_model_parallel_size={self.pipeline_model_parallel_size} "
                f"x context_parallel_size={self.context_parallel_size} = {needed}"
            )
        return None

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size()

    def precision_problem(self, precision: str) -> str | None:
        """Why optimizer.bf16 / fp16 contradict policy.precision (which sets the compute dtype)."""
        for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
            value = getattr(self.optimizer, key)
            if value is not None and value != (precision == dtype):
                return (
                    f"policy.megatron_cfg.optimizer.{key}={value} contradicts policy.precision={precision!r}; "
                    f"set {key} to {precision == dtype} or null (follow policy.precision)"
                )
        return None
