"""benchmarks/gpu_parallel_sweep.py on CPU: its arguments, the cases it builds (and skips, with
the reason), the policy config of a case, and its refusal to run without CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_parallel_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("gpu_parallel_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_defaults_cover_both_models_tp_cp_and_4k_to_16k(sweep):
    args = sweep.parse_args([])
    assert args.models == ["llama-3.2-1b", "llama-8b-shape"]
    assert args.tp == [1, 2] and args.cp == [1, 2] and args.seq_lens == [4096, 8192, 16384]


def test_bad_values_are_refused_naming_the_option(sweep, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--tp", "0"])
    assert "--tp: every value must be >= 1" in capsys.readouterr().err


def test_cases_skip_what_the_gpus_or_the_build_cannot_run(sweep, monkeypatch):
    monkeypatch.setattr(sweep, "context_parallel_refusal", lambda: "refused in this build")
    args = sweep.parse_args(["--models", "llama-3.2-1b", "--tp", "1", "2", "4", "--seq-lens", "4096"])
    cases, skipped = sweep.build_cases(args, world_size=2)
    assert [(c.tensor_parallel_size, c.context_parallel_size) for c in cases] == [(1, 1), (2, 1)]
    reasons = {(c.tensor_parallel_size, c.context_parallel_size): why for c, why in skipped}
    assert reasons[(4, 1)] == "tp x cp = 4 does not divide the 2 GPUs"
    assert reasons[(1, 2)].startswith("context parallelism not in this build")


def test_context_parallel_refusal_reflects_the_schema(sweep):
    from nemo_rl.config.schema import PolicyConfig

    try:
        PolicyConfig(model_name="unused", dtensor_cfg={"context_parallel_size": 2})
        accepted = True
    except Exception:
        accepted = False
    assert (sweep.context_parallel_refusal() is None) == accepted


def test_a_case_configures_bf16_packing_and_its_layout(sweep, tmp_path):
    case = sweep.Case("llama-8b-shape", 2, 1, 8192)
    cfg = sweep.policy_config(case, str(tmp_path), world_size=8, samples_per_rank=4)
    assert cfg.precision == "bfloat16" and cfg.sequence_packing.enabled
    assert cfg.sequence_packing.train_mb_tokens == 8192 and cfg.max_total_sequence_length == 8192
    assert cfg.dtensor_cfg.tensor_parallel_size == 2 and cfg.dtensor_cfg.sequence_parallel
    assert cfg.train_global_batch_size == 4 * 4  # 4 data-parallel ranks


def test_random_samples_lie_between_a_quarter_and_the_whole_packed_length(sweep):
    batch = sweep.random_samples(16, 64, vocab_size=100, seed=0)
    lengths = batch["input_lengths"]
    assert bool(((lengths >= 16) & (lengths <= 64)).all())
    assert torch.equal(batch["token_mask"].sum(1).long(), lengths)


def test_the_table_lists_results_and_skipped_cases(sweep):
    row = {"model": "llama-3.2-1b", "tensor_parallel_size": 2, "context_parallel_size": 1, "packed_length": 4096,
           "tokens_per_s_per_gpu": 12345.6, "mfu": 0.4, "peak_memory_gb": 20.0}
    table = sweep.format_table([row], [(sweep.Case("llama-3.2-1b", 1, 2, 4096), "not in this build")])
    assert "llama-3.2-1b tp2 cp1 4k" in table and "40.0%" in table and "12346" in table
    assert "llama-3.2-1b tp1 cp2 4k" in table and "skipped: not in this build" in table


def test_refuses_without_cuda(sweep, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sweep.main([]) == 2
    assert "needs CUDA GPUs" in capsys.readouterr().err
