"""SFT training throughput on one fixed synthetic workload, measured so that a shared, loaded
machine still gives comparable numbers: our policy worker (padded, full logits, dynamic
batching, packing), the same worker behind Ray as examples/run_sft.py drives it, a
hand-written PyTorch loop doing the same math, and Hugging Face TRL's SFTTrainer.

    uv sync --group bench                                  # TRL, for its rows
    uv run python benchmarks/sft_throughput.py --preset cpu-small --out benchmarks/results/cpu_small_squad.json
    uv run python benchmarks/sft_throughput.py --preset gpu-llama-1b --out bench_h100.json

How:
  - Every configuration lives in its own process for the whole run (model loaded once,
    untimed warm-up steps first). The driver then runs rounds: in each round every
    configuration trains `--steps-per-round` optimizer steps while the others wait idle, the
    starting configuration rotating from round to round (benchmarks/bench_stats.py). Each
    configuration's tokens/s is the median over rounds, with its spread, (max - min) / median.
  - Ratios ("vs hand, fused") are medians of per-round ratios: two configurations measured a
    few seconds apart saw about the same load. The load average before and after is reported.
  - "hand" rows: a plain PyTorch loop on the same model and micro-batches doing the math of
    our padded path: decoder to hidden states, output layer at the target positions only,
    fp32 cross-entropy summed and divided by the global batch's target count, AdamW, gradient
    clipping at 1.0; once with torch's per-tensor AdamW loop, once with its fused kernel.
  - "ours, via Ray": `Policy` with one worker on a local Ray cluster, the path of
    examples/run_sft.py, on the same batches; its ratio to the in-process worker is the
    driver's and Ray's overhead.
  - MFU = model FLOPs (nemo_rl/utils/flops.py: the output layer at target positions only,
    padding not counted) / time / peak. On a CPU the peak is the "matmul peak" row: a large
    matmul timed in the same rounds, so it saw the same load; on a GPU the datasheet number.
  - tokens/s counts real tokens (prompt and answer, no padding). Memory: the process's peak
    resident set on CPU (Python, torch, model and optimizer included), max allocated on GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from bench_stats import interleaved_order, paired_ratios, summarize  # noqa: E402

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
    # The vocabulary is a real one's size (Llama 2's), so the output layer weighs what it does.
    "cpu-small": dict(
        model=dict(
            vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        ),
        device="cpu", precision="float32", global_batch=8, micro_batch=4, warmup=1, steps_per_round=2, rounds=6,
    ),
    # For a GPU: Llama-3.2-1B's shape, bf16 compute on fp32 master weights.
    "gpu-llama-1b": dict(
        model=LLAMA_3_2_1B, device="cuda", precision="bfloat16",
        global_batch=64, micro_batch=8, warmup=3, steps_per_round=3, rounds=5,
    ),
}

# name -> (kind, options). "hand, fused AdamW" is the reference every ratio is taken against.
REFERENCE = "hand, fused AdamW"
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "hand, fused AdamW": ("hand", {"fused": True}),
    "hand, AdamW loop": ("hand", {"fused": False}),
    "ours, padded": ("ours", {}),
    "ours, via Ray": ("ray", {}),
    "ours, padded, full logits": ("ours", {"dtensor_cfg": {"chunked_loss": False}}),
    "ours, dynamic batching": ("ours", {"dynamic_batching": {"enabled": True}}),
    "ours, packing": ("ours", {"sequence_packing": {"enabled": True}}),
    "ours, packing + compile": ("ours", {"sequence_packing": {"enabled": True}, "dtensor_cfg": {"compile": True}}),
    "TRL, padding": ("trl", {"packing": False}),
    "TRL, packing": ("trl", {"packing": True}),
    "matmul peak": ("peak", {}),
}
DEFAULT_CONFIGS = [name for name in CONFIGS if name != "ours, packing + compile"]  # compile: minutes of warm-up


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


# ---------------------------------------------------------------- the configurations


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _policy_config(preset: dict, model_dir: str, overrides: dict, max_len: int):
    from nemo_rl.config.schema import PolicyConfig

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
        fields["sequence_packing"]["sequence_length_round"] = mb_tokens  # one static shape
    return PolicyConfig(**fields)


class OursStepper:
    """Our worker in this process, as a single-rank process group (no Ray)."""

    def __init__(self, preset, model_dir, options, max_len):
        from nemo_rl.algorithms.loss_functions import NLLLoss
        from nemo_rl.models.policy.micro_batching import MicroBatchPlan
        from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cfg = _policy_config(preset, model_dir, options, max_len)
        self.worker = DTensorPolicyWorker(cfg, seed=0, device=preset["device"])
        self.loss_fn, self.plan = NLLLoss(), MicroBatchPlan.for_training(cfg)

    def step(self, batch) -> dict:
        return self.worker.train(batch, self.loss_fn, self.plan)


class RayStepper:
    """`Policy` with one worker on a local Ray cluster: the path examples/run_sft.py takes.
    The worker gets as many CPU threads as the in-process configurations have."""

    def __init__(self, preset, model_dir, options, max_len):
        from nemo_rl.algorithms.loss_functions import NLLLoss
        from nemo_rl.distributed import RayVirtualCluster, init_ray
        from nemo_rl.models.policy.lm_policy import Policy

        threads = torch.get_num_threads()
        init_ray(temp_dir=tempfile.mkdtemp(prefix="ray_", dir="/tmp"), num_cpus=threads)
        cluster = RayVirtualCluster(1, 1, use_gpus=preset["device"] == "cuda", cpus_per_worker=threads)
        self.policy = Policy(cluster, _policy_config(preset, model_dir, options, max_len), seed=0)
        self.loss_fn = NLLLoss()

    def step(self, batch) -> dict:
        return self.policy.train(batch, self.loss_fn)

    def close(self) -> None:
        import ray

        self.policy.shutdown()
        ray.shutdown()


class HandStepper:
    """The plain loop: the math of our padded path, with nothing else."""

    def __init__(self, preset, model_dir, options, max_len):
        from transformers import AutoModelForCausalLM

        self.device, self.micro_batch = preset["device"], preset["micro_batch"]
        self.dtype = torch.bfloat16 if preset["precision"] == "bfloat16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-5, weight_decay=0.0, foreach=False, fused=options["fused"]
        )

    def step(self, batch) -> dict:
        from nemo_rl.data.targets import target_mask

        mask_BT1 = target_mask(batch)
        num_targets = mask_BT1.sum()
        head = self.model.get_output_embeddings()
        loss_sum = 0.0
        for start in range(0, batch.size, self.micro_batch):
            ids_BT = batch["input_ids"][start : start + self.micro_batch].to(self.device)
            mask_bt = mask_BT1[start : start + self.micro_batch].to(self.device) > 0
            with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
                hidden_BTH = self.model.model(input_ids=ids_BT).last_hidden_state
                logits_NV = head(hidden_BTH[:, :-1][mask_bt])
            loss = torch.nn.functional.cross_entropy(logits_NV.float(), ids_BT[:, 1:][mask_bt], reduction="sum") / num_targets
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lengths = batch["input_lengths"].tolist()
        return {"loss": loss_sum, "num_tokens": sum(lengths), "num_valid_tokens": int(num_targets)}


class PeakStepper:
    """One n x n matmul per "step": the practical peak FLOP/s, measured under the same load."""

    def __init__(self, preset, model_dir, options, max_len):
        self.device = preset["device"]
        n = 2048
        generator = torch.Generator(self.device).manual_seed(0)
        self.a = torch.randn(n, n, device=self.device, generator=generator)
        self.b = torch.randn(n, n, device=self.device, generator=generator)
        self.flops = 2 * n**3

    def step(self, batch) -> dict:
        for _ in range(4):
            torch.matmul(self.a, self.b)
        return {"num_tokens": 0, "flops": 4 * self.flops}


STEPPERS = {"ours": OursStepper, "ray": RayStepper, "hand": HandStepper, "peak": PeakStepper}


def _serve(conn, kind, preset, model_dir, options, batches, max_len) -> None:
    """A configuration's process: build, warm up, then one round per request."""
    from transformers import AutoConfig

    from nemo_rl.utils.flops import training_flops

    torch.manual_seed(0)
    try:
        if kind == "trl":
            from trl_runner import TRLStepper  # noqa: PLC0415 (only where TRL runs)

            stepper = TRLStepper(preset, model_dir, options, batches, max_len)
        else:
            stepper = STEPPERS[kind](preset, model_dir, options, max_len)
        model_config = AutoConfig.from_pretrained(model_dir)
        cursor = 0
        for _ in range(preset["warmup"]):
            stepper.step(batches[cursor % len(batches)])
            cursor += 1
        conn.send({"status": "ready"})
        while (request := conn.recv()) is not None:
            seconds = cpu_seconds = tokens = flops = 0.0
            for _ in range(request):
                batch = batches[cursor % len(batches)]
                cursor += 1
                _sync(preset["device"])
                start, cpu_start = time.perf_counter(), time.process_time()
                metrics = stepper.step(batch)
                _sync(preset["device"])
                seconds += time.perf_counter() - start
                cpu_seconds += time.process_time() - cpu_start
                tokens += metrics["num_tokens"]
                if "flops" in metrics:
                    flops += metrics["flops"]
                else:  # TRL reports the samples its own loader gave it
                    lengths = metrics.get("lengths") or batch["input_lengths"][batch["sample_mask"] > 0].tolist()
                    flops += training_flops(model_config, lengths, num_targets=metrics["num_valid_tokens"])
            conn.send({"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens, "flops": flops, "loss": metrics.get("loss")})
        if hasattr(stepper, "close"):
            stepper.close()
        conn.send({"peak_mem_gb": _peak_memory_gb(preset["device"])})
    except Exception as e:  # a configuration that cannot run here is reported, not fatal
        traceback.print_exc()
        conn.send({"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"})


def _peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


# ---------------------------------------------------------------- driver


def make_model_dir(model_kwargs: dict, root: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = os.path.join(root, "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**model_kwargs)).save_pretrained(path)
    # TRL wants a tokenizer for its pad token; the embedded one's ids are all < any preset's vocab.
    AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-llama").save_pretrained(path)
    return path


def why_not_available(kind: str, options: dict, device: str) -> str | None:
    """None if the configuration can run here, else why not."""
    if kind == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            return "skipped: trl is not installed (uv sync --group bench)"
    if options.get("dtensor_cfg", {}).get("compile"):
        if device == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
            return "skipped: no C++ compiler for inductor on CPU"
    if kind == "peak" and device != "cpu":
        return "skipped: the GPU's peak is its datasheet number"
    return None


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_rounds(names: list[str], preset: dict, model_dir: str, batches, max_len: int) -> dict[str, dict]:
    """Starts one process per configuration (one after another, so that set-up does not
    contend), then the interleaved rounds; each name's per-round measurements."""
    context = mp.get_context("spawn")
    conns, processes, records = {}, {}, {}
    for name in names:
        kind, options = CONFIGS[name]
        print(f"... starting {name}", flush=True)
        parent, child = context.Pipe()
        process = context.Process(target=_serve, args=(child, kind, preset, model_dir, options, batches, max_len))
        process.start()
        reply = parent.recv() if parent.poll(3600) else {"status": "failed: no answer in an hour"}
        records[name] = {"status": reply.get("status", "failed"), "rounds": []}
        if reply.get("status") == "ready":
            conns[name], processes[name] = parent, process
        else:
            process.join()
    active = [n for n in names if n in conns]
    for r, order in enumerate(interleaved_order(active, preset["rounds"])):
        print(f"... round {r + 1}/{preset['rounds']}", flush=True)
        measured = {}
        for name in order:
            conns[name].send(preset["steps_per_round"])
            measured[name] = conns[name].recv()
            print(f"    {name}: {measured[name]['tokens'] / measured[name]['seconds']:.0f} tokens/s", flush=True)
        for name in active:  # a round's results in config order, so that rounds line up
            records[name]["rounds"].append(measured[name])
    for name in active:
        conns[name].send(None)
        records[name].update(conns[name].recv())
        processes[name].join()
    return records


def build_report(records: dict[str, dict], device: str, datasheet_peak: float | None) -> list[dict]:
    """One row per configuration: median tokens/s and its spread, the per-round ratio to the
    reference and to the in-process worker, MFU against the peak of the same round."""
    def per_round(name: str, key: str, clock: str = "seconds") -> list[float | None]:
        rounds = records.get(name, {}).get("rounds", [])
        return [m[key] / m[clock] for m in rounds]

    n_rounds = max((len(r["rounds"]) for r in records.values()), default=0)
    none = [None] * n_rounds
    reference = per_round(REFERENCE, "tokens") if records.get(REFERENCE, {}).get("rounds") else none
    in_process = per_round("ours, padded", "tokens") if records.get("ours, padded", {}).get("rounds") else none
    if device == "cpu":
        peak = per_round("matmul peak", "flops") if records.get("matmul peak", {}).get("rounds") else none
    else:
        peak = [datasheet_peak] * n_rounds
    rows = []
    for name, record in records.items():
        row: dict[str, Any] = {"name": name, "status": record["status"], "peak_mem_gb": record.get("peak_mem_gb")}
        if record["status"] != "ready" or not record["rounds"]:
            rows.append(row)
            continue
        row["status"] = "ok"
        row["rounds"] = record["rounds"]
        if name == "matmul peak":
            row["flops_per_s"] = summarize(per_round(name, "flops"))
            rows.append(row)
            continue
        tokens = per_round(name, "tokens")
        row["tokens_per_s"] = summarize(tokens)
        row["step_s"] = summarize([m["seconds"] / record["steps_per_round"] for m in record["rounds"]])
        for key, denominators in (("vs_reference", reference), ("vs_in_process", in_process)):
            ratios = paired_ratios(tokens, denominators)
            row[key] = summarize(ratios) if ratios else None
        if kind_runs_in_process(name) and records.get(REFERENCE, {}).get("rounds"):
            # Tokens per second of this process's CPU time: what a loaded machine's neighbours
            # disturb least (they take wall time, not the work a step needs).
            ratios = paired_ratios(per_round(name, "tokens", "cpu_seconds"), per_round(REFERENCE, "tokens", "cpu_seconds"))
            row["cpu_time_vs_reference"] = summarize(ratios) if ratios else None
        mfu = paired_ratios(per_round(name, "flops"), peak)
        row["mfu"] = summarize(mfu) if mfu else None
        row["final_loss"] = record["rounds"][-1].get("loss")
        rows.append(row)
    return rows


def kind_runs_in_process(name: str) -> bool:
    """The step's work all happens in the configuration's own process, so its CPU time is the
    step's (not so for the Ray row, whose worker is another process)."""
    return CONFIGS[name][0] in ("hand", "ours")


def _cell(summary: dict | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    if not summary:
        return "-"
    return f"{format(summary['median'] * scale, fmt)}{unit} ±{100 * summary['spread'] / 2:.0f}%"


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'configuration':<26} {'tokens/s':>14} {'vs hand, fused':>16} {'vs in-process':>15} {'MFU':>12} {'peak GiB':>9}"
        f" {'CPU time vs hand':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['name']:<26} {r['status']}")
        elif r["name"] == "matmul peak":
            print(f"{r['name']:<26} {_cell(r['flops_per_s'], '.2f', 1e-12) + ' TFLOP/s':>40}")
        else:
            mem = f"{r['peak_mem_gb']:.2f}" if r.get("peak_mem_gb") is not None else "-"
            print(
                f"{r['name']:<26} {_cell(r['tokens_per_s'], '.0f'):>14} {_cell(r['vs_reference'], '.3f'):>16} "
                f"{_cell(r['vs_in_process'], '.3f'):>15} {_cell(r['mfu'], '.1f', 100, '%'):>12} {mem:>9}"
                f" {_cell(r.get('cpu_time_vs_reference'), '.3f'):>17}"
            )
    print("(median over rounds; ±: half the spread, (max - min) / median / 2; ratios: medians of per-round ratios;")
    print(" CPU time vs hand: tokens per second of the process's CPU time, over the reference's)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--workload", choices=["squad", "chat"], default="squad")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: the preset's)")
    parser.add_argument("--steps-per-round", type=int, help="optimizer steps per configuration per round")
    parser.add_argument("--warmup", type=int, help="untimed steps per configuration first")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), metavar="NAME",
                        help=f"configurations to run (default: all but compile); names: {', '.join(CONFIGS)}")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    preset = dict(PRESETS[args.preset])
    for key in ("rounds", "steps_per_round", "warmup"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"--preset {args.preset} needs a GPU")
    from transformers import AutoConfig

    from nemo_rl.utils.flops import device_peak_flops, training_flops

    dtype = torch.bfloat16 if preset["precision"] == "bfloat16" else torch.float32
    datasheet_peak, peak_source = device_peak_flops(torch.device(preset["device"]), dtype) if preset["device"] == "cuda" else (None, "")
    num_batches = max(4, preset["warmup"] + preset["steps_per_round"])
    samples = make_workload(args.workload, num_batches * preset["global_batch"], preset["model"]["vocab_size"])
    lengths = [len(s["input_ids"]) for s in samples]
    max_len = max(lengths)
    batches = global_batches(samples, preset["global_batch"])
    root = tempfile.mkdtemp(prefix="sft_bench_")
    model_dir = make_model_dir(preset["model"], root)
    config = AutoConfig.from_pretrained(model_dir)

    names = args.configs or DEFAULT_CONFIGS
    skipped = {}
    for name in names:
        reason = why_not_available(*CONFIGS[name], preset["device"])
        if reason:
            skipped[name] = reason
    print(f"# {args.preset}, {args.workload}: {len(batches)} global batches of {preset['global_batch']} "
          f"({sum(lengths) / len(lengths):.0f} tokens mean), {preset['rounds']} rounds x {preset['steps_per_round']} steps, "
          f"{preset['warmup']} warm-up; torch threads {torch.get_num_threads()}")
    load_before = _load()
    started = time.perf_counter()
    records = run_rounds([n for n in names if n not in skipped], preset, model_dir, batches, max_len)
    for name, reason in skipped.items():
        records[name] = {"status": reason, "rounds": []}
    for record in records.values():
        record["steps_per_round"] = preset["steps_per_round"]
    load_after = _load()
    rows = build_report({n: records[n] for n in names}, preset["device"], datasheet_peak)
    report = {
        "preset": args.preset,
        "workload": args.workload,
        "machine": {
            "device": torch.cuda.get_device_name() if preset["device"] == "cuda" else (platform.processor() or platform.machine()),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "peak": "the matmul peak row, per round" if preset["device"] == "cpu" else f"{datasheet_peak} FLOP/s ({peak_source})",
        "settings": {k: v for k, v in preset.items() if k != "model"} | {"model": preset["model"]},
        "workload_stats": {
            "samples": len(samples), "mean_len": sum(lengths) / len(lengths), "min_len": min(lengths), "max_len": max_len,
            "model_flops_per_token": training_flops(
                config, lengths, num_targets=sum(len(s["input_ids"]) - s["prompt_len"] for s in samples)
            ) / sum(lengths),
        },
        "wall_s": time.perf_counter() - started,
        "results": rows,
    }
    print()
    print_table(rows)
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    shutil.rmtree(root, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
