"""Whole runs of the evaluation entry point, as a user starts them (CPU, hf backend, 2 workers)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_rl.algorithms.eval_metrics import squad_scores
from nemo_rl.config.eval_schema import EvalMasterConfig
from nemo_rl.config.loader import load_config
from nemo_rl.models.generation.hf_worker import HfGenerationWorker

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = str(REPO / "assets" / "tiny-llama")

pytestmark = pytest.mark.slow


def run_eval(*overrides: str, ray_env: dict[str, str] | None = None, timeout: float = 420) -> subprocess.CompletedProcess:
    """`ray_env`: the Ray cluster a run that gets as far as Ray attaches to (`shared_ray_head.env`)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(ray_env or {})}
    cmd = [sys.executable, str(REPO / "examples" / "run_eval.py"), "--config", str(REPO / "configs" / "eval.yaml"), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_squad_eval_writes_scores_that_match_its_samples(tmp_path, shared_ray_head):
    overrides = [f"generation.model_name={TINY_MODEL}", "eval.max_prompts=12", f"eval.output_dir={tmp_path}",
                 "generation.max_new_tokens=8", "generation.batch_size=4"]
    result = run_eval(*overrides, ray_env=shared_ray_head.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| exact_match |" in result.stdout and "step 2/2" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == 12 and summary["num_prompts"] == 12
    assert all(r["gold_answers"][0] == r["reference"] for r in rows)
    recomputed = [squad_scores(r["generations"][0], r["gold_answers"]) for r in rows]
    assert summary["f1"] == pytest.approx(sum(s["f1"] for s in recomputed) / 12)
    assert summary["exact_match"] == pytest.approx(sum(s["exact_match"] for s in recomputed) / 12)

    # the generations are the in-process worker's greedy ones, one prompt at a time
    from nemo_rl.algorithms.eval import encode_prompts, load_eval_samples
    from nemo_rl.data.tokenizer import get_tokenizer

    cfg = load_config(REPO / "configs" / "eval.yaml", overrides, root=EvalMasterConfig)
    samples = load_eval_samples(cfg.data, cfg.eval)
    encode_prompts(samples, get_tokenizer(cfg.tokenizer), cfg)
    worker = HfGenerationWorker(cfg.generation, cfg.tokenizer)
    assert [r["generations"][0] for r in rows] == [worker.generate([s.prompt_ids])[0].text for s in samples]


def test_missing_checkpoint_and_vllm_without_its_package_are_one_line_errors(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_eval(f"generation.model_name={missing}")
    assert result.returncode != 0 and f"generation.model_name='{missing}': no such directory" in result.stderr
    assert "Traceback" not in result.stderr
    if importlib.util.find_spec("vllm") is None:
        result = run_eval("generation.backend=vllm", "cluster.device=cuda")
        assert result.returncode != 0 and "uv sync --extra vllm" in result.stderr and "Traceback" not in result.stderr
