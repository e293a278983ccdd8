"""Greedy generation and choice log-likelihoods of the `vllm` backend against the `hf` backend,
on the same weights: a full model and a LoRA adapter over it. For a machine with an NVIDIA GPU.

    uv sync --extra vllm
    uv run python benchmarks/vllm_vs_hf.py --out vllm_vs_hf.json
    uv run python benchmarks/vllm_vs_hf.py --model results/sft_tiny_eval/step_600/hf --adapter results/sft_tiny_lora/step_150/hf

What is compared, and how:
  - The prompts: the first `--num-prompts` questions of the embedded SQuAD-format validation
    split, rendered with the checkpoint's chat template exactly as `run_eval.py` renders them.
  - Both backends run in this process (no Ray) on one GPU, one after the other: our
    `HfGenerationWorker` (transformers' `generate`, left-padded batches) and our
    `VllmGenerationWorker` (`vllm.LLM`, `TokensPrompt`, `LoRARequest`), greedy, the same
    `--max-new-tokens` and precision (float32 by default: bf16 rounding alone can flip a greedy
    choice between two near-equal logits).
  - Per prompt: whether the generated token ids are identical, else the first position where
    they differ; and for each prompt's reference answer, log P(answer | prompt) from each backend.
  - The adapter: `--adapter DIR`, or by default a rank-8 LoRA adapter with random (non-zero)
    weights over the model, made here with peft and saved in PEFT's format, as training saves
    adapters. vLLM serves it with `enable_lora`; hf applies it with `peft.PeftModel`.

It prints one table row per model and writes everything (per-prompt ids included) as JSON.
The exit status is 0 when every greedy output is identical and every log-likelihood agrees to
`--logprob-tolerance`, 1 otherwise; 2 when it cannot run here (no CUDA, or no vLLM).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "assets" / "tiny-llama"
SQUAD_TINY = REPO / "assets" / "squad-tiny"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TINY_MODEL), help="a full model directory (default: the embedded tiny Llama)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter directory over --model (default: a random one made here)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--logprob-tolerance", type=float, default=1e-2, help="absolute, per answer, in nats")
    parser.add_argument("--out", default="vllm_vs_hf.json")
    return parser.parse_args(argv)


def cannot_run_reason() -> str | None:
    """Why this machine cannot run the comparison, or None."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: run this on a machine with an NVIDIA GPU"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed: `uv sync --extra vllm` first"
    return None


def make_random_adapter(model_dir: str, directory: Path, seed: int = 0) -> str:
    """A rank-8 LoRA adapter on every attention and MLP projection, both factors random (peft
    starts B at zero, which would make the adapter a no-op and the comparison vacuous)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory)
    return str(directory)


def squad_prompts(tokenizer_dir: str, count: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, reference answer ids) of the first `count` validation questions."""
    from nemo_rl.algorithms.eval import encode_prompts, load_eval_samples
    from nemo_rl.config.eval_schema import EvalMasterConfig
    from nemo_rl.config.loader import load_config
    from nemo_rl.data.tokenizer import get_tokenizer

    cfg = load_config(REPO / "configs" / "eval.yaml", [
        f"generation.model_name={tokenizer_dir}", f"eval.max_prompts={count}", f"data.data_path={SQUAD_TINY}",
    ], root=EvalMasterConfig)
    tokenizer = get_tokenizer(cfg.tokenizer)
    samples = load_eval_samples(cfg.data, cfg.eval)
    encode_prompts(samples, tokenizer, cfg)
    answers = [list(tokenizer(s.reference, add_special_tokens=False)["input_ids"]) for s in samples]
    return [s.prompt_ids for s in samples], answers


def run_backend(backend: str, checkpoint: str, tokenizer_dir: str, args, prompts, answers) -> dict:
    """Greedy token ids and answer log-likelihoods of one backend; frees the GPU afterwards."""
    import gc

    import torch

    from nemo_rl.config.eval_schema import GenerationConfig
    from nemo_rl.config.schema import TokenizerConfig

    generation_cfg = GenerationConfig(
        backend=backend, model_name=checkpoint, max_new_tokens=args.max_new_tokens, temperature=0.0,
        batch_size=16, precision=args.precision,
        vllm_cfg={"precision": args.precision, "gpu_memory_utilization": 0.3, "max_model_len": 1024, "enforce_eager": True},
    )
    tokenizer_cfg = TokenizerConfig(name=tokenizer_dir)
    if backend == "hf":
        from nemo_rl.models.generation.hf_worker import HfGenerationWorker

        worker = HfGenerationWorker(generation_cfg, tokenizer_cfg, device="cuda")
    else:
        from nemo_rl.models.generation.vllm_worker import VllmGenerationWorker

        worker = VllmGenerationWorker(generation_cfg, tokenizer_cfg, device="cuda")
    outputs = worker.generate(prompts)
    logprobs = worker.loglikelihood(list(zip(prompts, answers, strict=True)))
    result = {"token_ids": [o.token_ids for o in outputs], "texts": [o.text for o in outputs], "answer_logprobs": logprobs}
    del worker
    gc.collect()
    torch.cuda.empty_cache()
    return result


def compare(hf: dict, vllm: dict, tolerance: float) -> dict:
    first_differences = []
    for hf_ids, vllm_ids in zip(hf["token_ids"], vllm["token_ids"], strict=True):
        if hf_ids == vllm_ids:
            first_differences.append(None)
            continue
        position = next((i for i, (a, b) in enumerate(zip(hf_ids, vllm_ids)) if a != b), min(len(hf_ids), len(vllm_ids)))
        first_differences.append(position)
    gaps = [abs(a - b) for a, b in zip(hf["answer_logprobs"], vllm["answer_logprobs"], strict=True)]
    identical = sum(d is None for d in first_differences)
    return {
        "num_prompts": len(first_differences),
        "identical_greedy_outputs": identical,
        "first_difference_positions": first_differences,
        "max_answer_logprob_gap": max(gaps),
        "passed": identical == len(first_differences) and max(gaps) <= tolerance,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = cannot_run_reason()
    if reason is not None:
        print(f"vllm_vs_hf: cannot run here: {reason}", file=sys.stderr)
        return 2
    import vllm

    report: dict = {"vllm_version": vllm.__version__, "precision": args.precision, "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory() as scratch:
        adapter = args.adapter or make_random_adapter(args.model, Path(scratch) / "random_lora")
        prompts, answers = squad_prompts(args.model, args.num_prompts)
        for label, checkpoint in (("model", args.model), ("lora_adapter", adapter)):
            hf = run_backend("hf", checkpoint, args.model, args, prompts, answers)
            served = run_backend("vllm", checkpoint, args.model, args, prompts, answers)
            report[label] = {"checkpoint": checkpoint, **compare(hf, served, args.logprob_tolerance),
                             "hf": hf, "vllm": served}
    print("| weights      | identical greedy outputs | max answer log-prob gap | passed |")
    print("| ------------ | ------------------------ | ----------------------- | ------ |")
    for label in ("model", "lora_adapter"):
        row = report[label]
        print(f"| {label:<12} | {row['identical_greedy_outputs']}/{row['num_prompts']:<22} | "
              f"{row['max_answer_logprob_gap']:<23.2e} | {row['passed']} |")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"written: {args.out}")
    return 0 if report["model"]["passed"] and report["lora_adapter"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
