"""benchmarks/vllm_vs_hf.py is for a GPU machine with vLLM; elsewhere it refuses in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "vllm_vs_hf.py"


def _script():
    spec = importlib.util.spec_from_file_location("vllm_vs_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None, reason="can run here")
def test_without_cuda_or_vllm_it_says_why_and_exits_2(tmp_path, capsys):
    script = _script()
    assert script.main(["--out", str(tmp_path / "out.json")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("vllm_vs_hf: cannot run here: ")
    assert ("no CUDA device" in error) != torch.cuda.is_available()
    assert not (tmp_path / "out.json").exists()


def test_compare_counts_identical_outputs_and_finds_the_first_difference():
    script = _script()
    hf = {"token_ids": [[1, 2, 3], [4, 5, 6], [7, 8]], "answer_logprobs": [-1.0, -2.0, -3.0]}
    vllm = {"token_ids": [[1, 2, 3], [4, 9, 6], [7, 8, 0]], "answer_logprobs": [-1.0, -2.001, -3.0]}
    result = script.compare(hf, vllm, tolerance=1e-2)
    assert result["identical_greedy_outputs"] == 1 and result["first_difference_positions"] == [None, 1, 2]
    assert result["max_answer_logprob_gap"] == pytest.approx(1e-3) and not result["passed"]
    assert script.compare(hf, hf, tolerance=0.0)["passed"]
