"""SFT training throughput on one fixed synthetic workload: our DTensor policy worker with
plain padded micro-batches, dynamic batching, sequence packing and packing + torch.compile,
next to Hugging Face TRL's SFTTrainer with its padding and its packing.

    uv sync --group bench                                  # TRL, for the comparison rows
    uv run python benchmarks/sft_throughput.py --preset cpu-small --out bench_cpu.json
    uv run python benchmarks/sft_throughput.py --preset gpu-llama-1b --out bench_h100.json

What is measured, and how:
  - The workload: seeded random samples shaped like SQuAD prompts for a chat template
    (prompt 150-250 tokens, answer 5-30, loss on the answer only), or `--workload chat`
    (long-tailed lengths). Random token ids: throughput does not depend on them.
  - The model: a randomly initialised Llama of the preset's shape (no download), saved once
    and loaded by every run, so all runs train the same weights.
  - Our worker runs in-process as a single-rank gloo/NCCL group (no Ray): this times the
    training step itself, as a worker does it, without the driver's scheduling.
  - Each configuration runs in a fresh process (clean memory high-water mark, no shared
    compile cache), first `warmup` optimizer steps untimed (compilation happens there),
    then `steps` timed steps over the next global batches.
  - tokens/s counts the real tokens (prompt + answer, no padding) of the samples trained on.
    MFU = model FLOPs (nemo_rl/utils/flops.py: 6 x weights per token + causal attention,
    the output layer at target positions only, padding not counted) / step time / peak; on CPU the peak is a matmul measured once here
    (a practical peak, not a datasheet one), on GPUs the bf16 datasheet number.
  - Peak memory: the GPU's max allocated bytes over the timed steps; on CPU the largest
    resident set size sampled during the timed steps (it includes the process baseline:
    Python, torch, the model and optimizer state).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

LLAMA_3_2_1B = dict(  # meta-llama/Llama-3.2-1B's config.json, minus the weights
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8192,
    ),
)

PRESETS: dict[str, dict[str, Any]] = {
    # A few minutes on a laptop CPU. The vocabulary is a real one's size (Llama 2's), so the
    # output layer and the loss weigh what they weigh in practice.
    "cpu-small": dict(
        model=dict(
            vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        ),
        device="cpu", precision="float32", global_batch=8, micro_batch=4, warmup=1, steps=3,
    ),
    # For a lent GPU: Llama-3.2-1B's shape, bf16 compute on fp32 master weights.
    "gpu-llama-1b": dict(
        model=LLAMA_3_2_1B, device="cuda", precision="bfloat16",
        global_batch=64, micro_batch=8, warmup=3, steps=10,
    ),
}

RUNS = [  # (name, framework, worker policy overrides or TRL options)
    ("padded", "ours", {}),
    ("padded, full logits", "ours", {"dtensor_cfg": {"chunked_loss": False}}),
    ("dynamic batching", "ours", {"dynamic_batching": {"enabled": True}}),
    ("packing", "ours", {"sequence_packing": {"enabled": True}}),
    ("packing + compile", "ours", {"sequence_packing": {"enabled": True}, "dtensor_cfg": {"compile": True}}),
    ("padding", "trl", {"packing": False}),
    ("packing", "trl", {"packing": True}),
]


# ---------------------------------------------------------------- workload


def make_workload(kind: str, num_samples: int, vocab: int, seed: int = 1234) -> list[dict[str, Any]]:
    """Samples {"input_ids": [...], "prompt_len": n}; the loss covers input_ids[prompt_len:]."""
    rng = random.Random(seed)
    samples = []
    for _ in range(num_samples):
        if kind == "squad":
            prompt, answer = rng.randint(150, 250), rng.randint(5, 30)
        else:  # chat: long-tailed turns, many short and a few long
            prompt = min(1536, int(rng.lognormvariate(5.0, 0.9)) + 8)
            answer = min(512, int(rng.lognormvariate(4.5, 0.9)) + 4)
        ids = [rng.randrange(3, vocab) for _ in range(prompt + answer)]
        samples.append({"input_ids": ids, "prompt_len": prompt})
    return samples


def global_batches(samples, global_batch: int):
    from nemo_rl.data.collate import sft_collate

    batches = []
    for start in range(0, len(samples) - global_batch + 1, global_batch):
        datums = [
            {
                "input_ids": s["input_ids"],
                "token_mask": [0] * s["prompt_len"] + [1] * (len(s["input_ids"]) - s["prompt_len"]),
                "loss_multiplier": 1.0,
                "idx": start + i,
            }
            for i, s in enumerate(samples[start : start + global_batch])
        ]
        batches.append(sft_collate(datums, pad_token_id=0))
    return batches


# ---------------------------------------------------------------- measuring


class PeakMemory:
    """GPU: max allocated bytes since `start`. CPU: largest RSS sampled every 5 ms."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def start(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop_gb(self) -> float | None:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        if not hasattr(self, "_thread"):
            return None
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _summary(step_times, tokens, flops, peak_flops, peak_mem_gb, **extra) -> dict[str, Any]:
    seconds = sum(step_times)
    return {
        "status": "ok",
        "tokens_per_s": sum(tokens) / seconds,
        "step_time_s": seconds / len(step_times),
        "peak_mem_gb": peak_mem_gb,
        "mfu": sum(flops) / seconds / peak_flops if peak_flops else None,
        "tokens_per_step": sum(tokens) / len(tokens),
        **extra,
    }


