"""lm-evaluation-harness (`lm_eval --model hf`) on a Hugging Face directory of the tiny model, over
a local multiple-choice task, against our own multiple-choice evaluation of the same rows.

Our evaluation renders each question with the chat template and scores every choice by its
summed log-probability as the assistant's answer. The harness gets the same rendered prompt as
text; it moves the prompt's trailing whitespace (the template's "\\n\\n" after the assistant
header) into every continuation, so each of its scores is ours plus log P("\\n\\n" | the rest),
the same for all choices of a question: its choice, its accuracy and the differences between
choices must equal ours.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_rl.algorithms.eval import evaluate, load_eval_samples
from nemo_rl.config.eval_schema import EvalMasterConfig
from nemo_rl.config.loader import load_config
from nemo_rl.data.tokenizer import get_tokenizer
from nemo_rl.models.generation.hf_worker import HfGenerationWorker

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = str(REPO / "assets" / "tiny-llama")
TASK = "nemo_rl_squad_tiny_choices"
NUM_ROWS = 6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (uv sync)"),
]


def _choice_rows() -> list[dict]:
    """Questions of the embedded validation split, each with its answer and the next three
    different answers of the rows after it as choices, the right one at a varying place."""
    lines = (REPO / "assets" / "squad-tiny" / "validation.jsonl").read_text().splitlines()
    source = [json.loads(line) for line in lines[: NUM_ROWS + 8]]
    rows = []
    for i in range(NUM_ROWS):
        answers = list(dict.fromkeys(row["answers"]["text"][0] for row in source[i:]))[:4]
        position = i % 4
        choices = answers[1 : position + 1] + [answers[0]] + answers[position + 1 :]
        rows.append({"context": source[i]["context"], "question": source[i]["question"],
                     "choices": choices, "answer_index": position})
    return rows


TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: answer_index
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lm_eval_scores_choices_as_our_evaluation_does(tmp_path):
    rows = _choice_rows()
    ours_path = tmp_path / "choices.jsonl"
    ours_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(REPO / "configs" / "eval.yaml", [
        f"generation.model_name={TINY_MODEL}", "eval.benchmark=multiple_choice", "data.dataset_name=multiple_choice",
        f"data.data_path={ours_path}", "data.split=null", "generation.batch_size=8",
    ], root=EvalMasterConfig)
    tokenizer = get_tokenizer(cfg.tokenizer)
    samples = load_eval_samples(cfg.data, cfg.eval)
    worker = HfGenerationWorker(cfg.generation, cfg.tokenizer)
    records, summary = evaluate(samples, worker, tokenizer, cfg)

    # the harness's rows: our rendered prompts as text (they start with BOS, so it adds none)
    prompts = [tokenizer.decode(sample.prompt_ids, skip_special_tokens=False) for sample in samples]
    assert [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts] == [s.prompt_ids for s in samples]
    harness_path = tmp_path / "harness.jsonl"
    harness_path.write_text("".join(json.dumps({**row, "prompt": prompt}) + "\n" for row, prompt in zip(rows, prompts)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=harness_path))
    output = tmp_path / "lm_eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={TINY_MODEL},dtype=float32",
         "--tasks", TASK, "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(output), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples_file = next(output.rglob(f"samples_{TASK}_*.jsonl"))
    harness = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda r: r["doc_id"])
    results_file = next(output.rglob("results_*.json"))
    harness_accuracy = json.loads(results_file.read_text())["results"][TASK]["acc,none"]

    assert len(harness) == NUM_ROWS
    for sample, record, row in zip(samples, records, harness, strict=True):
        harness_scores = [float(resp[0][0]) for resp in row["resps"]]
        requests = [row["arguments"][f"gen_args_{k}"] for k in range(len(record["choices"]))]
        assert [(r["arg_0"], r["arg_1"]) for r in requests] == [(prompts[record["index"]], c) for c in record["choices"]]
        # the harness conditions on the prompt without its trailing "\n\n" and scores "\n\n" + choice
        stripped = tokenizer(prompts[record["index"]].rstrip(), add_special_tokens=False)["input_ids"]
        header_end = sample.prompt_ids[len(stripped):]
        assert stripped + header_end == sample.prompt_ids and header_end
        shift = worker.loglikelihood([(stripped, header_end)])[0]
        assert harness_scores == pytest.approx([score + shift for score in record["choice_logprobs"]], abs=1e-4)
        assert max(range(len(harness_scores)), key=harness_scores.__getitem__) == record["chosen"]
    assert harness_accuracy == pytest.approx(summary["accuracy"])
