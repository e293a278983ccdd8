"""Typed configuration of an evaluation run (`examples/run_eval.py --config configs/eval.yaml`).

The sections follow NeMo RL's eval.yaml: `eval` (what is scored and where results go),
`generation` (the checkpoint, the backend and the sampling keys), `tokenizer`, `data` (one
dataset, by the same classes training uses) and `cluster`. Unknown keys are refused, as in
training's schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nemo_rl.config.schema import ClusterConfig, DatasetConfig, Section, TokenizerConfig

BENCHMARKS = ("squad", "math", "multiple_choice")
VLLM_INSTALL_HINT = "uv sync --extra vllm (on a machine with NVIDIA GPUs)"


class VllmConfig(Section):
    """NeMo RL's `vllm_cfg` keys, read by the vLLM backend only."""

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    max_model_len: int | None = Field(None, ge=1)
    precision: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    enforce_eager: bool = False
    max_lora_rank: int = Field(64, ge=1)


class GenerationConfig(Section):
    """What generates and how. Sampling keys as NeMo RL's `policy.generation`."""

    backend: Literal["hf", "vllm"] = "hf"
    # A step_<N>/hf directory, a LoRA adapter directory (adapter_config.json), or any HF model.
    model_name: str
    # For an adapter: its base, when not the adapter's recorded base_model_name_or_path.
    base_model: str | None = None
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, description="null or -1: no top-k filtering")
    stop_strings: list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int = 42
    # hf backend: prompts per `generate` call on one worker (left-padded to the longest).
    batch_size: int = Field(8, ge=1)
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    vllm_cfg: VllmConfig = Field(default_factory=VllmConfig)

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        if self.top_k is not None and self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"generation.top_k={self.top_k}: expected null, -1 (off) or a positive integer")
        if self.stop_strings is not None and not all(self.stop_strings):
            raise ValueError("generation.stop_strings: an empty string would stop before the first token")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class EvalDataConfig(DatasetConfig):
    """One dataset, by the classes training uses (`squad`, `ResponseDataset`, `openai_format`,
    a dotted class path); `split` picks the rows (default `validation`)."""

    split: str | None = "validation"
    max_input_seq_length: int = Field(1024, ge=2)
    add_bos: bool = True


class EvalConfig(Section):
    # squad: exact match and F1 of the generation against the reference answer;
    # math: the final (boxed) answer checked for equivalence, pass@1 and pass@k;
    # multiple_choice: the choice with the highest log-likelihood, accuracy.
    benchmark: Literal["squad", "math", "multiple_choice"] = "squad"
    # Generations per prompt (NeMo RL: num_tests_per_prompt); pass@k needs k <= num_samples.
    num_samples: int = Field(1, ge=1)
    k_value: int = Field(1, ge=1)
    # Evaluate the first N rows only; 0: all of them.
    max_prompts: int = Field(0, ge=0)
    output_dir: str = "results/eval"

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.k_value > self.num_samples:
            raise ValueError(
                f"eval.k_value={self.k_value} exceeds eval.num_samples={self.num_samples}: pass@k "
                "needs at least k samples per prompt"
            )
        return self


class EvalMasterConfig(Section):
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generation: GenerationConfig
    tokenizer: TokenizerConfig
    data: EvalDataConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _check_cross_section(self) -> EvalMasterConfig:
        if self.eval.num_samples > 1 and self.generation.greedy:
            raise ValueError(
                f"eval.num_samples={self.eval.num_samples} with generation.temperature=0: greedy "
                "decoding gives identical samples; set generation.temperature > 0 or num_samples=1"
            )
        if self.eval.benchmark == "multiple_choice" and self.eval.num_samples > 1:
            raise ValueError("eval.num_samples > 1 with eval.benchmark=multiple_choice: choices are scored, not sampled")
        if self.generation.backend == "vllm" and self.generation.vllm_cfg.tensor_parallel_size > 1:
            raise ValueError(
                "generation.vllm_cfg.tensor_parallel_size > 1: this build runs one single-GPU vLLM "
                "engine per worker (data parallel); set it to 1 and raise cluster.gpus_per_node"
            )
        return self