# ---------------------------------------------------------------- our worker


def run_ours(preset: dict, model_dir: str, overrides: dict, samples, peak_flops: float | None) -> dict:
    from nemo_rl.config.schema import PolicyConfig
    from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker
    from nemo_rl.utils.flops import training_flops

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    max_len = max(len(s["input_ids"]) for s in samples)
    mb_tokens = preset["micro_batch"] * max_len  # NeMo RL's default train_mb_tokens
    fields: dict[str, Any] = dict(
        model_name=model_dir,
        tokenizer={"name": model_dir},
        train_global_batch_size=preset["global_batch"],
        train_micro_batch_size=preset["micro_batch"],
        max_total_sequence_length=max_len,
        precision=preset["precision"],
        max_grad_norm=1.0,
        optimizer={"name": "torch.optim.AdamW", "kwargs": {"lr": 1e-5, "weight_decay": 0.0}},
    )
    for key, value in overrides.items():
        fields[key] = dict(value)
        if key in ("dynamic_batching", "sequence_packing"):
            fields[key].setdefault("train_mb_tokens", mb_tokens)
    if overrides.get("dtensor_cfg", {}).get("compile") and "sequence_packing" in overrides:
        # Packed rows padded to the full budget: one static shape, one compilation.
        fields["sequence_packing"]["sequence_length_round"] = mb_tokens
    cfg = PolicyConfig(**fields)
    worker = DTensorPolicyWorker(cfg, seed=0, device=preset["device"])
    batches = global_batches(samples, preset["global_batch"])
    for batch in batches[: preset["warmup"]]:
        worker.train(batch, micro_batch_size=cfg.train_micro_batch_size)
    step_times, tokens, flops = [], [], []
    memory = PeakMemory(preset["device"])
    memory.start()
    for batch in batches[preset["warmup"] : preset["warmup"] + preset["steps"]]:
        _sync(preset["device"])
        start = time.perf_counter()
        metrics = worker.train(batch, micro_batch_size=cfg.train_micro_batch_size)
        _sync(preset["device"])
        step_times.append(time.perf_counter() - start)
        tokens.append(metrics["num_tokens"])
        lengths = batch["input_lengths"].tolist()
        flops.append(training_flops(worker.model.config, lengths, num_targets=metrics["num_valid_tokens"]))
    peak_mem = memory.stop_gb()
    result = _summary(step_times, tokens, flops, peak_flops, peak_mem, final_loss=metrics["loss"])
    result["chunked_loss"] = worker.chunked_loss
    worker.shutdown()
    return result


