"""Which checkpoint a run starts from (checkpointing.resume) and the data-order check."""

from __future__ import annotations

import json
import random
import re
from dataclasses import fields
from functools import reduce
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import numpy as np
import pytest
import torch

from nemo_rl.algorithms.resume import (
    ResumeError,
    check_same_data_order,
    data_fingerprint,
    driver_rng_state,
    last_checkpoint,
    resume_hint,
    seed_driver_rngs,
    select_checkpoint,
    set_driver_rng_state,
)
from nemo_rl.config import load_config
from nemo_rl.config.schema import CheckpointingConfig, MasterConfig
from nemo_rl.data.processors import CONFIG_KEY, TokenizationOptions
from nemo_rl.utils.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[3]


def manager_with(tmp_path, steps: list[int], *, name: str = "ckpt") -> CheckpointManager:
    manager = CheckpointManager(CheckpointingConfig(checkpoint_dir=str(tmp_path / name)))
    for step in steps:
        tmp = manager.init_tmp_checkpoint(step, {"step": step, "epoch": 0, "consumed_samples": step, "metrics": {}})
        manager.finalize_checkpoint(tmp)
    return manager


ROWS = [{"id": str(i), "question": f"q{i}", "answer": f"a{i}"} for i in range(10)]


@pytest.fixture(scope="module")
def cfg():
    return load_config(str(REPO / "configs" / "sft_tiny.yaml"))


def fingerprint(cfg: MasterConfig, rows=ROWS, num_samples: int = 10) -> dict[str, Any]:
    """The fingerprint of a run of `cfg`, as setup() computes it."""
    return data_fingerprint(cfg, TokenizationOptions.from_config(cfg), rows, num_samples)


def saved_fingerprint(cfg: MasterConfig, rows=ROWS, num_samples: int = 10) -> dict[str, Any]:
    """The fingerprint of a run of `cfg` as a resume reads it back from training_info.json."""
    return json.loads(json.dumps(fingerprint(cfg, rows, num_samples)))


# ---------------------------------------------------------------- select_checkpoint


def test_auto_takes_the_latest_and_cleans_interrupted_saves(tmp_path):
    manager = manager_with(tmp_path, [2, 10, 4])
    (manager.checkpoint_dir / "tmp_step_12").mkdir()
    assert select_checkpoint(manager, "auto") == manager.checkpoint_dir / "step_10"
    assert not (manager.checkpoint_dir / "tmp_step_12").exists()


def test_auto_on_an_empty_or_missing_dir_starts_fresh(tmp_path):
    assert select_checkpoint(manager_with(tmp_path, []), "auto") is None
    missing = CheckpointManager(CheckpointingConfig(checkpoint_dir=str(tmp_path / "nowhere")))
    assert select_checkpoint(missing, "auto") is None


def test_never_refuses_existing_checkpoints_and_names_them(tmp_path):
    manager = manager_with(tmp_path, [3, 6])
    with pytest.raises(ResumeError, match=r"resume=never.*step_3, step_6.*resume=auto to continue from step_6"):
        select_checkpoint(manager, "never")
    assert select_checkpoint(manager_with(tmp_path, [], name="fresh"), "never") is None


def test_never_ignores_only_incomplete_leftovers(tmp_path):
    manager = manager_with(tmp_path, [])
    (manager.checkpoint_dir / "tmp_step_1").mkdir(parents=True)
    assert select_checkpoint(manager, "never") is None
    assert not (manager.checkpoint_dir / "tmp_step_1").exists()


def test_a_path_is_taken_from_another_dir(tmp_path):
    source = manager_with(tmp_path, [2, 4], name="old")
    target = manager_with(tmp_path, [], name="new")
    chosen = select_checkpoint(target, str(source.checkpoint_dir / "step_2"))
    assert chosen == source.checkpoint_dir / "step_2"


