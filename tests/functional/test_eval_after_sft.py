"""The embedded reading recipe (configs/sft_tiny_eval.yaml), trained and then scored through
examples/run_eval.py beside the untrained base: the fine-tuned model must answer from the context.

Both scores come from the unchanged SQuAD-format validation split, greedy, hf backend on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.functional.test_run_eval import TINY_MODEL, run_eval
from tests.functional.test_run_sft import run_sft

pytestmark = pytest.mark.slow

# Half the recipe's 3,000 steps, to keep CI's time; its cosine schedule ends with them. Copying
# starts between steps 500 and 1,000 at this learning rate and the scores level off after 1,500
# (docs/eval.md); at 1,000 steps the score is still climbing (F1 12.5 here), too close to the margin.
TRAIN_STEPS = 1500
# The questions scored: the first 100 of the 300 keep the two evaluations to about a minute each.
EVAL_PROMPTS = 100
# F1 points (0-100) the fine-tuned model must gain over the base, which scores 0 (it answers with
# newlines). Answering with the right kind of answer without reading (the quickstart's recipe, loss
# on answers alone, 800 steps) reaches F1 3.0; this run reached F1 21.5 / EM 14
# (base 0 / 0) on a shared 2-core machine in 8.5 minutes.
F1_MARGIN = 10.0


def evaluate(model_dir: Path, output_dir: Path, ray_env: dict[str, str]) -> dict:
    result = run_eval(
        f"generation.model_name={model_dir}", f"eval.output_dir={output_dir}", f"eval.max_prompts={EVAL_PROMPTS}",
        ray_env=ray_env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((output_dir / "summary.json").read_text())


def test_the_reading_recipe_scores_clearly_above_the_base(tmp_path, shared_ray_head):
    result = run_sft(
        f"sft.max_num_steps={TRAIN_STEPS}", "sft.val_period=0", "sft.val_at_start=false", "sft.val_at_end=false",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}", f"checkpointing.save_period={TRAIN_STEPS}",
        f"logger.log_dir={tmp_path / 'logs'}", f"policy.scheduler.1.kwargs.T_max={TRAIN_STEPS - 20}",
        config="sft_tiny_eval.yaml", ray_env=shared_ray_head.env, timeout=2400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fine_tuned = evaluate(tmp_path / "ckpt" / f"step_{TRAIN_STEPS}" / "hf", tmp_path / "eval_fine_tuned", shared_ray_head.env)
    base = evaluate(TINY_MODEL, tmp_path / "eval_base", shared_ray_head.env)

    assert fine_tuned["num_prompts"] == base["num_prompts"] == EVAL_PROMPTS
    assert 100 * fine_tuned["f1"] >= 100 * base["f1"] + F1_MARGIN, (fine_tuned, base)
    assert fine_tuned["exact_match"] > base["exact_match"], (fine_tuned, base)