# ---------------------------------------------------------------- TRL


def run_trl(preset: dict, model_dir: str, options: dict, samples, peak_flops: float | None) -> dict:
    try:
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    except ImportError as e:
        return {"status": f"skipped: {e.name} is not installed (uv sync --group bench)"}
    from nemo_rl.utils.flops import training_flops

    device, packing = preset["device"], options["packing"]
    max_len = max(len(s["input_ids"]) for s in samples)
    total_steps = preset["warmup"] + preset["steps"]
    used = samples[: total_steps * preset["global_batch"]]
    dataset = Dataset.from_list(
        [
            {"input_ids": s["input_ids"], "completion_mask": [0] * s["prompt_len"] + [1] * (len(s["input_ids"]) - s["prompt_len"])}
            for s in used
        ]
    )
    if packing:  # rows of our packing's budget; as many per step as hold a global batch's tokens
        max_length = preset["micro_batch"] * max_len
        per_device = 1
        mean_len = sum(len(s["input_ids"]) for s in used) / len(used)
        accumulation = max(1, math.ceil(preset["global_batch"] * mean_len / max_length))
    else:
        max_length, per_device = max_len, preset["micro_batch"]
        accumulation = preset["global_batch"] // preset["micro_batch"]

    args = trl.SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"),
        max_steps=total_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-5,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=False,  # TRL's default is on; ours runs without it too
        max_length=max_length,
        packing=packing,
        completion_only_loss=True,
        bf16=preset["precision"] == "bfloat16",
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    lengths_this_step: list[int] = []
    targets_this_step: list[int] = []

    class Trainer(trl.SFTTrainer):
        def compute_loss(self, model, inputs, *a, **k):  # the sample lengths, for tokens and FLOPs
            if "position_ids" in inputs and "attention_mask" not in inputs:
                starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [inputs["position_ids"].shape[1]]
                lengths_this_step.extend(b - a for a, b in zip(starts, starts[1:]))
            else:
                lengths_this_step.extend(inputs["attention_mask"].sum(dim=1).tolist())
            targets_this_step.append(int((inputs["labels"] != -100).sum()))
            return super().compute_loss(model, inputs, *a, **k)

    step_times, tokens, flops = [], [], []
    memory = PeakMemory(device)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == preset["warmup"]:
                memory.start()
            _sync(device)
            lengths_this_step.clear()
            targets_this_step.clear()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            if state.global_step > preset["warmup"]:  # global_step counts this step already
                step_times.append(time.perf_counter() - self.start)
                tokens.append(sum(lengths_this_step))
                flops.append(training_flops(model.config, lengths_this_step, num_targets=sum(targets_this_step)))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    return _summary(step_times, tokens, flops, peak_flops, memory.stop_gb(), trl_version=trl.__version__)


# ---------------------------------------------------------------- driver


def _child(queue, framework, preset, model_dir, options, samples, peak_flops):
    torch.manual_seed(0)
    try:
        run = run_ours if framework == "ours" else run_trl
        queue.put(run(preset, model_dir, options, samples, peak_flops))
    except Exception as e:  # a configuration that cannot run here is reported, not fatal
        traceback.print_exc()
        queue.put({"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"})


