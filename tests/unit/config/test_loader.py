"""Composition: `defaults:` inheritance, `_override_`, interpolation and resolvers, data.default."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from nemo_rl.config import ConfigError, MasterConfig, compose_config, config_to_yaml, load_config
from nemo_rl.config.eval_schema import EvalMasterConfig
from nemo_rl.config.loader import register_resolvers

REPO = Path(__file__).resolve().parents[3]

def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- defaults: inheritance


def test_multi_level_inheritance_child_wins_over_parent_over_grandparent(tmp_path):
    write(
        tmp_path,
        "grand.yaml",
        """
        a: {x: 1, y: 1, z: 1}
        only_grand: g
    """,
    )
    write(
        tmp_path,
        "parent.yaml",
        """
        defaults: grand.yaml
        a: {y: 2, z: 2}
        only_parent: p
    """,
    )
    child = write(
        tmp_path,
        "child.yaml",
        """
        defaults: parent.yaml
        a: {z: 3}
    """,
    )
    assert compose_config(child) == {
        "a": {"x": 1, "y": 2, "z": 3},
        "only_grand": "g",
        "only_parent": "p",
    }


def test_list_of_parents_merged_depth_first_in_order_later_wins(tmp_path):
    write(tmp_path, "base/root.yaml", "v: root\nfrom_root: 1\nseen: [root]\n")
    # first.yaml inherits root.yaml (relative to first.yaml's own folder)
    write(tmp_path, "base/first.yaml", "defaults: root.yaml\nv: first\nfrom_first: 1\n")
    write(tmp_path, "second.yaml", "v: second\nfrom_second: 1\nseen: [second]\n")
    child = write(tmp_path, "child.yaml", "defaults: [base/first.yaml, second.yaml]\nfrom_child: 1\n")
    assert compose_config(child) == {
        "v": "second",  # second.yaml comes after first.yaml (and root.yaml under it)
        "from_root": 1,
        "from_first": 1,
        "from_second": 1,
        "from_child": 1,
        "seen": ["second"],  # lists replace, they do not concatenate
    }

    child_last = write(tmp_path, "child2.yaml", "defaults: [second.yaml, base/first.yaml]\n")
    assert compose_config(child_last)["v"] == "first"


def test_override_marker_replaces_instead_of_merging_and_is_removed(tmp_path):
    write(
        tmp_path,
        "parent.yaml",
        """
        optimizer:
          name: adam
          kwargs: {lr: 0.1, betas: [0.9, 0.99], eps: 1.0e-8}
        keep: {a: 1, b: 2}
    """,
    )
    child = write(
        tmp_path,
        "child.yaml",
        """
        defaults: parent.yaml
        optimizer:
          kwargs:
            _override_: true
            lr: 0.5
        keep: {b: 3}
    """,
    )
    assert compose_config(child) == {
        "optimizer": {"name": "adam", "kwargs": {"lr": 0.5}},
        "keep": {"a": 1, "b": 3},
    }


def test_override_marker_false_merges_and_marker_never_leaks(tmp_path):
    write(tmp_path, "parent.yaml", "a: {x: 1}\n")
    child = write(
        tmp_path,
        "child.yaml",
        "defaults: parent.yaml\na: {_override_: false, y: 2}\nb: {_override_: true, z: 1}\n",
    )
    assert compose_config(child) == {"a": {"x": 1, "y": 2}, "b": {"z": 1}}


def test_defaults_cycle_is_reported_with_the_files(tmp_path):
    write(tmp_path, "a.yaml", "defaults: b.yaml\nx: 1\n")
    write(tmp_path, "b.yaml", "defaults: a.yaml\ny: 1\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        compose_config(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(info.value) and "b.yaml" in str(info.value)

    write(tmp_path, "self.yaml", "defaults: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        compose_config(tmp_path / "self.yaml")


def test_same_parent_reached_twice_is_not_a_cycle(tmp_path):
    write(tmp_path, "common.yaml", "c: 1\n")
    write(tmp_path, "left.yaml", "defaults: common.yaml\nl: 1\n")
    write(tmp_path, "right.yaml", "defaults: common.yaml\nr: 1\n")
    child = write(tmp_path, "child.yaml", "defaults: [left.yaml, right.yaml]\n")
    assert compose_config(child) == {"c": 1, "l": 1, "r": 1}


def test_missing_defaults_entry_names_the_child_file(tmp_path):
    child = write(tmp_path, "child.yaml", "defaults: [nope/parent.yaml]\nx: 1\n")
    with pytest.raises(ConfigError) as info:
        compose_config(child)
    message = str(info.value)
    assert str(child) in message and "'nope/parent.yaml' not found" in message


def test_defaults_must_be_paths(tmp_path):
    child = write(tmp_path, "child.yaml", "defaults: [{a: 1}]\n")
    with pytest.raises(ConfigError, match="'defaults' must be a path or a list of paths"):
        compose_config(child)


# ---------------------------------------------------------------- reading YAML


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "a:\n  b: 1\n  c: [1, 2\nd: 3\n")
    with pytest.raises(ConfigError) as info:
        compose_config(bad)
    message = str(info.value)
    assert "YAML syntax error" in message and str(bad) in message and "line 4" in message


def test_yaml_syntax_error_in_a_parent_names_the_parent(tmp_path):
    write(tmp_path, "parent.yaml", "a: b: c\n")
    child = write(tmp_path, "child.yaml", "defaults: parent.yaml\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml at line 1"):
        compose_config(child)


def test_duplicate_key_is_an_error_with_lines(tmp_path):
    bad = write(tmp_path, "dup.yaml", "a: 1\nb: 2\na: 3\n")
    with pytest.raises(
        ConfigError, match=r"dup\.yaml at line 3.*duplicate key 'a' \(first given on line 1\)"
    ):
        compose_config(bad)


def test_top_level_must_be_a_mapping(tmp_path):
    bad = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        compose_config(bad)


def test_scientific_notation_without_dot_reads_as_float(tmp_path):
    path = write(tmp_path, "f.yaml", "a: 1e-5\nb: 5.0e-6\nc: '1e-5'\n")
    assert compose_config(path) == {"a": 1e-5, "b": 5e-6, "c": "1e-5"}


# ---------------------------------------------------------------- interpolation


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("${mul:${n}, 3}", 12),
        ("${mul:2, 3, 4}", 24),
        ("${mul:${n}, 0.5}", 2.0),
        ("${add:${n}, 1, 2}", 7),
        ("${sub:${n}, 10}", -6),
        ("${div:${n}, 2}", 2),
        ("${div:7, 2}", 3.5),
        ("${max:${n}, 9, 1}", 9),
        ("${min:${n}, 9, 1}", 1),
        ("${mul:${add:${n}, 1}, ${sub:3, 1}}", 10),
    ],
)
def test_arithmetic_resolvers(tmp_path, expression, expected):
    path = write(tmp_path, "r.yaml", f"n: 4\nv: '{expression}'\n")
    value = compose_config(path)["v"]
    assert value == expected and type(value) is type(expected)


def test_resolver_errors_name_the_key(tmp_path):
    path = write(tmp_path, "r.yaml", "a:\n  zero: '${div:1, 0}'\n  word: '${mul:2, abc}'\n")
    with pytest.raises(ConfigError) as info:
        compose_config(path)
    message = str(info.value)
    assert "2 errors" in message
    assert "a.zero: cannot resolve '${div:1, 0}'" in message and "division by zero" in message
    assert "a.word: cannot resolve" in message and "expects numbers, got 'abc'" in message


def test_missing_interpolation_target_names_both_keys(tmp_path):
    path = write(tmp_path, "r.yaml", "a: {b: '${polcy.model_name}'}\n")
    with pytest.raises(
        ConfigError, match=r"a\.b: cannot resolve '\$\{polcy\.model_name\}'.*polcy\.model_name"
    ):
        compose_config(path)


def test_mandatory_missing_value(tmp_path, minimal_yaml):
    path = write(tmp_path, "m.yaml", minimal_yaml.replace("model_name: tiny-llama", "model_name: ???"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "policy.model_name: missing required value" in message
    assert "policy.tokenizer.name" not in message  # follows from the one above: said once


def test_interpolation_resolves_after_overrides(tmp_path, minimal_yaml):
    path = write(tmp_path, "c.yaml", minimal_yaml)
    cfg = load_config(path, ["policy.model_name=other/model", "policy.max_total_sequence_length=128"])
    assert cfg.policy.tokenizer.name == "other/model"
    assert cfg.data.max_input_seq_length == 128


def test_interpolation_across_inherited_files(tmp_path):
    write(tmp_path, "parent.yaml", "size: 4\ntwice: '${mul:${size}, 2}'\n")
    child = write(tmp_path, "child.yaml", "defaults: parent.yaml\nsize: 8\n")
    assert compose_config(child)["twice"] == 16


def test_resolvers_registered_idempotently_and_not_at_import():
    register_resolvers()
    register_resolvers()  # a second call is a no-op, not an error
    code = "import nemo_rl.config; from omegaconf import OmegaConf; print(OmegaConf.has_resolver('mul'))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- data.default


def test_data_default_merged_under_train_and_validation(tmp_path, minimal_yaml):
    text = minimal_yaml.replace(
        "  train:\n    dataset_name: squad\n",
        "  train:\n    dataset_name: squad\n    seed: 7\n"
        "  validation:\n    data_path: val.jsonl\n"
        "  default:\n    seed: 1\n    input_key: question\n    prompt_file: p.txt\n",
    )
    cfg = load_config(write(tmp_path, "c.yaml", text))
    assert cfg.data.train.seed == 7  # given in train: wins
    assert cfg.data.train.input_key == "question" and cfg.data.train.prompt_file == "p.txt"
    assert cfg.data.validation is not None
    assert cfg.data.validation.seed == 1 and cfg.data.validation.data_path == "val.jsonl"
    assert cfg.data.validation.input_key == "question"
    assert cfg.data.default == {"seed": 1, "input_key": "question", "prompt_file": "p.txt"}


def test_data_default_leaves_null_validation_null(tmp_path, minimal_yaml):
    text = minimal_yaml + "  validation: null\n  default: {prompt_file: p.txt}\n"
    text = text.replace("cluster:\n  device: cpu\n  cpu_workers_per_node: 2\n", "") + (
        "cluster: {device: cpu, cpu_workers_per_node: 2}\n"
    )
    cfg = load_config(write(tmp_path, "c.yaml", text))
    assert cfg.data.validation is None
    assert cfg.data.train.prompt_file == "p.txt"


def test_unknown_key_in_data_default_is_reported_there_once(tmp_path, minimal_yaml):
    path = write(tmp_path, "c.yaml", minimal_yaml)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["++data.default={promt_file: p.txt}"])
    message = str(info.value)
    assert "data.default.promt_file: unknown key (did you mean 'prompt_file'?)" in message
    assert "data.train" not in message


# ---------------------------------------------------------------- the real recipe and round trips


def test_sft_yaml_loads_and_validates():
    cfg = load_config(REPO / "configs" / "sft.yaml")
    assert isinstance(cfg, MasterConfig)
    assert cfg.policy.model_name == "meta-llama/Llama-3.2-1B"
    assert cfg.policy.tokenizer.name == cfg.policy.model_name
    assert cfg.policy.dynamic_batching.train_mb_tokens == 1024 * 1
    assert cfg.data.max_input_seq_length == cfg.policy.max_total_sequence_length
    assert cfg.data.train.dataset_name == "squad" and cfg.data.train.processor == "sft_processor"


def test_sft_yaml_with_overrides_recomputes_interpolations():
    cfg = load_config(
        REPO / "configs" / "sft.yaml",
        ["policy.train_micro_batch_size=2", "policy.max_total_sequence_length=512", "cluster.device=cpu"],
    )
    assert cfg.policy.sequence_packing.train_mb_tokens == 1024
    assert cfg.data.max_input_seq_length == 512


SHIPPED_CONFIGS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
RECIPES = [name for name in SHIPPED_CONFIGS if name.startswith("recipes/")]


def test_the_shipped_configs_include_the_recipes():
    assert {"sft.yaml", "sft_tiny.yaml", "sft_tiny_lora.yaml", "eval.yaml"} <= set(SHIPPED_CONFIGS)
    assert "recipes/llm/sft-llama3.2-1b-1n1g-fsdp2-lora.yaml" in RECIPES


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_loads_and_round_trips(tmp_path, name):
    """Evaluation configs (eval*.yaml) against the evaluation schema, the others against training's."""
    root = EvalMasterConfig if Path(name).name.startswith("eval") else MasterConfig
    assert isinstance(load_config(REPO / "configs" / name, root=root), root)  # as shipped, no overrides
    cfg = load_config(REPO / "configs" / name, ["cluster.device=cpu"], root=root)
    assert load_config(write(tmp_path, "saved.yaml", config_to_yaml(cfg)), root=root) == cfg


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_name_matches_its_cluster_and_output_dirs(name):
    """`<algo>-<model>-<N>n<G>g-<parallelism>.yaml`: N nodes of G GPUs, dirs named after it."""
    stem = Path(name).stem
    match = re.fullmatch(r"(?P<algo>[a-z]+)-(?P<model>.+)-(?P<nodes>\d+)n(?P<gpus>\d+)g-(?P<par>[a-z0-9-]+)", stem)
    assert match, f"{name}: not named <algo>-<model>-<N>n<G>g-<parallelism>.yaml"
    cfg = load_config(REPO / "configs" / name)
    assert (cfg.cluster.num_nodes, cfg.cluster.gpus_per_node) == (int(match["nodes"]), int(match["gpus"]))
    assert cfg.cluster.device == "cuda"
    assert Path(cfg.checkpointing.checkpoint_dir).name == stem
    assert Path(cfg.logger.log_dir).name == stem
    assert cfg.policy.dtensor_cfg.lora_cfg.enabled == ("lora" in match["par"].split("-"))


