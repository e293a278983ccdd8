"""Typed configuration: one pydantic model per YAML section, keeping NeMo RL's key names.

Every model forbids unknown keys, so a typo fails at load time with the full key path
instead of being silently ignored. Nothing downstream of `load_config` reads raw dicts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from nemo_rl.config.megatron_schema import MegatronConfig, MegatronPeftConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- sft


class ValGenerationConfig(Section):
    """Generation-based validation during SFT: at each validation, the first `num_prompts`
    validation prompts answered greedily and scored against their assistant turn."""

    enabled: bool = False
    num_prompts: int = Field(32, ge=1)
    # squad: exact match and F1 (official normalisation); math: final-answer equivalence
    metric: Literal["squad", "math"] = "squad"
    # null: the longest reference's token count plus a margin
    max_new_tokens: int | None = Field(None, ge=1)


class SFTConfig(Section):
    max_num_epochs: int = Field(1, ge=1)
    max_num_steps: int = Field(..., ge=1)
    val_period: int = Field(0, ge=0, description="validate every N steps; 0 = never during training")
    val_batches: int = Field(0, ge=0, description="validation batches per validation; 0 = the whole split")
    val_global_batch_size: int = Field(32, ge=1)
    val_micro_batch_size: int = Field(1, ge=1)
    val_at_start: bool = False
    val_at_end: bool = False
    seed: int = 42
    only_unmask_final: bool = False
    # A step whose loss or gradient norm is not finite is never applied. false: the run stops
    # with an error naming the step; true: it goes on (counted in train/skipped_updates).
    skip_non_finite_updates: bool = False
    val_generation: ValGenerationConfig = Field(default_factory=ValGenerationConfig)


# ---------------------------------------------------------------- checkpointing


class CheckpointingConfig(Section):
    enabled: bool = True
    checkpoint_dir: str = "results/sft"
    metric_name: str | None = "val:val_loss"
    higher_is_better: bool = False
    keep_top_k: int | None = Field(None, ge=1)
    save_period: int = Field(10, ge=1)
    save_optimizer: bool = True
    # LoRA runs: also write step_<N>/hf_merged/, the base with the adapter merged in (a full HF
    # model). Without LoRA hf/ is already the full model and this does nothing.
    save_merged: bool = False
    # The dtype of hf/'s weights; unset: the training precision's compute dtype (float32 on CPU).
    hf_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    checkpoint_must_save_by: str | None = None
    # auto: continue from the latest complete checkpoint in checkpoint_dir; never: refuse to
    # start if checkpoint_dir holds complete checkpoints; or the path of one step_<N> directory.
    resume: str = "auto"

    @field_validator("resume")
    @classmethod
    def _resume_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected 'auto', 'never' or the path of a step_<N> checkpoint directory")
        return value

    @field_validator("metric_name")
    @classmethod
    def _metric_has_prefix(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("val:", "train:")):
            raise ValueError(f"expected 'val:<metric>' or 'train:<metric>', got {value!r}")
        return value


# ---------------------------------------------------------------- policy


class TokenizerConfig(Section):
    name: str
    # "default" or absent: the tokenizer's own template; None: passthrough; otherwise an
    # inline Jinja string or a path to a .jinja file.
    chat_template: str | None = "default"
    chat_template_kwargs: dict[str, Any] | None = None


class LoRAConfig(Section):
    """Which linear layers get an adapter follows NeMo AutoModel's rules (nemo_rl/models/lora.py):
    `target_modules` given: those; else `match_all_linear`: every linear layer but the output
    head; else `exclude_modules` given: every linear layer except those; else (all empty):
    AutoModel's default, `target_modules: ['*_proj']`."""

    enabled: bool = False
    target_modules: list[str] = Field(default_factory=list)
    exclude_modules: list[str] = Field(default_factory=list)
    match_all_linear: bool = True
    dim: int = Field(8, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dropout_position: Literal["pre", "post"] = "post"
    lora_A_init: Literal["xavier", "uniform"] = "xavier"
    use_triton: bool = True  # accepted; this build has no fused kernel (logged), never an error


# NeMo AutoModel's from_pretrained options this build honours: `force_hf` asks for the Hugging
# Face implementation of the model, which is the only one this build has.
AUTOMODEL_KWARGS_HONOURED = ("force_hf",)


class DTensorConfig(Section):
    # `_v2` is NeMo RL's key; pydantic keeps underscore names private, hence the alias.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True
    )

    enabled: bool = True
    # NeMo RL's choice between its two DTensor workers; this build has one DTensor worker (with
    # the v2 features: LoRA, HF-format checkpoints), which both values get.
    v2: bool = Field(True, alias="_v2")
    automodel_kwargs: dict[str, Any] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict)
    cpu_offload: bool = False
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    tensor_parallel_size: int = Field(1, ge=1)
    context_parallel_size: int = Field(1, ge=1)
    # HSDP: FSDP shards within groups of world / (dp_replicate x cp x tp) ranks and replicates
    # over dp_replicate_size of them.
    dp_replicate_size: int = Field(1, ge=1)
    # A dotted path to a tensor-parallel plan (a dict of module patterns -> DTensor parallel
    # styles, or a function (model, sequence_parallel) -> one); null: the model's own plan.
    custom_parallel_plan: str | None = None
    lora_cfg: LoRAConfig = Field(default_factory=LoRAConfig)
    # torch.compile each decoder layer (needs a C++ compiler on CPU, Triton on GPUs).
    compile: bool = False
    # The loss from hidden states in chunks, without full-vocabulary logits for the
    # micro-batch; used only where the worker verifies it equals the plain loss.
    chunked_loss: bool = True
    # Hugging Face's attn_implementation ("sdpa", "eager", "flash_attention_2", ...); null:
    # the model's default (sdpa). flash_attention_2 (GPU, flash-attn installed) gives packed
    # samples flash-attention's variable-length path instead of a block-diagonal mask.
    attn_implementation: str | None = None

    @model_validator(mode="after")
    def _check_parallel_keys(self) -> DTensorConfig:
        unsupported = sorted(set(self.automodel_kwargs) - set(AUTOMODEL_KWARGS_HONOURED))
        if unsupported:
            raise ValueError(
                f"automodel_kwargs {unsupported}: NeMo AutoModel's model options (custom kernels and "
                "backends), which this build does not have: it builds Hugging Face's implementation "
                f"of the model; only {list(AUTOMODEL_KWARGS_HONOURED)} is accepted. Remove them"
            )
        # Each would be accepted and ignored otherwise.
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            raise ValueError(
                "sequence_parallel=true shards the sequence between tensor-parallel "
                "regions and needs tensor_parallel_size > 1; set it to false or raise tensor_parallel_size"
            )
        if self.custom_parallel_plan is not None and self.tensor_parallel_size == 1:
            raise ValueError(
                f"custom_parallel_plan={self.custom_parallel_plan!r} is a tensor-parallel "
                "plan and needs tensor_parallel_size > 1; set it to null or raise tensor_parallel_size"
            )
        if self.context_parallel_size > 1:
            self._check_context_parallel_keys()
        if self.compile and self.tensor_parallel_size > 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} with compile=true: torch.compile of the "
                "tensor-parallel decoder layers fails in this build (torch 2.15's AOTAutograd recurses without "
                "end tracing their DTensor backward; docs/parallelism.md); set compile to false"
            )
        return self

    def _check_context_parallel_keys(self) -> None:
        """What context parallelism (models/context_parallel.py) cannot serve."""
        cp = f"context_parallel_size={self.context_parallel_size}"
        if self.dp_replicate_size > 1:
            raise ValueError(
                f"{cp} with dp_replicate_size={self.dp_replicate_size}: HSDP with context parallelism is not "
                "available (FSDP shards over dp_shard x cp); set dp_replicate_size to 1"
            )
        if self.attn_implementation not in (None, "sdpa"):
            raise ValueError(
                f"{cp} with attn_implementation={self.attn_implementation!r}: context parallelism runs its own "
                "attention (SDPA over the gathered keys and values); set attn_implementation to null or 'sdpa'"
            )
        if self.compile:
            raise ValueError(
                f"{cp} with compile=true: compiling layers whose attention runs collectives is untested "
                "here; set compile to false"
            )

    def model_parallel_size(self) -> int:
        """The ranks that hold the same rows of a batch (one tensor- x context-parallel group)."""
        return self.tensor_parallel_size * self.context_parallel_size

    def layout_problem(self, world_size: int) -> str | None:
        """Why this layout does not divide `world_size` ranks, or None when it does."""
        needed = self.model_parallel_size() * self.dp_replicate_size
        if world_size % needed:
            return (
                f"world size {world_size} is not a multiple of policy.dtensor_cfg.tensor_parallel_size="
                f"{self.tensor_parallel_size} x context_parallel_size={self.context_parallel_size} x "
                f"dp_replicate_size={self.dp_replicate_size} = {needed}"
            )
        return None

    def data_parallel_size(self, world_size: int) -> int:
        """dp_replicate x dp_shard: the number of different shards of each global batch."""
        return world_size // self.model_parallel_size()


