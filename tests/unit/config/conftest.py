"""The config tests' smallest valid recipe, as YAML text and as a file.

`minimal_yaml`: every required key and nothing else. `extend_minimal_yaml(policy=..., data=...)`:
that with more lines at the end of its policy and data sections. `base_yaml`: the minimal recipe
plus an optimizer learning rate; a test module overrides it to start from another recipe.
`base`: `base_yaml` written to `tmp_path/base.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MINIMAL_YAML = """\
sft:
  max_num_steps: 10
policy:
  model_name: tiny-llama
  tokenizer:
    name: ${policy.model_name}
  train_global_batch_size: 4
  train_micro_batch_size: 1
  max_total_sequence_length: 64
data:
  max_input_seq_length: ${policy.max_total_sequence_length}
  train:
    dataset_name: squad
cluster:
  device: cpu
  cpu_workers_per_node: 2
"""


def _extend(policy: str = "", data: str = "") -> str:
    """MINIMAL_YAML with `policy` added at the end of its policy section and `data` at the end of its
    data section (a second `policy:` key would be a duplicate key)."""
    policy_end, data_end = "  max_total_sequence_length: 64\n", "    dataset_name: squad\n"
    text = MINIMAL_YAML.replace(policy_end, policy_end + policy)
    return text.replace(data_end, data_end + data)


@pytest.fixture
def minimal_yaml() -> str:
    return MINIMAL_YAML


@pytest.fixture
def extend_minimal_yaml():
    return _extend


@pytest.fixture
def base_yaml() -> str:
    return _extend(policy="  optimizer:\n    kwargs: {lr: 1.0e-5}\n")


@pytest.fixture
def base(tmp_path: Path, base_yaml: str) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(base_yaml)
    return path
