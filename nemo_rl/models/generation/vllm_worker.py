"""The `vllm` generation backend: one single-GPU vLLM engine per worker (data parallel).

vLLM is an optional extra installed only on GPU machines (`uv sync --extra vllm`); it is
imported here and nowhere else. Written to vLLM's offline API: `vllm.LLM`, `SamplingParams`,
`TokensPrompt` (prompts are our chat-template token ids, so vLLM never re-renders them) and
`LoRARequest` for an adapter directory (served over its base with `enable_lora`).
"""

from __future__ import annotations

import importlib.util
import os

from nemo_rl.config.eval_schema import VLLM_INSTALL_HINT, GenerationConfig
from nemo_rl.config.schema import TokenizerConfig
from nemo_rl.models.generation.interfaces import GenerationBackendError, GenerationOutput, cut_at_stop


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Refuse `generation.backend=vllm` up front, before any worker starts, when vLLM is absent."""
    if not vllm_installed():
        raise GenerationBackendError(
            "generation.backend=vllm: the vllm package is not installed in this environment. "
            f"Install it with `{VLLM_INSTALL_HINT}`, or set generation.backend=hf"
        )


class VllmGenerationWorker:
    """One vLLM engine on this worker's GPU, for `generation.model_name` (full model or adapter)."""

    def __init__(self, generation_cfg: GenerationConfig, tokenizer_cfg: TokenizerConfig, device: str = "cuda"):
        require_vllm()
        from vllm import LLM

        from nemo_rl.models.generation.loading import adapter_base, is_adapter_dir

        self.cfg = generation_cfg
        self.rank = int(os.environ.get("RANK", "0"))  # set by RayWorkerGroup
        vllm_cfg = generation_cfg.vllm_cfg
        self.lora_request = None
        model = generation_cfg.model_name
        lora_kwargs = {}
        if is_adapter_dir(model):
            from vllm.lora.request import LoRARequest

            names = {"checkpoint": "generation.model_name", "base_model": "generation.base_model"}
            self.lora_request = LoRARequest("adapter", 1, model)
            model = adapter_base(generation_cfg.model_name, generation_cfg.base_model, names)
            lora_kwargs = {"enable_lora": True, "max_lora_rank": vllm_cfg.max_lora_rank}
        self.description = f"vLLM engine for {generation_cfg.model_name}"
        self.llm = LLM(
            model=model,
            tokenizer=tokenizer_cfg.name,
            tensor_parallel_size=vllm_cfg.tensor_parallel_size,
            gpu_memory_utilization=vllm_cfg.gpu_memory_utilization,
            max_model_len=vllm_cfg.max_model_len,
            dtype=vllm_cfg.precision,
            enforce_eager=vllm_cfg.enforce_eager,
            seed=generation_cfg.seed,
            **lora_kwargs,
        )

    def describe(self) -> str:
        return self.description

    def generate(self, prompts: list[list[int]]) -> list[GenerationOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = self.cfg
        params = SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k if cfg.top_k is not None else -1,
            max_tokens=cfg.max_new_tokens,
            stop=list(cfg.stop_strings or []) or None,
            stop_token_ids=list(cfg.stop_token_ids or []) or None,
            seed=None if cfg.greedy else cfg.seed + self.rank,
        )
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        if not prompts:
            return []
        results = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        outputs = []
        for result in results:
            completion = result.outputs[0]
            text, _ = cut_at_stop(completion.text, cfg.stop_strings)
            finish = "stop" if completion.finish_reason == "stop" else "length"
            outputs.append(GenerationOutput(list(completion.token_ids), text, finish))
        return outputs

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log P(continuation | context) from vLLM's prompt log-probabilities."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not pairs:
            return []
        params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        requests = [TokensPrompt(prompt_token_ids=context + continuation) for context, continuation in pairs]
        results = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        scores = []
        for (context, continuation), result in zip(pairs, results, strict=True):
            # prompt_logprobs[t]: {token id: Logprob} for prompt token t given tokens < t
            per_token = result.prompt_logprobs[len(context) : len(context) + len(continuation)]
            scores.append(sum(entry[token].logprob for entry, token in zip(per_token, continuation, strict=True)))
        return scores
