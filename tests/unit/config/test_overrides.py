"""Command-line overrides: each form of Hydra's grammar, NeMo RL's bare form, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config import ConfigError, compose_config, load_config
from nemo_rl.config.overrides import Kind, OverrideError, parse_override

OPTIMIZER = """\
  optimizer:
    name: torch.optim.AdamW
    kwargs:
      lr: 1.0e-5
      betas: [0.9, 0.98]
"""

VALIDATION_AND_DEFAULT = """\
  validation: null
  default:
    prompt_file: p.txt
"""


@pytest.fixture
def base_yaml(extend_minimal_yaml) -> str:
    """The minimal recipe with a list to index into, a null parent to set under and a data.default."""
    return extend_minimal_yaml(policy=OPTIMIZER, data=VALIDATION_AND_DEFAULT)


def compose(base: Path, *overrides: str) -> dict:
    return compose_config(base, overrides)


def error(base: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(base, overrides)
    return str(info.value)


# ---------------------------------------------------------------- a.b=c


def test_set_existing_keys_with_typed_values(base):
    cfg = compose(
        base,
        "sft.max_num_steps=25",
        "policy.optimizer.kwargs.lr=3e-4",
        "policy.model_name=meta-llama/Llama-3.2-1B",
        "data.train.dataset_name='quoted name'",
    )
    assert cfg["sft"]["max_num_steps"] == 25
    assert cfg["policy"]["optimizer"]["kwargs"]["lr"] == 3e-4
    assert cfg["policy"]["model_name"] == "meta-llama/Llama-3.2-1B"
    assert cfg["data"]["train"]["dataset_name"] == "quoted name"


def test_values_follow_hydra_grammar(base):
    cfg = compose(
        base,
        "policy.optimizer.kwargs.betas=[0.8,0.9]",
        "policy.optimizer.kwargs.lr=null",
        'policy.optimizer.name="1e-3"',  # quoted: stays a string
        "policy.optimizer.kwargs={eps: 1e-8, foreach: true}",  # a mapping replaces, it does not merge
        "sft.max_num_steps=1_000",
    )
    assert cfg["policy"]["optimizer"] == {"name": "1e-3", "kwargs": {"eps": 1e-8, "foreach": True}}
    assert cfg["sft"]["max_num_steps"] == 1000
    cfg = compose(base, "policy.optimizer.kwargs.betas=[0.8,0.9]", "policy.optimizer.kwargs.lr=null")
    assert cfg["policy"]["optimizer"]["kwargs"] == {"lr": None, "betas": [0.8, 0.9]}


def test_bare_nemo_rl_form_takes_any_string(base):
    cfg = compose(
        base,
        "policy.model_name=sft-dev-1-gpu",
        "data.train.dataset_name=a,b",  # Hydra would read a sweep
        "data.default.prompt_file=x=y",  # Hydra rejects a second '='
    )
    assert cfg["policy"]["model_name"] == "sft-dev-1-gpu"
    assert cfg["policy"]["tokenizer"]["name"] == "sft-dev-1-gpu"
    assert cfg["data"]["train"]["dataset_name"] == "a,b"
    assert cfg["data"]["default"]["prompt_file"] == "x=y"


def test_override_value_may_be_an_interpolation(base):
    cfg = compose(base, "sft.max_num_steps=${mul:${policy.max_total_sequence_length}, 2}")
    assert cfg["sft"]["max_num_steps"] == 128


def test_list_element_by_index(base):
    cfg = compose(base, "policy.optimizer.kwargs.betas.1=0.95")
    assert cfg["policy"]["optimizer"]["kwargs"]["betas"] == [0.9, 0.95]
    message = error(base, "policy.optimizer.kwargs.betas.5=0.95")
    assert "'policy.optimizer.kwargs.betas.5' does not exist" in message


def test_overrides_apply_in_order(base):
    cfg = compose(base, "sft.max_num_steps=3", "sft.max_num_steps=4")
    assert cfg["sft"]["max_num_steps"] == 4


def test_set_missing_key_names_it_and_the_closest_existing_key(base):
    message = error(base, "policy.optimizer.kwarg.lr=1")
    assert "'policy.optimizer.kwarg' does not exist" in message
    assert "did you mean 'policy.optimizer.kwargs'?" in message

    assert "use '++" not in message  # the schema has no such key: adding it would not help

    message = error(base, "policy.optimizer.kwargs.lrr=1")
    assert (
        "'policy.optimizer.kwargs.lrr' does not exist (did you mean 'policy.optimizer.kwargs.lr'?)" in message
    )
    assert "use '++policy.optimizer.kwargs.lrr=1' to add it" in message  # free-form kwargs: it might


def test_set_a_schema_key_the_yaml_leaves_out(base):
    cfg = load_config(
        base, ["sft.seed=3", "logger.wandb.entity=team", "data.default.seed=5", "cluster.num_nodes=1"]
    )
    assert cfg.sft.seed == 3
    assert cfg.logger.wandb.entity == "team" and cfg.logger.wandb.project == "sft-dev"
    assert cfg.data.train.seed == 5
    message = error(base, "cluster.gpus_per_nod=2")
    assert "'cluster.gpus_per_nod' does not exist (did you mean 'cluster.gpus_per_node'?)" in message


def test_set_missing_key_without_a_close_match_lists_the_keys_there(base):
    message = error(base, "policy.optimizer.zzz=1")
    assert "'policy.optimizer.zzz' does not exist (keys under policy.optimizer: name, kwargs)" in message
    message = error(base, "policy.tokenizer.zzz=1")  # the schema's keys count, not only the YAML's
    assert "keys under policy.tokenizer: name, chat_template, chat_template_kwargs" in message


def test_several_bad_overrides_are_all_reported(base):
    message = error(base, "polcy.model_name=x", "sft.max_num_step=3", "sft.max_num_steps=5")
    assert message.startswith("2 errors in ")
    assert "did you mean 'policy'?" in message
    assert "did you mean 'sft.max_num_steps'?" in message


def test_set_under_a_null_parent_creates_the_mapping(base):
    cfg = load_config(base, ["data.validation.data_path=/data/val.jsonl", "data.validation.input_key=q"])
    assert cfg.data.validation is not None
    assert cfg.data.validation.data_path == "/data/val.jsonl"
    assert cfg.data.validation.input_key == "q"
    assert cfg.data.validation.prompt_file == "p.txt"  # data.default applies to the new split


def test_key_under_a_scalar_is_an_error(base):
    message = error(base, "policy.model_name.x=1")
    assert "policy.model_name holds 'tiny-llama', not a mapping" in message


# ---------------------------------------------------------------- ++ and +


def test_force_add_adds_nested_keys_or_sets_existing_ones(base):
    cfg = compose(
        base,
        "++policy.optimizer.kwargs.amsgrad=true",
        "++policy.extra.deep.key=[1,2]",
        "++sft.max_num_steps=7",
    )
    assert cfg["policy"]["optimizer"]["kwargs"]["amsgrad"] is True
    assert cfg["policy"]["extra"] == {"deep": {"key": [1, 2]}}
    assert cfg["sft"]["max_num_steps"] == 7


def test_add_adds_a_new_key(base):
    cfg = compose(base, "+policy.optimizer.kwargs.amsgrad=false", "+logger.wandb.entity=my-team")
    assert cfg["policy"]["optimizer"]["kwargs"]["amsgrad"] is False
    assert cfg["logger"] == {"wandb": {"entity": "my-team"}}


def test_add_of_an_existing_key_is_an_error(base):
    message = error(base, "+sft.max_num_steps=7")
    assert "key 'sft.max_num_steps' already exists" in message
    assert "++sft.max_num_steps=7" in message


# ---------------------------------------------------------------- ~


def test_delete_removes_the_key(base):
    cfg = compose(base, "~policy.optimizer.kwargs.betas", "~data.default")
    assert cfg["policy"]["optimizer"]["kwargs"] == {"lr": 1e-5}
    assert "default" not in cfg["data"]


def test_delete_with_value_checks_the_current_value(base):
    assert "lr" not in compose(base, "~policy.optimizer.kwargs.lr=1e-5")["policy"]["optimizer"]["kwargs"]
    message = error(base, "~policy.optimizer.kwargs.lr=2e-5")
    assert "holds 1e-05, not 2e-05; nothing deleted" in message


def test_delete_of_a_missing_key_is_an_error(base):
    message = error(base, "~policy.optimizer.kwargs.bets")
    assert (
        "'policy.optimizer.kwargs.bets' does not exist (did you mean 'policy.optimizer.kwargs.betas'?)"
        in message
    )


def test_deleting_a_required_key_fails_validation(base):
    message = error(base, "~sft.max_num_steps")
    assert "sft.max_num_steps: missing required value (expected an integer)" in message


# ---------------------------------------------------------------- malformed overrides


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("policy.optimizer.kwargs.betas=[1,2", "cannot parse the value [1,2"),
        ("=3", "'' is not a dotted key path"),
        ("policy..model_name=3", "not a dotted key path"),
        ("policy.model_name", "expected key=value"),
        ("optimizer/adam=x", "config groups and packages"),
        ("policy.model_name@pkg=x", "config groups and packages"),
    ],
)
def test_malformed_overrides(base, text, expected):
    message = error(base, text)
    assert f"override '{text}'" in message and expected in message


def test_parse_override_kinds():
    assert parse_override("a.b=1") == parse_override("a.b=1")
    assert parse_override("a.b=1").kind is Kind.SET
    assert parse_override("++a.b=1").kind is Kind.FORCE_ADD
    assert parse_override("+a.b=1").kind is Kind.ADD
    assert parse_override("~a.b").kind is Kind.DELETE
    assert parse_override("a.b={x: [1, {y: null}]}").value == {"x": [1, {"y": None}]}
    with pytest.raises(OverrideError):
        parse_override("a.b")