def test_a_path_older_than_checkpoints_in_the_dir_is_refused(tmp_path):
    manager = manager_with(tmp_path, [2, 4])
    with pytest.raises(ResumeError, match=r"is step 2, but .* holds later checkpoints \(step_4\)"):
        select_checkpoint(manager, str(manager.checkpoint_dir / "step_2"))
    assert select_checkpoint(manager, str(manager.checkpoint_dir / "step_4")) == manager.checkpoint_dir / "step_4"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "no such directory"),
        (lambda root: root / "ckpt", r"not a checkpoint \(no training_info.json\); it looks like a checkpoint_dir.*step_4"),
        (lambda root: root / "ckpt" / "tmp_step_9", "interrupted, incomplete save"),
    ],
    ids=["missing", "a-checkpoint-dir", "a-tmp-dir"],
)
def test_a_bad_path_is_refused_with_what_to_give(tmp_path, make, message):
    manager = manager_with(tmp_path, [4])
    target = manager_with(tmp_path, [], name="target")
    (manager.checkpoint_dir / "tmp_step_9").mkdir()
    with pytest.raises(ResumeError, match=message):
        select_checkpoint(target, str(make(tmp_path)))


def test_disabled_checkpointing_starts_fresh_without_touching_the_dir(tmp_path):
    manager = manager_with(tmp_path, [1])
    (manager.checkpoint_dir / "tmp_step_2").mkdir()
    assert select_checkpoint(manager, "auto", enabled=False) is None
    assert select_checkpoint(manager, "never", enabled=False) is None
    assert (manager.checkpoint_dir / "tmp_step_2").exists()


def test_last_checkpoint_and_the_hint_prefer_the_newest_of_dir_and_start(tmp_path):
    source = manager_with(tmp_path, [5], name="old")
    target = manager_with(tmp_path, [], name="new")
    start = source.checkpoint_dir / "step_5"
    assert last_checkpoint(target, start) == start
    assert f"checkpointing.resume={start}" in resume_hint(target, start)
    target = manager_with(tmp_path, [7], name="new")
    assert last_checkpoint(target, start) == target.checkpoint_dir / "step_7"
    assert "resume=auto (the default)" in resume_hint(target, start)
    assert "starts from step 0" in resume_hint(manager_with(tmp_path, [], name="empty"), None)


def test_with_checkpointing_disabled_another_runs_checkpoints_are_never_offered(tmp_path):
    manager_with(tmp_path, [3])  # an earlier run's
    disabled = CheckpointManager(CheckpointingConfig(checkpoint_dir=str(tmp_path / "ckpt"), enabled=False))
    assert last_checkpoint(disabled, None) is None
    assert "starts from step 0" in resume_hint(disabled, None)
    start = manager_with(tmp_path, [5], name="old").checkpoint_dir / "step_5"
    assert last_checkpoint(disabled, start) == start


# ---------------------------------------------------------------- the data order


def test_same_config_and_rows_pass(cfg):
    saved = saved_fingerprint(cfg)
    check_same_data_order(saved, fingerprint(cfg), checkpoint=Path("step_1"))


def test_changed_order_keys_and_rows_are_all_named(cfg):
    saved = saved_fingerprint(cfg, ROWS, 10)
    changed_cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"seed": 7})})
    rows = [dict(r) for r in ROWS]
    rows[3]["answer"] = "changed"
    with pytest.raises(ResumeError) as error:
        check_same_data_order(saved, fingerprint(changed_cfg, rows, 10), checkpoint=Path("ckpt/step_3"))
    text = str(error.value)
    assert "ckpt/step_3" in text and "data order would differ" in text
    assert f"sft.seed: {cfg.sft.seed} -> 7" in text
    assert "the training rows' contents: 10 rows" in text


def test_unrelated_config_changes_pass(cfg):
    saved = saved_fingerprint(cfg, ROWS, 10)
    other = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"val_period": 3, "max_num_steps": 999})})
    check_same_data_order(saved, fingerprint(other, ROWS, 10), checkpoint=Path("step_1"))