def make_model_dir(model_kwargs: dict, root: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = os.path.join(root, "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**model_kwargs)).save_pretrained(path)
    # TRL wants a tokenizer for its pad token; the embedded one's ids are all < any preset's vocab.
    AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-llama").save_pretrained(path)
    return path


def compile_available(device: str) -> str | None:
    """None if torch.compile's default backend can build here, else why not."""
    if device == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        return "no C++ compiler for inductor on CPU"
    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    return None


def print_table(report: dict) -> None:
    rows = report["results"]
    baseline = next((r for r in rows if r["framework"] == "trl" and r["name"] == "padding" and r["status"] == "ok"), None)
    header = f"{'framework':<9} {'configuration':<20} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9} {'MFU':>7} {'vs TRL pad':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['framework']:<9} {r['name']:<20} {r['status']}")
            continue
        mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['tokens_per_s'] / baseline['tokens_per_s']:.2f}x" if baseline else "-"
        print(f"{r['framework']:<9} {r['name']:<20} {r['tokens_per_s']:>10.0f} {r['step_time_s']:>8.3f} {mem:>9} {mfu:>7} {ratio:>10}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--workload", choices=["squad", "chat"], default="squad")
    parser.add_argument("--steps", type=int, help="timed steps (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: the preset's)")
    parser.add_argument("--only", nargs="*", help="run only configurations whose 'framework: name' contains one of these")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    preset = dict(PRESETS[args.preset])
    preset["warmup"] = args.warmup if args.warmup is not None else preset["warmup"]
    preset["steps"] = args.steps if args.steps is not None else preset["steps"]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"--preset {args.preset} needs a GPU")
    from nemo_rl.utils.flops import device_peak_flops, training_flops

    dtype = torch.bfloat16 if preset["precision"] == "bfloat16" else torch.float32
    peak_flops, peak_source = device_peak_flops(torch.device(preset["device"]), dtype)
    samples = make_workload(args.workload, (preset["warmup"] + preset["steps"]) * preset["global_batch"], preset["model"]["vocab_size"])
    lengths = [len(s["input_ids"]) for s in samples]
    root = tempfile.mkdtemp(prefix="sft_bench_")
    model_dir = make_model_dir(preset["model"], root)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    report: dict[str, Any] = {
        "preset": args.preset,
        "workload": args.workload,
        "machine": {
            "device": torch.cuda.get_device_name() if preset["device"] == "cuda" else (platform.processor() or platform.machine()),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "peak_flops": peak_flops,
        "peak_flops_source": peak_source,
        "settings": {k: v for k, v in preset.items() if k != "model"} | {"model": preset["model"]},
        "workload_stats": {
            "samples": len(samples), "mean_len": sum(lengths) / len(lengths), "min_len": min(lengths), "max_len": max(lengths),
            "model_flops_per_token": training_flops(
                config, lengths, num_targets=sum(len(s["input_ids"]) - s["prompt_len"] for s in samples)
            ) / sum(lengths),
        },
        "how": "our DTensorPolicyWorker in-process as a single-rank process group (no Ray), "
        "each configuration in a fresh process; TRL SFTTrainer in the same way",
        "results": [],
    }
    print(f"# {args.preset}, {args.workload} workload: {len(samples)} samples, {report['workload_stats']['mean_len']:.0f} tokens mean, "
          f"global batch {preset['global_batch']}, {preset['warmup']} warm-up + {preset['steps']} timed steps")
    print(f"# {report['how']}; peak {peak_flops / 1e12 if peak_flops else float('nan'):.2f} TFLOP/s ({peak_source})")

    context = mp.get_context("spawn")
    no_compile = compile_available(preset["device"])
    for name, framework, options in RUNS:
        label = f"{framework}: {name}"
        if args.only and not any(o in label for o in args.only):
            continue
        if options.get("dtensor_cfg", {}).get("compile") and no_compile:
            result = {"status": f"skipped: {no_compile}"}
        else:
            print(f"... {label}", flush=True)
            queue = context.Queue()
            process = context.Process(target=_child, args=(queue, framework, preset, model_dir, options, samples, peak_flops))
            started = time.perf_counter()
            process.start()
            process.join()
            result = queue.get() if not queue.empty() else {"status": f"failed: exit code {process.exitcode}"}
            result["wall_s"] = time.perf_counter() - started
        report["results"].append({"framework": framework, "name": name, **result})

    print()
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    shutil.rmtree(root, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
