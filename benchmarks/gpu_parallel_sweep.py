"""Training throughput of the DTensor worker under tensor (and context) parallelism, on GPUs.

    uv run benchmarks/gpu_parallel_sweep.py [--models llama-3.2-1b llama-8b-shape]
        [--tp 1 2] [--cp 1 2] [--seq-lens 4096 8192 16384] [--rounds 2] [--out results/sweep.json]

For each case (model shape x TP x CP x packed length) it starts one process per visible GPU
(NCCL), builds `DTensorPolicyWorker` as a training run does (bf16 compute, fp32 master weights,
sequence packing with a token budget of the packed length, activation checkpointing) and runs
`--warmup` untimed and `--steps` timed optimizer steps on random packed samples (lengths
uniform in [packed length / 4, packed length]). Cases run in interleaved rounds (every case
once per round) so that drifting clocks or a noisy neighbour hit every case alike; each case's
best round is reported.

Reported per case: tokens/s per GPU, MFU (the worker's model FLOPs over the measured time and
the GPU's datasheet dense bf16 peak, from nemo_rl/utils/flops.py's table, e.g. H100/H200 SXM
989 TFLOP/s; `NEMO_RL_PEAK_TFLOPS` overrides it) and the peak allocated GPU memory of rank 0.
Prints a table and writes JSON.

Models have random weights built from a config (no download): Llama-3.2-1B's shape and an
8B shape (Llama-3.1-8B's). The 8B model is written once as bf16 safetensors (16 GB) and every
rank loads it in fp32 (32 GB of host memory per rank, until sharded loading lands).

Context parallelism runs only where this build accepts `context_parallel_size > 1`; otherwise
those cases are listed as skipped, with the reason. The script refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemo_rl.config.schema import PolicyConfig  # noqa: E402

MODEL_SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "llama-8b-shape": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True)
class Case:
    model: str
    tensor_parallel_size: int
    context_parallel_size: int
    packed_length: int

    @property
    def name(self) -> str:
        return f"{self.model} tp{self.tensor_parallel_size} cp{self.context_parallel_size} {self.packed_length // 1024}k"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--gpus", type=int, default=None, help="world size (default: every visible GPU)")
    parser.add_argument("--samples-per-rank", type=int, default=8, help="packed samples per data-parallel rank per step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/gpu_parallel_sweep.json")
    args = parser.parse_args(argv)
    for name in ("tp", "cp", "seq_lens"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')}: every value must be >= 1")
    return args


def context_parallel_refusal() -> str | None:
    """Why this build refuses context_parallel_size=2 (the config's own message), or None."""
    try:
        PolicyConfig(model_name="unused", dtensor_cfg={"context_parallel_size": 2})
    except Exception as exc:  # the schema's validation error, whatever its type
        return str(exc).strip().splitlines()[-1]
    return None


def build_cases(args: argparse.Namespace, world_size: int) -> tuple[list[Case], list[tuple[Case, str]]]:
    """(cases to run, [(case, why skipped)]), in a fixed order."""
    cp_refusal = context_parallel_refusal() if any(cp > 1 for cp in args.cp) else None
    cases, skipped = [], []
    for model in args.models:
        for tp in args.tp:
            for cp in args.cp:
                for length in args.seq_lens:
                    case = Case(model, tp, cp, length)
                    if cp > 1 and cp_refusal:
                        skipped.append((case, f"context parallelism not in this build: {cp_refusal}"))
                    elif world_size % (tp * cp):
                        skipped.append((case, f"tp x cp = {tp * cp} does not divide the {world_size} GPUs"))
                    elif MODEL_SHAPES[model]["num_key_value_heads"] % tp:
                        skipped.append((case, f"tp={tp} does not divide the KV heads"))
                    else:
                        cases.append(case)
    return cases, skipped


def policy_config(case: Case, model_dir: str, *, world_size: int, samples_per_rank: int) -> PolicyConfig:
    """What a training run of this case would configure (bf16, packing, checkpointing)."""
    data_parallel = world_size // (case.tensor_parallel_size * case.context_parallel_size)
    return PolicyConfig(
        model_name=model_dir,
        tokenizer={"name": model_dir},
        precision="bfloat16",
        train_global_batch_size=samples_per_rank * data_parallel,
        train_micro_batch_size=1,
        max_total_sequence_length=case.packed_length,
        sequence_packing={"enabled": True, "train_mb_tokens": case.packed_length},
        dtensor_cfg={
            "tensor_parallel_size": case.tensor_parallel_size,
            "context_parallel_size": case.context_parallel_size,
            "sequence_parallel": case.tensor_parallel_size > 1,
            "activation_checkpointing": True,
        },
    )


def random_samples(num_samples: int, packed_length: int, vocab_size: int, seed: int):
    """Right-padded rows of lengths uniform in [packed_length / 4, packed_length], every token
    after the first a target."""
    from nemo_rl.data.batched_data_dict import BatchedDataDict

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(packed_length // 4, packed_length + 1, (num_samples,), generator=g)
    input_ids = torch.randint(1, vocab_size, (num_samples, packed_length), generator=g)
    token_mask = (torch.arange(packed_length)[None] < lengths[:, None]).float()
    input_ids[token_mask == 0] = 0
    return BatchedDataDict(
        input_ids=input_ids, input_lengths=lengths, token_mask=token_mask, sample_mask=torch.ones(num_samples)
    )


def _rank(rank: int, world_size: int, port: int, case: Case, model_dir: str, args: argparse.Namespace, out_path: str) -> None:
    from nemo_rl.algorithms.loss_functions import NLLLoss
    from nemo_rl.models.policy.micro_batching import MicroBatchPlan
    from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = policy_config(case, model_dir, world_size=world_size, samples_per_rank=args.samples_per_rank)
    worker = DTensorPolicyWorker(cfg, seed=0, device="cuda")
    plan = MicroBatchPlan.for_training(cfg)
    vocab = MODEL_SHAPES[case.model]["vocab_size"]
    timed = []
    for step in range(args.warmup + args.steps):
        batch = random_samples(args.samples_per_rank, case.packed_length, vocab, seed=step * 1000 + worker.dp_rank)
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = worker.train(batch, NLLLoss(), plan)
        torch.cuda.synchronize()
        if step >= args.warmup:
            timed.append({**result, "seconds": time.perf_counter() - start})
    if rank == 0:
        torch.save(timed, out_path)
    worker.shutdown()


def summarize(case: Case, steps: list[dict], world_size: int) -> dict:
    seconds = sum(s["seconds"] for s in steps)
    tokens = sum(s["num_tokens"] for s in steps)
    flops = sum(s["model_flops"] for s in steps)
    peak = steps[0]["peak_flops"]
    return {
        **asdict(case),
        "tokens_per_s_per_gpu": tokens / seconds / world_size,
        "mfu": flops / seconds / (peak * world_size) if peak else None,
        "peak_memory_gb": max(s["peak_memory_gb"] for s in steps),
        "step_seconds": seconds / len(steps),
    }


def format_table(rows: list[dict], skipped: list[tuple[Case, str]]) -> str:
    lines = [f"{'case':<32} {'tokens/s/GPU':>13} {'MFU':>7} {'peak GB':>8}"]
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        case = Case(row["model"], row["tensor_parallel_size"], row["context_parallel_size"], row["packed_length"])
        lines.append(f"{case.name:<32} {row['tokens_per_s_per_gpu']:>13.0f} {mfu:>7} {row['peak_memory_gb']:>8.1f}")
    lines += [f"{case.name:<32} skipped: {why}" for case, why in skipped]
    return "\n".join(lines)


def _save_random_model(model: str, path: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=131072, **MODEL_SHAPES[model])
    torch.manual_seed(0)
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_parallel_sweep: needs CUDA GPUs (NCCL); none visible here. Run it on a GPU machine.", file=sys.stderr)
        return 2
    import torch.multiprocessing as mp

    world_size = args.gpus or torch.cuda.device_count()
    cases, skipped = build_cases(args, world_size)
    best: dict[Case, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dirs = {m: _save_random_model(m, os.path.join(tmp, m)) for m in args.models if any(c.model == m for c in cases)}
        for round_index in range(args.rounds):
            for case in cases:
                out_path = os.path.join(tmp, "result.pt")
                mp.start_processes(
                    _rank, args=(world_size, _free_port(), case, model_dirs[case.model], args, out_path),
                    nprocs=world_size, join=True, start_method="spawn",
                )
                row = summarize(case, torch.load(out_path), world_size)
                print(f"round {round_index + 1}: {case.name}: {row['tokens_per_s_per_gpu']:.0f} tokens/s/GPU", flush=True)
                if case not in best or row["tokens_per_s_per_gpu"] > best[case]["tokens_per_s_per_gpu"]:
                    best[case] = row
    rows = [best[case] for case in cases]
    print(format_table(rows, skipped))
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "world_size": world_size,
        "peak_source": "NEMO_RL_PEAK_TFLOPS" if os.environ.get("NEMO_RL_PEAK_TFLOPS") else "datasheet dense bf16 (nemo_rl/utils/flops.py)",
        "args": vars(args),
        "results": rows,
        "skipped": [{**asdict(case), "reason": why} for case, why in skipped],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
