"""The Slurm scripts parse, the per-node script embedded in ray.sub included (it is one
single-quoted string: a quote inside it would end it early). Their behaviour on a real Slurm
cluster: tests/slurm/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"


def bash_syntax_errors(script: str) -> str:
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    return result.stderr if result.returncode else ""


@pytest.mark.parametrize("name", ["ray.sub", "sft_resubmit.sub"])
def test_script_parses(name):
    assert bash_syntax_errors((SLURM_DIR / name).read_text()) == ""


def test_the_node_script_inside_ray_sub_parses_and_is_all_of_its_string():
    text = (SLURM_DIR / "ray.sub").read_text()
    body = text.split("RAY_NODE_SCRIPT='", 1)[1].split("\n'\n", 1)[0]
    assert "'" not in body
    assert body.rstrip().endswith("done")  # the loop that keeps the node up, the script's end
    assert bash_syntax_errors(body) == ""
