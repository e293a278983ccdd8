"""Evaluation: a dataset's prompts -> generations (or choice log-likelihoods) -> scores.

    samples = load_eval_samples(cfg.data, cfg.eval)          # prompts and references, by dataset class
    records, summary = evaluate(samples, workers, tokenizer, cfg)
    write_results(records, summary, cfg.eval.output_dir)

Each dataset row is a chat whose last turn is the assistant's reference answer: the turns
before it are the prompt, rendered with the chat template training used (`tokenizer`) and
tokenized as training tokenizes (`encode_generation_prompt`). Multiple-choice rows also carry
`choices` and `answer_index` (the `multiple_choice` dataset); each choice is scored by its
summed log-likelihood as the assistant's answer.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_rl.algorithms.eval_metrics import gold_answers_of, math_equal, pass_at_k, squad_scores
from nemo_rl.config.eval_schema import EvalConfig, EvalDataConfig, EvalMasterConfig
from nemo_rl.config.schema import DatasetConfig
from nemo_rl.data.interfaces import DataError
from nemo_rl.data.processors import TokenizationOptions, apply_task_spec, encode_generation_prompt


@dataclass
class EvalSample:
    index: int
    prompt: list[dict[str, Any]]  # the messages before the reference answer
    reference: str
    # every acceptable answer (SQuAD: all the gold spans; else just `reference`)
    gold_answers: list[str] = field(default_factory=list)
    choices: list[str] | None = None
    answer_index: int | None = None
    prompt_ids: list[int] = field(default_factory=list)


def load_eval_samples(data_cfg: EvalDataConfig, eval_cfg: EvalConfig) -> list[EvalSample]:
    """The rows of `data.split` (the `train` rows when the dataset has no such split), first
    `eval.max_prompts` of them, as prompts and references."""
    from nemo_rl.data.datasets import build_dataset

    dataset_cfg = DatasetConfig(**data_cfg.model_dump(include=set(DatasetConfig.model_fields), exclude_unset=True))
    dataset = build_dataset(dataset_cfg, "data")
    split = data_cfg.split if dataset.formatted_ds.get(data_cfg.split) is not None else "train"
    rows = dataset.formatted_ds[split]
    if rows is None or len(rows) == 0:
        raise DataError(f"data (dataset_name={data_cfg.dataset_name!r}) has no rows in split {split!r}")
    count = len(rows) if not eval_cfg.max_prompts else min(eval_cfg.max_prompts, len(rows))
    samples = []
    for index in range(count):
        row = rows[index]
        messages = apply_task_spec(list(row["messages"]), dataset.task_spec)
        where = f"data split {split!r} row {index}"
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{where}: the last message must be the assistant's reference answer after a prompt")
        reference = str(messages[-1]["content"])
        sample = EvalSample(index, messages[:-1], reference, gold_answers=gold_answers_of(row, reference))
        if eval_cfg.benchmark == "multiple_choice":
            sample.choices, sample.answer_index = _choices(row, where)
        samples.append(sample)
    return samples


def _choices(row: dict[str, Any], where: str) -> tuple[list[str], int]:
    choices, answer = row.get("choices"), row.get("answer_index")
    if not isinstance(choices, list) or len(choices) < 2 or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(
            f"{where}: eval.benchmark=multiple_choice needs 'choices' (2 or more strings) and "
            "'answer_index' (an index into them) in each row: use dataset_name=multiple_choice"
        )
    return [str(c) for c in choices], answer


def encode_prompts(samples: list[EvalSample], tokenizer, cfg: EvalMasterConfig) -> None:
    """Fills each sample's `prompt_ids`; a prompt longer than data.max_input_seq_length is an error."""
    options = tokenization_options(cfg)
    for sample in samples:
        sample.prompt_ids = encode_generation_prompt(sample.prompt, tokenizer, options)
        if len(sample.prompt_ids) > cfg.data.max_input_seq_length:
            raise DataError(
                f"data row {sample.index}: the prompt is {len(sample.prompt_ids)} tokens, more than "
                f"data.max_input_seq_length={cfg.data.max_input_seq_length}"
            )