def test_llama_lora_recipe_is_the_documented_one():
    cfg = load_config(REPO / "configs" / "recipes" / "llm" / "sft-llama3.2-1b-1n1g-fsdp2-lora.yaml")
    assert cfg.policy.model_name == cfg.policy.tokenizer.name == "meta-llama/Llama-3.2-1B"
    assert cfg.policy.precision == "bfloat16" and cfg.policy.dtensor_cfg.enabled
    assert not cfg.policy.megatron_cfg.enabled
    lora = cfg.policy.dtensor_cfg.lora_cfg
    assert (lora.target_modules, lora.exclude_modules, lora.match_all_linear) == ([], [], True)
    assert (lora.dim, lora.alpha, lora.dropout, lora.dropout_position, lora.lora_A_init) == (8, 32, 0.0, "post", "xavier")
    assert cfg.policy.optimizer.kwargs["lr"] == 1.0e-4
    assert cfg.data.train.dataset_name == "squad"  # inherited from sft.yaml


def test_config_to_yaml_round_trips_sft_yaml(tmp_path):
    cfg = load_config(REPO / "configs" / "sft.yaml", ["cluster.device=cpu"])
    text = config_to_yaml(cfg)
    assert yaml.safe_load(text) == cfg.model_dump()
    assert load_config(write(tmp_path, "saved.yaml", text)) == cfg