def test_moved_copy_of_the_same_rows_passes_but_a_different_sample_count_does_not(cfg):
    saved = saved_fingerprint(cfg, ROWS, 10)
    moved_train = cfg.data.train.model_copy(update={"data_path": "/elsewhere/squad"})
    moved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": moved_train})})
    check_same_data_order(saved, fingerprint(moved, ROWS, 10), checkpoint=Path("step_1"))
    with pytest.raises(ResumeError, match="training samples left after length handling: 10 -> 9"):
        check_same_data_order(saved, fingerprint(cfg, ROWS, 9), checkpoint=Path("step_1"))


def mixture_of(cfg: MasterConfig, *, max_samples: tuple[int, int], data_paths=("/data/a", "/data/b")):
    """`cfg` with data.train a list of two datasets of `max_samples` rows each, and their rows."""
    from nemo_rl.data.datasets import MixedRows, MixturePart
    from nemo_rl.data.interfaces import TaskDataSpec

    entries = [
        cfg.data.train.model_copy(update={"data_path": path, "max_samples": n})
        for path, n in zip(data_paths, max_samples, strict=True)
    ]
    mixed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": entries})})
    parts, start = [], 0
    for index, n in enumerate(max_samples):
        parts.append(MixturePart(f"data.train[{index}]", "squad", ROWS[start : start + n], TaskDataSpec("squad"), "sft_processor"))
        start += n
    return mixed, MixedRows(parts)


def test_a_checkpoint_from_before_a_key_existed_resumes_while_the_key_is_off(cfg):
    """A checkpoint written before data.train.max_samples existed has no such key: unset there and
    null now is the same data; a value now is a change."""
    saved = saved_fingerprint(cfg)
    del saved["config"]["data.train.max_samples"]
    check_same_data_order(saved, fingerprint(cfg), checkpoint=Path("step_1"))
    capped_train = cfg.data.train.model_copy(update={"max_samples": 5})
    capped = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": capped_train})})
    with pytest.raises(ResumeError, match=r"data.train.max_samples: '<unset>' -> 5"):
        check_same_data_order(saved, fingerprint(capped), checkpoint=Path("step_1"))


def test_a_mixture_is_part_of_the_fingerprint(cfg):
    mixed, rows = mixture_of(cfg, max_samples=(6, 4))
    saved = saved_fingerprint(mixed, rows, 10)
    assert saved["config"]["data.train[1].max_samples"] == 4
    assert saved["train_mixture"] == [
        {"dataset": "data.train[0]", "dataset_name": "squad", "rows": 6},
        {"dataset": "data.train[1]", "dataset_name": "squad", "rows": 4},
    ]
    check_same_data_order(saved, fingerprint(mixed, rows, 10), checkpoint=Path("step_1"))
    # the same rows read from moved copies resume
    moved, moved_rows = mixture_of(cfg, max_samples=(6, 4), data_paths=("/x/a", "/x/b"))
    check_same_data_order(saved, fingerprint(moved, moved_rows, 10), checkpoint=Path("step_1"))
    # the same ten rows, shared differently between the datasets, do not
    reshared, reshared_rows = mixture_of(cfg, max_samples=(5, 5))
    with pytest.raises(ResumeError) as error:
        check_same_data_order(saved, fingerprint(reshared, reshared_rows, 10), checkpoint=Path("step_1"))
    text = str(error.value)
    assert "data.train[0].max_samples: 6 -> 5" in text and "data.train[1].max_samples: 4 -> 5" in text
    assert "the mixture's rows per dataset" in text
    # nor does the single dataset the mixture replaced
    with pytest.raises(ResumeError) as error:
        check_same_data_order(saved_fingerprint(cfg, ROWS, 10), fingerprint(mixed, rows, 10), checkpoint=Path("s"))
    assert "data.train.dataset_name: 'squad' -> '<unset>'" in str(error.value)
    assert "the mixture's rows per dataset: None -> [{'dataset': 'data.train[0]'" in str(error.value)


