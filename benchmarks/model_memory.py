"""Peak resident memory per rank while loading a model and while writing its hf/ directory.

    uv run python benchmarks/model_memory.py                       # ~200M-parameter Llama, 1, 2, 4 ranks
    uv run python benchmarks/model_memory.py --ranks 1 2 --hidden 256 --layers 4 --vocab 8192

A random Llama of the given shape is created from a config (fp32) and saved as safetensors once.
Then, for each world size N, N fresh processes form a gloo group and each builds a
`DTensorPolicyWorker` on it (FSDP over N ranks: meta-device build, its shards read from the
files) and writes hf/ (every rank its own slices). Each rank measures its own resident-set
high-water mark (VmHWM in /proc/self/status): after imports (the baseline), after the worker is
built (loading), and after hf/ is written, the mark being reset before the save
(/proc/self/clear_refs) so that the save's peak is its own. With sharded loading and saving the
increase over the baseline should be close to model bytes / N plus a constant.
Prints a table and writes JSON (default benchmarks/results/model_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import tempfile
from pathlib import Path

import torch.multiprocessing as mp

GiB = 2**30


def _rss_high_water_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _reset_rss_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS


def _rank(rank: int, world_size: int, port: int, model_dir: str, out_dir: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from nemo_rl.config.schema import PolicyConfig
    from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

    _reset_rss_high_water()
    baseline = _rss_high_water_bytes()
    cfg = PolicyConfig(
        model_name=model_dir,
        tokenizer={"name": model_dir},
        train_global_batch_size=world_size,
        train_micro_batch_size=1,
        max_total_sequence_length=16,
        precision="float32",
    )
    worker = DTensorPolicyWorker(cfg, seed=0, device="cpu")
    load_peak = _rss_high_water_bytes()
    _reset_rss_high_water()
    save_start = _rss_high_water_bytes()
    worker.save_checkpoint(weights_path=None, hf_path=os.path.join(out_dir, f"hf_{world_size}"))
    save_peak = _rss_high_water_bytes()
    worker.shutdown()
    queue.put(
        {
            "rank": rank,
            "baseline_gib": baseline / GiB,
            "load_peak_gib": load_peak / GiB,
            "load_increase_gib": (load_peak - baseline) / GiB,
            "save_peak_gib": save_peak / GiB,
            "save_increase_gib": (save_peak - save_start) / GiB,
            "bytes_read_gib": worker.load_report.bytes_read / GiB,
        }
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_model(path: str, args: argparse.Namespace) -> int:
    """Saves a random fp32 Llama (and a tokenizer-free config) at `path`; returns its bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_memory.json"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="model_memory_")
    try:
        model_dir = os.path.join(work, "model")
        model_bytes = _make_model(model_dir, args)
        rows = []
        context = mp.get_context("spawn")
        for world_size in args.ranks:
            queue = context.Queue()
            port = _free_port()
            processes = [
                context.Process(target=_rank, args=(r, world_size, port, model_dir, work, queue)) for r in range(world_size)
            ]
            for p in processes:
                p.start()
            results = [queue.get(timeout=3600) for _ in processes]
            for p in processes:
                p.join()
            for result in sorted(results, key=lambda r: r["rank"]):
                rows.append({"world_size": world_size, **result})
            shutil.rmtree(os.path.join(work, f"hf_{world_size}"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"model: {model_bytes / GiB:.3f} GiB of fp32 parameters ({model_bytes // 4 / 1e6:.0f}M)")
    header = f"{'ranks':>5} {'rank':>4} {'baseline':>9} {'load +':>8} {'save +':>8} {'read':>7} {'model/N':>8}   (GiB)"
    print(header)
    for row in rows:
        print(
            f"{row['world_size']:>5} {row['rank']:>4} {row['baseline_gib']:>9.3f} {row['load_increase_gib']:>8.3f} "
            f"{row['save_increase_gib']:>8.3f} {row['bytes_read_gib']:>7.3f} {model_bytes / GiB / row['world_size']:>8.3f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"model_bytes": model_bytes, "args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows},
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