def tokenization_options(cfg: EvalMasterConfig) -> TokenizationOptions:
    return TokenizationOptions(
        tokenizer=cfg.tokenizer.name,
        chat_template=cfg.tokenizer.chat_template,
        chat_template_kwargs=cfg.tokenizer.chat_template_kwargs,
        add_bos=cfg.data.add_bos,
        add_eos=False,
        add_generation_prompt=True,
        answer_only_loss_mask=True,
        only_unmask_final=False,
        max_seq_length=cfg.data.max_input_seq_length,
        overlength="mask",
    )


def score_sample(benchmark: str, sample: EvalSample, texts: list[str]) -> dict[str, float]:
    """Per-sample scores of its generations (`texts`, one per sample drawn)."""
    if benchmark == "squad":
        per_text = [squad_scores(text, sample.gold_answers or [sample.reference]) for text in texts]
        return {name: statistics.fmean(s[name] for s in per_text) for name in ("exact_match", "f1")}
    if benchmark == "math":
        correct = [math_equal(text, sample.reference) for text in texts]
        return {"accuracy": statistics.fmean(correct), "num_correct": float(sum(correct))}
    raise ValueError(f"eval.benchmark={benchmark!r} is not scored from generations")


def evaluate(samples: list[EvalSample], workers, tokenizer, cfg: EvalMasterConfig, progress=None) -> tuple[list[dict], dict]:
    """(one record per sample, the summary). `workers`: a `GenerationWorkers` (or anything with
    its `generate` / `loglikelihood`); `progress`: a ProgressReporter over the chunks."""
    encode_prompts(samples, tokenizer, cfg)
    chunk = max(1, cfg.generation.batch_size * getattr(workers, "world_size", 1))
    if cfg.eval.benchmark == "multiple_choice":
        records = _evaluate_choices(samples, workers, tokenizer, chunk, progress)
    else:
        records = _evaluate_generations(samples, workers, cfg, chunk, progress)
    return records, summarize(records, cfg.eval)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield start // size + 1, items[start : start + size]


def _evaluate_generations(samples, workers, cfg: EvalMasterConfig, chunk: int, progress) -> list[dict]:
    n = cfg.eval.num_samples
    requests = [(sample, draw) for sample in samples for draw in range(n)]
    texts: dict[int, list[str]] = {sample.index: [] for sample in samples}
    for step, part in _chunks(requests, chunk):
        outputs = workers.generate([sample.prompt_ids for sample, _ in part])
        for (sample, _), output in zip(part, outputs, strict=True):
            texts[sample.index].append(output.text)
        if progress is not None:
            progress.update(step)
    records = []
    for sample in samples:
        generations = texts[sample.index]
        record = {"index": sample.index, "prompt": sample.prompt, "reference": sample.reference,
                  "gold_answers": sample.gold_answers, "generations": generations,
                  "scores": score_sample(cfg.eval.benchmark, sample, generations)}
        records.append(record)
    return records


def _evaluate_choices(samples, workers, tokenizer, chunk: int, progress) -> list[dict]:
    pairs, owners = [], []
    for sample in samples:
        for choice_index, choice in enumerate(sample.choices or []):
            pairs.append((sample.prompt_ids, list(tokenizer(choice, add_special_tokens=False)["input_ids"])))
            owners.append((sample.index, choice_index))
    logprobs: dict[int, list[float]] = {sample.index: [] for sample in samples}
    for step, part in _chunks(list(zip(pairs, owners, strict=True)), chunk):
        scores = workers.loglikelihood([pair for pair, _ in part])
        for (_, (index, _)), score in zip(part, scores, strict=True):
            logprobs[index].append(score)
        if progress is not None:
            progress.update(step)
    records = []
    for sample in samples:
        chosen = max(range(len(logprobs[sample.index])), key=logprobs[sample.index].__getitem__)
        records.append({
            "index": sample.index, "prompt": sample.prompt, "reference": sample.reference,
            "choices": sample.choices, "choice_logprobs": logprobs[sample.index], "chosen": chosen,
            "answer_index": sample.answer_index, "scores": {"accuracy": float(chosen == sample.answer_index)},
        })
    return records