def test_a_changed_chat_template_is_named(cfg):
    saved = saved_fingerprint(cfg, ROWS, 10)
    tokenizer = cfg.policy.tokenizer.model_copy(update={"chat_template": None})
    changed = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"tokenizer": tokenizer})})
    with pytest.raises(ResumeError, match=r"policy.tokenizer.chat_template: 'default' -> None"):
        check_same_data_order(saved, fingerprint(changed, ROWS, 10), checkpoint=Path("step_1"))


@pytest.mark.parametrize(
    ("files", "hint"),
    [
        ([], "policy.model_name={ckpt}/hf)"),
        (["hf/adapter_config.json"], "is a LoRA adapter, which a new run cannot start from"),
        (["hf/adapter_config.json", "hf_merged/config.json"], "policy.model_name={ckpt}/hf_merged)"),
    ],
    ids=["full", "lora", "lora-merged"],
)
def test_the_refusal_says_how_to_start_from_the_weights(cfg, tmp_path, files, hint):
    ckpt = tmp_path / "step_3"
    for name in files:
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_text("{}")
    saved = saved_fingerprint(cfg, ROWS, 10)
    with pytest.raises(ResumeError, match=re.escape(hint.format(ckpt=ckpt))):
        check_same_data_order(saved, fingerprint(cfg, ROWS[:9], 9), checkpoint=ckpt)


def test_a_checkpoint_without_fingerprint_is_refused(cfg, tmp_path):
    checkpoint = tmp_path / "step_1"
    with pytest.raises(ResumeError) as error:
        check_same_data_order(None, fingerprint(cfg), checkpoint=checkpoint)
    assert str(error.value).startswith(
        f"cannot resume from {checkpoint}: its training_info.json has no data_fingerprint"
    )
    assert f"policy.model_name={checkpoint / 'hf'}" in str(error.value)


# ---------------------------------------------------------------- every tokenization option


def another_value(value: Any, hint: Any) -> Any:
    """A valid value of type `hint` other than `value`."""
    if get_origin(hint) is Literal:
        return next(choice for choice in get_args(hint) if choice != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value - 1  # lengths may not exceed other limits
    if isinstance(value, str):
        return value + "-changed"
    if value is None or isinstance(value, dict):
        return {**(value or {}), "changed": True}
    raise AssertionError(f"no other value for {value!r} ({hint}); teach another_value this type")


def with_config_key(cfg: MasterConfig, key: str, value: Any) -> MasterConfig:
    """`cfg` with the dotted `key` set to `value`, validated again."""
    dump = cfg.model_dump()
    *sections, leaf = key.split(".")
    reduce(dict.__getitem__, sections, dump)[leaf] = value
    return MasterConfig.model_validate(dump)


@pytest.mark.parametrize("option", [f for f in fields(TokenizationOptions)], ids=lambda f: f.name)
def test_every_tokenization_option_is_read_from_its_config_key_and_guards_the_resume(cfg, option):
    key = option.metadata[CONFIG_KEY]
    options = TokenizationOptions.from_config(cfg)
    saved = saved_fingerprint(cfg)
    assert saved["config"][key] == json.loads(json.dumps(getattr(options, option.name)))

    new_value = another_value(getattr(options, option.name), get_type_hints(TokenizationOptions)[option.name])
    changed_cfg = with_config_key(cfg, key, new_value)
    changed = TokenizationOptions.from_config(changed_cfg)
    assert getattr(changed, option.name) == new_value
    assert [f.name for f in fields(changed) if getattr(changed, f.name) != getattr(options, f.name)] == [option.name]
    with pytest.raises(ResumeError) as error:
        check_same_data_order(saved, fingerprint(changed_cfg), checkpoint=Path("step_1"))
    assert re.findall(r"^  - (.*?):", str(error.value), flags=re.MULTILINE) == [key]


# ---------------------------------------------------------------- driver generators


def test_driver_rng_state_round_trips():
    seed_driver_rngs(3)
    state = driver_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_driver_rngs(99)
    set_driver_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