class DynamicBatchingConfig(Section):
    enabled: bool = False
    train_mb_tokens: int | None = Field(None, ge=1)
    # Token budget of a log-probability pass (RL algorithms); SFT has none, as in NeMo RL.
    logprob_mb_tokens: int | None = Field(None, ge=1)
    sequence_length_round: int = Field(64, ge=1)


class SequencePackingConfig(Section):
    enabled: bool = False
    train_mb_tokens: int | None = Field(None, ge=1)
    # Token budget of a log-probability pass (RL algorithms); SFT has none, as in NeMo RL.
    logprob_mb_tokens: int | None = Field(None, ge=1)
    # The order in which a rank runs its packed micro-batches: as the packer made them, or the
    # fullest first (the allocator's first, largest request is then reused). The loss is
    # normalized by the global token count, so the update is the same either way.
    microbatch_order: Literal["packer", "largest_first"] = "packer"
    algorithm: Literal["first_fit_decreasing", "modified_first_fit_decreasing"] = (
        "modified_first_fit_decreasing"
    )
    sequence_length_round: int = Field(64, ge=1)


class OptimizerConfig(Section):
    name: str = "torch.optim.AdamW"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class SchedulerEntry(Section):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class SchedulerMilestones(Section):
    milestones: list[int]


def _scheduler_item_kind(value: Any) -> str:
    if isinstance(value, SchedulerMilestones) or (isinstance(value, dict) and "milestones" in value):
        return "milestones"
    return "scheduler"