def test_config_to_yaml_round_trips_awkward_values(tmp_path, minimal_yaml):
    text = minimal_yaml.replace(
        "  tokenizer:\n    name: ${policy.model_name}\n",
        "  tokenizer:\n    name: ${policy.model_name}\n"
        "    chat_template: \"{% for m in messages %}\\n  {{ m['content'] }}\\n{% endfor %}\"\n"
        "  max_grad_norm: .inf\n"
        "  scheduler:\n    - {name: torch.optim.lr_scheduler.LinearLR, kwargs: {start_factor: 0.1}}\n"
        "    - {name: torch.optim.lr_scheduler.ConstantLR, kwargs: {factor: 1.0}}\n"
        "    - {milestones: [5]}\n",
    )
    text += "logger:\n  wandb:\n    name: 'cost \\${dollars} 100%'\n"
    cfg = load_config(write(tmp_path, "c.yaml", text))
    assert cfg.logger.wandb.name == "cost ${dollars} 100%"
    assert cfg.policy.max_grad_norm == float("inf")
    assert "\n" in (cfg.policy.tokenizer.chat_template or "")
    again = load_config(write(tmp_path, "saved.yaml", config_to_yaml(cfg)))
    assert again == cfg
    assert again.policy.scheduler_entries()[1] == [5]
