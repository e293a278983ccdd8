"""Validation errors read by people: full key path, what was given, what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from nemo_rl.config import ConfigError, load_config
from nemo_rl.config.errors import validation_messages

def errors_of(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.errors


def test_unknown_key_in_yaml_suggests_the_closest_name(tmp_path, base_yaml):
    path = tmp_path / "typo.yaml"
    path.write_text(base_yaml.replace("    kwargs: {lr: 1.0e-5}", "    kwarg: {lr: 1.0e-5}"))
    assert errors_of(path) == ["policy.optimizer.kwarg: unknown key (did you mean 'kwargs'?)"]


def test_unknown_key_without_a_close_name_lists_the_valid_ones(base):
    (message,) = errors_of(base, "++policy.optimizer.zzz=1")
    assert message == "policy.optimizer.zzz: unknown key; valid keys here: kwargs, name"


def test_unknown_top_level_section(base):
    (message,) = errors_of(base, "++polcy.model_name=x")
    assert message == "polcy: unknown key (did you mean 'policy'?)"


def test_wrong_type_shows_the_value_and_the_expected_type(base):
    assert errors_of(base, "policy.train_micro_batch_size=abc") == [
        "policy.train_micro_batch_size: expected an integer, got 'abc'"
    ]
    assert errors_of(base, "++logger.wandb_enabled=maybe") == [
        "logger.wandb_enabled: expected true or false, got 'maybe'"
    ]
    assert errors_of(base, "policy.optimizer.kwargs=[1]") == [
        "policy.optimizer.kwargs: expected a mapping, got [1]"
    ]
    assert errors_of(base, "++policy.dtensor_cfg.lora_cfg.target_modules=[q_proj,7]") == [
        "policy.dtensor_cfg.lora_cfg.target_modules.1: expected a string, got 7"
    ]


def test_wrong_choice_lists_the_choices_and_suggests_one(base):
    (message,) = errors_of(base, "++policy.precision=bfloat61")
    assert message == (
        "policy.precision: expected one of 'float32', 'bfloat16', 'float16', got 'bfloat61' "
        "(did you mean 'bfloat16'?)"
    )


def test_missing_required_value(base):
    (message,) = errors_of(base, "~policy.tokenizer.name")
    assert message == "policy.tokenizer.name: missing required value (expected a string)"
    assert "policy: missing required value (expected a mapping)" in errors_of(base, "~policy")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sft.max_num_steps=0", "sft.max_num_steps: must be >= 1, got 0"),
        (
            "++policy.dtensor_cfg.lora_cfg.dropout=1.5",
            "policy.dtensor_cfg.lora_cfg.dropout: must be < 1.0, got 1.5",
        ),
        ("++policy.max_grad_norm=0", "policy.max_grad_norm: must be > 0.0, got 0"),
        (
            "++data.train.split_validation_size=-0.1",
            "data.train.split_validation_size: must be >= 0.0, got -0.1",
        ),
    ],
)
def test_out_of_range(base, override, expected):
    assert errors_of(base, override) == [expected]


def test_validator_messages_name_their_keys(base):
    assert errors_of(base, "policy.train_micro_batch_size=3") == [
        "policy.train_global_batch_size=4 must be a multiple of policy.train_micro_batch_size=3"
    ]
    (message,) = errors_of(base, "++checkpointing.metric_name=loss")
    assert message == "checkpointing.metric_name: expected 'val:<metric>' or 'train:<metric>', got 'loss'"


def test_value_inherited_from_data_default_says_so(base):
    (message,) = errors_of(base, "++data.default={seed: abc}")
    assert message == "data.train.seed: expected an integer, got 'abc' (inherited from data.default)"


def test_scheduler_mistakes_report_only_the_relevant_form(base):
    (message,) = errors_of(base, "++policy.scheduler=5")
    assert message == "policy.scheduler: expected a list of mappings or a mapping, got 5"
    assert errors_of(base, "++policy.scheduler=[{name: a}, {milestones: [3]}, {nam: b}]") == [
        "policy.scheduler.2.name: missing required value (expected a string)",
        "policy.scheduler.2.nam: unknown key (did you mean 'name'?)",
    ]
    assert errors_of(base, "++policy.scheduler={name: a, kwarg: {}}") == [
        "policy.scheduler.kwarg: unknown key (did you mean 'kwargs'?)"
    ]
    (message,) = errors_of(base, "++policy.scheduler=[{name: a}, {name: b}]")
    assert message == "policy.scheduler: 2 schedulers need 1 milestones, got []"


def test_several_errors_are_listed_together(base):
    with pytest.raises(ConfigError) as info:
        load_config(base, ["sft.max_num_steps=0", "++policy.optimizer.kwarg={}", "++cluster.gpus_per_nod=2"])
    message = str(info.value)
    assert message.startswith(f"3 errors in {base} with overrides sft.max_num_steps=0 ")
    assert "\n  - sft.max_num_steps: must be >= 1, got 0" in message
    assert "\n  - policy.optimizer.kwarg: unknown key (did you mean 'kwargs'?)" in message
    assert "\n  - cluster.gpus_per_nod: unknown key (did you mean 'gpus_per_node'?)" in message


def test_single_error_message_starts_with_its_source(base):
    with pytest.raises(ConfigError) as info:
        load_config(base, ["sft.max_num_steps=0"])
    assert (
        str(info.value)
        == f"{base} with overrides sft.max_num_steps=0: sft.max_num_steps: must be >= 1, got 0"
    )


# ---------------------------------------------------------------- unions in general


class A(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int


class B(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b: str
    c: int = 0


class Root(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: A | B
    items: list[A | B] | None = None


def messages(data: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        Root.model_validate(data)
    return validation_messages(info.value, Root)


def test_plain_union_keeps_the_member_that_fits_best():
    # B fits on 'b' and fails only on 'c'; A would complain about two keys
    assert messages({"item": {"b": "x", "c": "no"}}) == ["item.c: expected an integer, got 'no'"]
    assert messages({"item": {"a": "x"}}) == ["item.a: expected an integer, got 'x'"]
    assert messages({"item": {"a": 1}, "items": [{"a": 1}, {"b": "y", "cc": 1}]}) == [
        "items.1.cc: unknown key (did you mean 'c'?)"
    ]


def test_plain_union_of_the_wrong_type_says_what_fits():
    assert messages({"item": 3}) == ["item: expected a mapping, got 3"]