def _scheduler_kind(value: Any) -> str:
    return "list" if isinstance(value, (list, tuple)) else "scheduler"


# Discriminated so that a mistake in one entry yields that entry's errors only, not one per
# union member.
SchedulerItem = Annotated[
    Annotated[SchedulerEntry, Tag("scheduler")] | Annotated[SchedulerMilestones, Tag("milestones")],
    Discriminator(_scheduler_item_kind),
]
SchedulerSpec = Annotated[
    Annotated[list[SchedulerItem], Tag("list")] | Annotated[SchedulerEntry, Tag("scheduler")],
    Discriminator(_scheduler_kind),
]


class PolicyConfig(Section):
    model_name: str
    trust_remote_code: bool = False
    tokenizer: TokenizerConfig
    train_global_batch_size: int = Field(..., ge=1)
    train_micro_batch_size: int = Field(..., ge=1)
    max_total_sequence_length: int = Field(..., ge=2)
    precision: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    dtensor_cfg: DTensorConfig = Field(default_factory=DTensorConfig)
    dynamic_batching: DynamicBatchingConfig = Field(default_factory=DynamicBatchingConfig)
    sequence_packing: SequencePackingConfig = Field(default_factory=SequencePackingConfig)
    make_sequence_length_divisible_by: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # Set on the model's Hugging Face config before the model is built (e.g. {rope_theta: ...,
    # max_position_embeddings: ...}); each key must be an attribute the config already has.
    hf_config_overrides: dict[str, Any] = Field(default_factory=dict)
    # Offloads the optimizer during a log-probability pass (RL algorithms); SFT has none, as in
    # NeMo RL, where SFT also leaves it unused.
    offload_optimizer_for_logprob: bool = False
    # null exactly when megatron_cfg is enabled: its optimizer lives in megatron_cfg.optimizer.
    optimizer: OptimizerConfig | None = Field(default_factory=OptimizerConfig)
    # NeMo RL's form: a list of {name, kwargs} entries followed by one {milestones: [...]}.
    scheduler: SchedulerSpec | None = None
    megatron_cfg: MegatronConfig = Field(default_factory=MegatronConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> PolicyConfig:
        self._check_backend_choice()
        if self.train_global_batch_size % self.train_micro_batch_size:
            raise ValueError(
                f"policy.train_global_batch_size={self.train_global_batch_size} must be a multiple "
                f"of policy.train_micro_batch_size={self.train_micro_batch_size}"
            )
        if self.dynamic_batching.enabled and self.sequence_packing.enabled:
            raise ValueError(
                "policy.dynamic_batching.enabled and policy.sequence_packing.enabled are mutually "
                "exclusive; turn one of them off"
            )
        for name in ("dynamic_batching", "sequence_packing"):
            section = getattr(self, name)
            if section.enabled and (section.train_mb_tokens or 0) and section.train_mb_tokens < self.max_total_sequence_length:
                raise ValueError(
                    f"policy.{name}.train_mb_tokens={section.train_mb_tokens} is less than "
                    f"policy.max_total_sequence_length={self.max_total_sequence_length}: the longest "
                    "sample would fit no micro-batch"
                )
        self.scheduler_entries()  # validates the milestones shape
        return self

    def _check_backend_choice(self) -> None:
        """Exactly one of dtensor_cfg / megatron_cfg is enabled; policy.optimizer and
        policy.scheduler belong to the DTensor backend (Megatron's are in megatron_cfg)."""
        megatron = self.megatron_cfg.enabled
        if megatron and self.dtensor_cfg.enabled:
            raise ValueError(
                "policy.megatron_cfg.enabled=true and policy.dtensor_cfg.enabled=true: pick one "
                "backend; set policy.dtensor_cfg.enabled=false to train with Megatron-core"
            )
        if not megatron and not self.dtensor_cfg.enabled:
            raise ValueError(
                "policy.dtensor_cfg.enabled=false leaves no training backend; set it to true "
                "(or policy.megatron_cfg.enabled=true)"
            )
        if megatron and self.optimizer is not None:
            raise ValueError(
                "policy.optimizer must be null with policy.megatron_cfg.enabled=true: the Megatron "
                "backend's optimizer is policy.megatron_cfg.optimizer"
            )
        if megatron and self.scheduler is not None:
            raise ValueError(
                "policy.scheduler must be null with policy.megatron_cfg.enabled=true: the Megatron "
                "backend's schedule is policy.megatron_cfg.scheduler"
            )
        if not megatron and self.optimizer is None:
            raise ValueError(
                "policy.optimizer is null, which only a Megatron config may leave (its optimizer is "
                "policy.megatron_cfg.optimizer); the DTensor backend needs {name: torch.optim.AdamW, "
                "kwargs: {...}}"
            )
        if megatron:
            problem = self.megatron_cfg.precision_problem(self.precision)
            if problem:
                raise ValueError(problem)

    def parallel_layout(self) -> Any:
        """The enabled backend's parallel section (`model_parallel_size()`, `layout_problem(n)`,
        `data_parallel_size(n)`)."""
        return self.megatron_cfg if self.megatron_cfg.enabled else self.dtensor_cfg

    def lora_settings(self) -> LoRAConfig | MegatronPeftConfig:
        """The enabled backend's LoRA section: megatron_cfg.peft or dtensor_cfg.lora_cfg."""
        return self.megatron_cfg.peft if self.megatron_cfg.enabled else self.dtensor_cfg.lora_cfg

    def lora_enabled(self) -> bool:
        """Whether the enabled backend trains LoRA adapters."""
        return self.lora_settings().enabled

    def scheduler_entries(self) -> tuple[list[SchedulerEntry], list[int]]:
        """The scheduler list as (schedulers, milestones); ([], []) for a constant rate."""
        if self.scheduler is None:
            return [], []
        if isinstance(self.scheduler, SchedulerEntry):
            return [self.scheduler], []
        entries = [s for s in self.scheduler if isinstance(s, SchedulerEntry)]
        milestone_blocks = [s for s in self.scheduler if isinstance(s, SchedulerMilestones)]
        if len(milestone_blocks) > 1:
            raise ValueError("policy.scheduler: at most one {milestones: [...]} entry is allowed")
        milestones = milestone_blocks[0].milestones if milestone_blocks else []
        if len(entries) > 1 and len(milestones) != len(entries) - 1:
            raise ValueError(
                f"policy.scheduler: {len(entries)} schedulers need {len(entries) - 1} milestones, "
                f"got {milestones}"
            )
        return entries, milestones


# ---------------------------------------------------------------- data


class DatasetConfig(Section):
    """One dataset: a registered name (see docs/datasets.md) or a dotted class path. `data.default`
    is merged under it by the loader (its own keys win)."""

    dataset_name: str | None = None
    data_path: str | None = None
    split: str | None = None
    split_validation_size: float | None = Field(None, ge=0.0, lt=1.0)
    seed: int = 42
    # at most this many rows of each split, a random choice under `seed` (before split_validation_size)
    max_samples: int | None = Field(None, ge=1)
    # ResponseDataset / alpaca
    input_key: str | None = None
    output_key: str | None = None
    # openai_format
    chat_key: str | None = None
    system_key: str | None = None
    system_prompt: str | None = None
    tool_key: str | None = None
    use_preserving_dataset: bool = False
    # shared
    prompt_file: str | None = None
    system_prompt_file: str | None = None
    processor: str = "sft_processor"
    # extra constructor arguments for a dataset class given by dotted path
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataConfig(Section):
    max_input_seq_length: int = Field(..., ge=2)
    add_bos: bool = True
    add_eos: bool = True
    add_generation_prompt: bool = False
    # false: every token after the first carries loss (system, user and tool turns too), as
    # NeMo AutoModel's `answer_only_loss_mask: false`; validation loss then covers them as well
    answer_only_loss_mask: bool = True
    overlength: Literal["mask", "truncate", "drop"] = "truncate"
    shuffle: bool = True
    num_workers: int = Field(1, ge=0)
    # one dataset, or a list of datasets whose rows are mixed (concatenated, each row processed with
    # its own dataset's prompt and processor; `max_samples` sets each one's share)
    train: DatasetConfig | list[DatasetConfig]
    validation: DatasetConfig | list[DatasetConfig] | None = None
    # merged under `train` and `validation` (each entry of a list) by the loader; kept for display
    default: dict[str, Any] = Field(default_factory=dict)

    @field_validator("train", "validation")
    @classmethod
    def _non_empty_list(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("an empty list of datasets; give one dataset or a non-empty list")
        return value


# ---------------------------------------------------------------- logger


class WandbConfig(Section):
    project: str = "sft-dev"
    name: str | None = None
    entity: str | None = None


class TensorboardConfig(Section):
    log_dir: str = "tb_logs"


class MLflowConfig(Section):
    experiment_name: str = "sft-dev"
    run_name: str | None = None
    tracking_uri: str | None = None  # None: a local file store under logger.log_dir


class SwanlabConfig(Section):
    project: str = "sft-dev"
    name: str | None = None
    # SwanLab's own: null lets it choose (online after `swanlab login`); "offline" only writes
    # <run_dir>/swanlog (upload later with `swanlab sync`)
    mode: Literal["online", "local", "offline", "disabled"] | None = None


class GpuMonitoringConfig(Section):
    """How often `logger.monitor_gpus` samples the GPUs, and how often it hands them to the logs."""

    collection_interval: float = Field(10, gt=0, description="seconds between two samples of every GPU")
    flush_interval: float = Field(10, gt=0, description="seconds between two writes of the samples to the logs")


class LoggerConfig(Section):
    log_dir: str = "logs"
    wandb_enabled: bool = False
    tensorboard_enabled: bool = False
    mlflow_enabled: bool = False
    swanlab_enabled: bool = False  # needs the optional extra: `uv sync --extra swanlab`
    # GPU utilisation and memory of every GPU node, sampled into the logs (system/node_<i>/gpu_<j>/...)
    monitor_gpus: bool = True
    # at each validation, print the first N validation samples: prompt, target, greedy continuation
    num_val_samples_to_print: int = Field(0, ge=0)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = Field(default_factory=TensorboardConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    swanlab: SwanlabConfig = Field(default_factory=SwanlabConfig)
    gpu_monitoring: GpuMonitoringConfig = Field(default_factory=GpuMonitoringConfig)


# ---------------------------------------------------------------- cluster


class ClusterConfig(Section):
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpus_per_node: int = Field(1, ge=1)
    cpu_workers_per_node: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    # When a worker process dies: restart the workers from the last checkpoint up to this many
    # times per run; 0: stop with an error that says which checkpoint a resume would use.
    max_restarts: int = Field(0, ge=0)
    # NeMo RL: nodes per NVLink domain (e.g. GB200 NVL72), so that placement keeps a model-parallel
    # group inside one. Only null: this build places workers per node.
    segment_size: int | None = Field(None, ge=1)

    @field_validator("segment_size")
    @classmethod
    def _no_segments(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError(
                f"{value} asks for placement by NVLink segment (groups of nodes sharing an NVLink "
                "domain, e.g. GB200 NVL72), which this build does not do (it places workers node by "
                "node); set it to null"
            )
        return value

    def workers_per_node(self, device: Literal["cuda", "cpu"]) -> int:
        """Workers per node on `device` (`device: auto` is resolved by the cluster layer, where
        the job runs: nemo_rl.distributed.resolve_device)."""
        return self.gpus_per_node if device == "cuda" else self.cpu_workers_per_node

    def world_size(self, device: Literal["cuda", "cpu"]) -> int:
        return self.num_nodes * self.workers_per_node(device)


# ---------------------------------------------------------------- the whole run


class MasterConfig(Section):
    sft: SFTConfig
    policy: PolicyConfig
    data: DataConfig
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    logger: LoggerConfig = Field(default_factory=LoggerConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _check_cross_section(self) -> MasterConfig:
        if self.data.max_input_seq_length > self.policy.max_total_sequence_length:
            raise ValueError(
                f"data.max_input_seq_length={self.data.max_input_seq_length} exceeds "
                f"policy.max_total_sequence_length={self.policy.max_total_sequence_length}"
            )
        if self.sft.only_unmask_final and not self.data.answer_only_loss_mask:
            raise ValueError(
                "sft.only_unmask_final=true with data.answer_only_loss_mask=false: the first trains only "
                "the last assistant turn, the second every token; set one of them to its default"
            )
        if self.cluster.device == "cpu" and self.policy.megatron_cfg.enabled and self.policy.megatron_cfg.sequence_parallel:
            raise ValueError(
                "policy.megatron_cfg.sequence_parallel=true needs Transformer Engine or apex norms (GPU); "
                "cluster.device=cpu has neither; set it to false"
            )
        if self.policy.megatron_cfg.enabled and self.sft.val_generation.enabled:
            raise ValueError(
                "sft.val_generation.enabled=true with policy.megatron_cfg.enabled=true: generation is not "
                "available on the Megatron backend in this build; set sft.val_generation.enabled=false"
            )
        # With `device: auto` the world size depends on the machine the job runs on, so the
        # check waits for the cluster layer there (sft.setup), still before any worker starts.
        if self.cluster.device != "auto":
            problem = batch_split_problem(self.policy, self.cluster.world_size(self.cluster.device))
            if problem:
                raise ValueError(problem)
        return self


def batch_split_problem(policy: PolicyConfig, world_size: int) -> str | None:
    """Why the parallel layout does not divide `world_size` ranks, or why
    `policy.train_global_batch_size` does not split over the data-parallel ranks (world size /
    (tensor x context parallel size)) into whole micro-batches; None when both hold."""
    parallel = policy.parallel_layout()
    layout = parallel.layout_problem(world_size)
    if layout:
        return layout
    dp_size = parallel.data_parallel_size(world_size)
    per_rank, remainder = divmod(policy.train_global_batch_size, dp_size)
    if remainder or per_rank % policy.train_micro_batch_size:
        return (
            f"policy.train_global_batch_size={policy.train_global_batch_size} must split "
            f"evenly over {dp_size} data-parallel ranks ({world_size} workers / {_model_parallel_sizes(policy)}) "
            "into micro-batches of "
            f"policy.train_micro_batch_size={policy.train_micro_batch_size}"
        )
    return None


def _model_parallel_sizes(policy: PolicyConfig) -> str:
    if policy.megatron_cfg.enabled:
        m = policy.megatron_cfg
        return (
            f"tensor_model_parallel_size={m.tensor_model_parallel_size} x pipeline_model_parallel_size="
            f"{m.pipeline_model_parallel_size} x context_parallel_size={m.context_parallel_size}"
        )
    d = policy.dtensor_cfg
    return f"tensor_parallel_size={d.tensor_parallel_size} x context_parallel_size={d.context_parallel_size}"