def summarize(records: list[dict], eval_cfg: EvalConfig) -> dict[str, Any]:
    """Mean of each per-sample score; for math also pass@k (mean over prompts of the unbiased
    estimator) with k = 1 and eval.k_value."""
    summary: dict[str, Any] = {"benchmark": eval_cfg.benchmark, "num_prompts": len(records),
                               "num_samples": eval_cfg.num_samples}
    if not records:
        return summary
    for name in records[0]["scores"]:
        if name != "num_correct":
            summary[name] = statistics.fmean(r["scores"][name] for r in records)
    if eval_cfg.benchmark == "math":
        for k in sorted({1, eval_cfg.k_value}):
            summary[f"pass@{k}"] = statistics.fmean(
                pass_at_k(eval_cfg.num_samples, int(r["scores"]["num_correct"]), k) for r in records
            )
    return summary


def write_results(records: list[dict], summary: dict, output_dir: str | Path) -> tuple[Path, Path]:
    """`samples.jsonl` (one record per prompt) and `summary.json` under `output_dir`."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    samples_path, summary_path = output / "samples.jsonl", output / "summary.json"
    with open(samples_path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return samples_path, summary_path


def format_table(summary: dict[str, Any]) -> str:
    """The scores as a two-column table (percentages for the [0, 1] scores)."""
    rows = [(key, f"{100 * value:.2f}" if isinstance(value, float) else str(value)) for key, value in summary.items()]
    width = max(len(key) for key, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"| {'-' * width} | ----- |"]
    lines += [f"| {key.ljust(width)} | {value} |" for key, value in rows]
    return "\n".join(lines)



def run_evaluation(cfg: EvalMasterConfig) -> dict[str, Any]:
    """The whole run: check the inputs, start the generation workers, score, write, print.
    Returns the summary."""
    import os

    from nemo_rl.data.tokenizer import get_tokenizer
    from nemo_rl.distributed import RayVirtualCluster, init_ray, resolve_device
    from nemo_rl.models.generation import GenerationBackendError, GenerationWorkers
    from nemo_rl.models.generation.loading import is_local_path
    from nemo_rl.models.generation.workers import worker_class
    from nemo_rl.utils.progress import ProgressReporter

    # Everything a user fixes is checked before Ray starts.
    worker_class(cfg.generation.backend)  # vllm without its package is refused here
    device = resolve_device(cfg.cluster.device)
    if cfg.generation.backend == "vllm" and device != "cuda":
        raise GenerationBackendError(f"generation.backend=vllm needs GPUs; cluster.device resolves to {device}: use generation.backend=hf")
    model = cfg.generation.model_name
    if is_local_path(model) and not os.path.isdir(model):
        raise FileNotFoundError(
            f"generation.model_name={model!r}: no such directory (working directory: {os.getcwd()}); the "
            "quickstart's checkpoint is made by `uv run examples/run_sft.py --config configs/sft_tiny.yaml`"
        )
    tokenizer = get_tokenizer(cfg.tokenizer)
    samples = load_eval_samples(cfg.data, cfg.eval)
    init_ray()
    cluster = RayVirtualCluster(cfg.cluster.num_nodes, cfg.cluster.workers_per_node(device), use_gpus=device == "cuda")
    try:
        workers = GenerationWorkers(cfg.generation, cfg.tokenizer, cluster)
        try:
            print(f"# {cfg.eval.benchmark} on {len(samples)} prompts of {cfg.data.dataset_name} "
                  f"({cfg.data.data_path}); {workers.describe()}; {workers.world_size} {cfg.generation.backend} "
                  f"worker(s) on {device}", flush=True)
            per_step = cfg.generation.batch_size * workers.world_size
            per_sample = len(samples[0].choices or []) if cfg.eval.benchmark == "multiple_choice" else cfg.eval.num_samples
            steps = -(-len(samples) * per_sample // per_step)
            with ProgressReporter(steps) as progress:
                records, summary = evaluate(samples, workers, tokenizer, cfg, progress)
        finally:
            workers.shutdown()
    finally:
        cluster.shutdown()
    samples_path, summary_path = write_results(records, summary, cfg.eval.output_dir)
    print(format_table(summary))
    print(f"per-sample results: {samples_path}\nsummary: {summary_path}", flush=True)
    return summary
