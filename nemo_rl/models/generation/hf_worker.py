"""The `hf` generation backend: transformers' `generate`, batched with left padding, one model
replica per worker (CPU or one GPU). Runs inside a Ray actor (`RayWorkerGroup`) or in-process.

Each prompt is token ids (rendered by the training chat template on the driver). A batch is
left-padded to its longest prompt with an attention mask, so every prompt ends at the same
position and the new tokens line up; positions follow the mask, so a padded prompt sees exactly
what it sees alone and greedy decoding does not depend on the batch it lands in.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from nemo_rl.config.eval_schema import GenerationConfig
from nemo_rl.config.schema import TokenizerConfig
from nemo_rl.models.generation.interfaces import GenerationOutput, cut_at_stop


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class HfGenerationWorker:
    """One replica of the checkpoint (`generation.model_name`, full model or LoRA adapter)."""

    def __init__(self, generation_cfg: GenerationConfig, tokenizer_cfg: TokenizerConfig, device: str = "cpu"):
        from nemo_rl.data.tokenizer import get_tokenizer
        from nemo_rl.models.generation.loading import load_generation_model

        names = {"checkpoint": "generation.model_name", "base_model": "generation.base_model"}
        self.cfg = generation_cfg
        self.rank = int(os.environ.get("RANK", "0"))  # set by RayWorkerGroup
        self.device = torch.device(device)
        self.model, _, self.description = load_generation_model(
            generation_cfg.model_name, base_model=generation_cfg.base_model, device=self.device,
            dtype=getattr(torch, generation_cfg.precision), names=names,
        )
        self.tokenizer = get_tokenizer(tokenizer_cfg)
        eos = _token_ids(self.model.generation_config.eos_token_id) + _token_ids(self.tokenizer.eos_token_id)
        self.stop_ids = list(dict.fromkeys(eos + list(generation_cfg.stop_token_ids or [])))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    def describe(self) -> str:
        return self.description

    def _sampling_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.greedy:
            # explicit, so that a generation_config.json with sampling defaults is not applied
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        top_k = cfg.top_k if cfg.top_k not in (None, -1) else 0  # 0: transformers' "off"
        return {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": top_k}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[GenerationOutput]:
        """One completion per prompt, in order; sampling seeded with generation.seed + RANK."""
        if not prompts:
            return []
        torch.manual_seed(self.cfg.seed + self.rank)
        outputs: list[GenerationOutput] = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            outputs += self._generate_batch(prompts[start : start + self.cfg.batch_size])
        return outputs

    def _generate_batch(self, prompts: list[list[int]]) -> list[GenerationOutput]:
        width = max(len(p) for p in prompts)
        input_ids_BT = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids_BT[row, width - len(prompt) :] = torch.tensor(prompt)
            mask_BT[row, width - len(prompt) :] = 1
        extra = {}
        if self.cfg.stop_strings:
            extra = {"stop_strings": list(self.cfg.stop_strings), "tokenizer": self.tokenizer}
        out_BT = self.model.generate(
            input_ids=input_ids_BT.to(self.device),
            attention_mask=mask_BT.to(self.device),
            max_new_tokens=self.cfg.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            **self._sampling_kwargs(),
            **extra,
        )
        results = []
        for row in range(len(prompts)):
            new_ids = out_BT[row, width:].tolist()
            end = next((i for i, token in enumerate(new_ids) if token in self.stop_ids), None)
            ids = new_ids if end is None else new_ids[: end + 1]
            text = self.tokenizer.decode(ids[:end] if end is not None else ids, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, self.cfg.stop_strings)
            finish = "stop" if end is not None or stopped else "length"
            results.append(GenerationOutput(token_ids=ids, text=text, finish_reason=finish))
        return results

    @torch.no_grad()
    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """For each (context ids, continuation ids): log P(continuation | context), summed over
        the continuation's tokens. Batched with right padding; padding never enters a sum."""
        scores: list[float] = []
        for start in range(0, len(pairs), self.cfg.batch_size):
            chunk = pairs[start : start + self.cfg.batch_size]
            sequences = [context + continuation for context, continuation in chunk]
            width = max(len(s) for s in sequences)
            input_ids_BT = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask_BT = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(sequences):
                input_ids_BT[row, : len(ids)] = torch.tensor(ids)
                mask_BT[row, : len(ids)] = 1
            logits_BTV = self.model(input_ids=input_ids_BT.to(self.device), attention_mask=mask_BT.to(self.device)).logits
            logprobs_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
            for row, (context, continuation) in enumerate(chunk):
                # token t is predicted at position t - 1
                positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
                targets = torch.tensor(continuation)
                scores.append(float(logprobs_BTV[row, positions.to(self.device), targets.to(self.device)].sum()))
        return scores
