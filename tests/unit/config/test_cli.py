"""`python -m nemo_rl.config show` and `parse_run_args`: output, exit codes, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nemo_rl.config import load_config, parse_run_args
from nemo_rl.config.cli import main

REPO = Path(__file__).resolve().parents[3]

def show(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nemo_rl.config", "show", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_show_prints_the_composed_validated_config(base):
    result = show("--config", str(base), "policy.model_name=other/model", "sft.max_num_steps=3")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    expected = load_config(base, ["policy.model_name=other/model", "sft.max_num_steps=3"]).model_dump()
    assert shown == expected
    assert shown["policy"]["tokenizer"]["name"] == "other/model"
    assert "\x1b[" not in result.stdout  # plain text when not a terminal


def test_show_bad_key_exits_2_without_traceback(base):
    result = show("--config", str(base), "policy.optimizer.kwarg.lr=1")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("config error: ")
    assert (
        "'policy.optimizer.kwarg' does not exist (did you mean 'policy.optimizer.kwargs'?)" in result.stderr
    )


def test_show_in_process_user_errors(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["show", "--config", str(tmp_path / "missing.yaml")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "config error: config file not found:" in err and "missing.yaml" in err

    with pytest.raises(SystemExit) as info:
        main(["show", "--config", str(base), "sft.max_num_steps=0", "++policy.optimizer.kwarg={}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "2 errors" in err
        and "sft.max_num_steps: must be >= 1, got 0" in err
        and "did you mean 'kwargs'?" in err
    )

    with pytest.raises(SystemExit) as info:
        main(["show", "--config", str(base), "--bogus"])
    assert info.value.code == 2
    assert "unrecognized option(s): --bogus" in capsys.readouterr().err


def test_show_in_process_prints_yaml(base, capsys):
    assert main(["show", "--config", str(base)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_config(base).model_dump()


def test_parse_run_args_returns_config_and_path(base, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("defaults: base.yaml\nsft:\n  max_num_steps: 99\n")
    cfg, path = parse_run_args(
        ["sft.seed=3", "--config", str(other), "policy.model_name=m"],
        default_config=str(base),
        description="test",
    )
    assert path == str(other)
    assert (cfg.sft.max_num_steps, cfg.sft.seed, cfg.policy.tokenizer.name) == (99, 3, "m")

    cfg, path = parse_run_args([], default_config=str(base), description="test")
    assert path == str(base) and cfg.sft.max_num_steps == 10


def test_parse_run_args_config_error_exits_2_with_red_prefix_message(base, capsys):
    with pytest.raises(SystemExit) as info:
        parse_run_args(["cluster.gpus_per_nod=2"], default_config=str(base), description="test")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ")
    assert "'cluster.gpus_per_nod' does not exist (did you mean 'cluster.gpus_per_node'?)" in err
    assert "Traceback" not in err
