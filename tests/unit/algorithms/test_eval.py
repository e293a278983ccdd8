"""Evaluation without workers: rows to prompts, scoring, summaries and output files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nemo_rl.algorithms.eval import evaluate, format_table, load_eval_samples, write_results
from nemo_rl.algorithms.eval_metrics import squad_scores
from nemo_rl.config.errors import ConfigError
from nemo_rl.config.eval_schema import EvalMasterConfig
from nemo_rl.config.loader import load_config
from nemo_rl.data.interfaces import DataError
from nemo_rl.data.tokenizer import get_tokenizer
from nemo_rl.models.generation import GenerationOutput

REPO = Path(__file__).resolve().parents[3]
TINY_MODEL = str(REPO / "assets" / "tiny-llama")


def _config(*overrides: str) -> EvalMasterConfig:
    return load_config(REPO / "configs" / "eval.yaml", [f"generation.model_name={TINY_MODEL}", *overrides], root=EvalMasterConfig)


class ScriptedWorkers:
    """Stands in for GenerationWorkers: answers from a function of the prompt ids."""

    world_size = 2

    def __init__(self, answer=None, score=None):
        self.answer, self.score, self.prompts = answer, score, []

    def generate(self, prompts):
        self.prompts += prompts
        return [GenerationOutput([], self.answer(len(self.prompts) - len(prompts) + i, p), "stop") for i, p in enumerate(prompts)]

    def loglikelihood(self, pairs):
        return [self.score(context, continuation) for context, continuation in pairs]


def test_squad_validation_rows_become_prompts_and_references():
    cfg = _config("eval.max_prompts=5")
    samples = load_eval_samples(cfg.data, cfg.eval)
    first = json.loads((REPO / "assets" / "squad-tiny" / "validation.jsonl").read_text().splitlines()[0])
    assert len(samples) == 5
    assert samples[0].prompt == [{"role": "system", "content": first["context"]}, {"role": "user", "content": first["question"]}]
    assert samples[0].reference == first["answers"]["text"][0]


def test_squad_summary_is_the_mean_of_the_per_sample_scores(tmp_path):
    cfg = _config("eval.max_prompts=6")
    samples = load_eval_samples(cfg.data, cfg.eval)
    wrong = "the Free Cedar Press"
    workers = ScriptedWorkers(lambda i, _: samples[i].reference if i % 2 == 0 else wrong)
    records, summary = evaluate(samples, workers, get_tokenizer(cfg.tokenizer), cfg)
    expected = [squad_scores(samples[i].reference if i % 2 == 0 else wrong, [samples[i].reference]) for i in range(6)]
    assert summary["exact_match"] == pytest.approx(sum(e["exact_match"] for e in expected) / 6)
    assert summary["f1"] == pytest.approx(sum(e["f1"] for e in expected) / 6)
    assert summary["exact_match"] >= 0.5 and summary["num_prompts"] == 6
    # the prompts sent are the chat-template ids of each sample, with BOS
    tokenizer = get_tokenizer(cfg.tokenizer)
    assert workers.prompts[0][0] == tokenizer.bos_token_id and workers.prompts == [s.prompt_ids for s in samples]

    samples_path, summary_path = write_results(records, summary, tmp_path)
    rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert [r["generations"][0] for r in rows][:2] == [samples[0].reference, wrong]
    assert json.loads(summary_path.read_text()) == summary
    assert "| exact_match |" in format_table(summary)


def test_math_pass_at_k_over_several_samples(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"input": f"{a} + {a}?", "output": f"\\boxed{{{2 * a}}}"}) + "\n" for a in (1, 2, 3)))
    cfg = _config("eval.benchmark=math", "eval.num_samples=4", "eval.k_value=2", "generation.temperature=1.0",
                  "data.dataset_name=ResponseDataset", f"data.data_path={data}", "data.split=null")
    samples = load_eval_samples(cfg.data, cfg.eval)
    # prompt 0: 4 of 4 right; prompt 1: 1 of 4 (as a fraction); prompt 2: none
    right = {0: [True] * 4, 1: [False, True, False, False], 2: [False] * 4}
    calls = iter([(s, d) for s in range(3) for d in range(4)])

    def answer(_, __):
        sample, draw = next(calls)
        value = 2 * (sample + 1)
        return f"so \\boxed{{{value}}}" if right[sample][draw] else (r"\boxed{\frac{1}{2}}" if draw else "no idea")

    _, summary = evaluate(samples, ScriptedWorkers(answer), get_tokenizer(cfg.tokenizer), cfg)
    assert summary["pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert summary["pass@2"] == pytest.approx((1 + (1 - math.comb(3, 2) / math.comb(4, 2)) + 0) / 3)
    assert summary["accuracy"] == pytest.approx(summary["pass@1"])


def test_multiple_choice_picks_the_most_likely_choice(tmp_path):
    data = tmp_path / "mc.jsonl"
    rows = [{"question": "Colour of snow?", "choices": ["red", "white", "green"], "answer_index": 1},
            {"question": "Two plus two?", "choices": ["four", "five"], "answer_index": 0, "context": "Arithmetic."},
            {"question": "Sky?", "choices": ["blue", "stone"], "answer_index": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config("eval.benchmark=multiple_choice", "data.dataset_name=multiple_choice", f"data.data_path={data}", "data.split=null")
    samples = load_eval_samples(cfg.data, cfg.eval)
    tokenizer = get_tokenizer(cfg.tokenizer)
    favoured = {tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in ("white", "four", "stone")}
    workers = ScriptedWorkers(score=lambda context, continuation: 0.0 if tuple(continuation) in favoured else -5.0)
    records, summary = evaluate(samples, workers, tokenizer, cfg)
    assert [r["chosen"] for r in records] == [1, 0, 1]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert samples[1].prompt[0] == {"role": "system", "content": "Arithmetic."}


def test_multiple_choice_rows_without_choices_are_refused():
    cfg = _config("eval.benchmark=multiple_choice", "eval.max_prompts=2")
    with pytest.raises(DataError, match="choices.*answer_index"):
        load_eval_samples(cfg.data, cfg.eval)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.num_samples=3"], "greedy decoding gives identical samples"),
        (["eval.k_value=2"], "eval.k_value=2 exceeds eval.num_samples=1"),
        (["generation.top_k=0"], "generation.top_k=0"),
        (["generation.backend=vllm", "generation.vllm_cfg.tensor_parallel_size=2"], "tensor_parallel_size"),
        (["generation.temprature=1"], "did you mean 'generation.temperature'"),
    ],
)
def test_bad_eval_configs_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(*overrides)


def test_squad_scores_take_the_best_over_every_gold_answer():
    # validation row 1 of squad-tiny asks for a person: "Dmitri Kessski", or the surname alone
    cfg = _config("eval.max_prompts=2")
    samples = load_eval_samples(cfg.data, cfg.eval)
    row = json.loads((REPO / "assets" / "squad-tiny" / "validation.jsonl").read_text().splitlines()[1])
    assert samples[1].gold_answers == row["answers"]["text"] == ["Dmitri Kessski", "Kessski"]
    assert samples[0].gold_answers == [samples[0].reference]
    workers = ScriptedWorkers(lambda i, _: "Kessski")
    records, summary = evaluate(samples, workers, get_tokenizer(cfg.tokenizer), cfg)
    # the surname alone: EM 1 against the second gold, where the first alone would give EM 0, F1 2/3
    assert records[1]["scores"] == {"exact_match": 1.0, "f1": 1.0}
    assert squad_scores("Kessski", ["Dmitri Kessski"]) == {"exact_match": 0.0, "f1": pytest.approx(2 / 3)}
    assert records[1]["gold_answers"] == ["Dmitri Kessski", "Kessski"]
    assert summary["exact_match"] == pytest.approx(0.5)  # row 0's answer is a year
