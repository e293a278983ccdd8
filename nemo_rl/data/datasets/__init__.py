"""Datasets by name: `data.train` / `data.validation` -> formatted chat rows and a TaskDataSpec.

A dataset class is chosen by `dataset_name`: a registered name (`DATASET_REGISTRY`) or the
dotted import path of a user class (`my_pkg.my_module.MyDataset`). It is constructed with the
`DatasetConfig` fields its `__init__` accepts plus `kwargs`, and must expose, like NeMo RL's:

    formatted_ds = {"train": rows, "validation": rows or None}   # rows: {"messages": [...], "tools"?: [...]}
    task_spec = TaskDataSpec(task_name, prompt_file, system_prompt_file)

A class reads and formats rows; `build_dataset` then applies `split_validation_size` (with
`seed`), `prompt_file` and `system_prompt_file` the same way to every class, built-in or not,
except those keys a (user) class accepts and so handles itself.

`load_datasets(data_cfg)` builds the train dataset and, if `data.validation` is given, a second
dataset for validation (its `split` split when it has one, else its `train` split); otherwise
validation is the train dataset's `validation` split.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from nemo_rl.config.schema import DataConfig, DatasetConfig
from nemo_rl.data.datasets.alpaca import AlpacaDataset
from nemo_rl.data.datasets.common import split_train_validation
from nemo_rl.data.datasets.multiple_choice import MultipleChoiceDataset
from nemo_rl.data.datasets.openai_format import OpenAIFormatDataset
from nemo_rl.data.datasets.preserving import PreservingDataset
from nemo_rl.data.datasets.response_dataset import ResponseDataset
from nemo_rl.data.datasets.squad import SquadDataset
from nemo_rl.data.interfaces import DataError, TaskDataSpec

DATASET_REGISTRY: dict[str, type] = {
    "squad": SquadDataset,
    "ResponseDataset": ResponseDataset,
    "openai_format": OpenAIFormatDataset,
    "alpaca": AlpacaDataset,
    "multiple_choice": MultipleChoiceDataset,
}

# Fields that select or post-process a dataset rather than configure its class. The loader applies
# the first four of _APPLIED_BY_LOADER to the class's output unless the class accepts them; `split`
# picks a separate validation dataset's rows (load_datasets).
_LOADER_FIELDS = ("dataset_name", "processor", "kwargs")
_APPLIED_BY_LOADER = ("split_validation_size", "seed", "prompt_file", "system_prompt_file", "split")

__all__ = [
    "DATASET_REGISTRY",
    "AlpacaDataset",
    "MultipleChoiceDataset",
    "OpenAIFormatDataset",
    "PreservingDataset",
    "ResponseDataset",
    "SFTDatasets",
    "SquadDataset",
    "build_dataset",
    "load_datasets",
    "resolve_dataset_class",
]


@dataclass
class SFTDatasets:
    """What the training loop needs from `data`: rows with len and __getitem__, and their task specs."""

    train: Any
    validation: Any | None
    task_spec: TaskDataSpec
    validation_task_spec: TaskDataSpec | None = None


def load_datasets(data_cfg: DataConfig) -> SFTDatasets:
    """The train and validation rows for `data_cfg` (with `data.default` already merged in)."""
    from nemo_rl.data.processors import check_processor_name

    check_processor_name(data_cfg.train.processor, "data.train.processor")
    train_dataset = build_dataset(data_cfg.train, "data.train")
    train_rows = train_dataset.formatted_ds["train"]
    if train_rows is None or len(train_rows) == 0:
        raise DataError(f"data.train (dataset_name={data_cfg.train.dataset_name!r}) has no training rows")
    if data_cfg.validation is None:
        validation_rows = train_dataset.formatted_ds.get("validation")
        validation_spec = train_dataset.task_spec if validation_rows is not None else None
    else:
        check_processor_name(data_cfg.validation.processor, "data.validation.processor")
        validation_dataset = build_dataset(data_cfg.validation, "data.validation")
        split = data_cfg.validation.split
        key = split if split in validation_dataset.formatted_ds else "train"
        validation_rows = validation_dataset.formatted_ds[key]
        validation_spec = validation_dataset.task_spec
    return SFTDatasets(train_rows, validation_rows, train_dataset.task_spec, validation_spec)


def resolve_dataset_class(name: str | None, config_path: str = "data.train") -> type:
    """A registered dataset class, or a class imported from a dotted path."""
    if not name:
        raise DataError(
            f"{config_path}.dataset_name is not set; use one of {sorted(DATASET_REGISTRY)} "
            "or a dotted import path like my_pkg.my_module.MyDataset"
        )
    if name in DATASET_REGISTRY:
        return DATASET_REGISTRY[name]
    if "." not in name:
        close = difflib.get_close_matches(name, DATASET_REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(
            f"{config_path}.dataset_name={name!r} is not a registered dataset{hint}; registered: "
            f"{sorted(DATASET_REGISTRY)}, or give a class by dotted import path like my_pkg.my_module.MyDataset"
        )
    module_name, _, class_name = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise DataError(
            f"{config_path}.dataset_name={name!r}: cannot import module {module_name!r} ({error})"
        ) from error
    if not hasattr(module, class_name):
        raise DataError(
            f"{config_path}.dataset_name={name!r}: module {module_name!r} has no attribute {class_name!r}"
        )
    cls = getattr(module, class_name)
    if not callable(cls):
        raise DataError(f"{config_path}.dataset_name={name!r} is a {type(cls).__name__}, not a class")
    return cls


def build_dataset(cfg: DatasetConfig, config_path: str = "data.train") -> Any:
    """Constructs the dataset class of `cfg`, checks that it exposes formatted_ds and task_spec, and
    applies the split and the prompt files it does not handle itself."""
    cls = resolve_dataset_class(cfg.dataset_name, config_path)
    accepted, takes_any = _accepted_parameters(cls)
    arguments: dict[str, Any] = {}
    for field in sorted(cfg.model_fields_set):
        value = getattr(cfg, field)
        if field in _LOADER_FIELDS or value is None:
            continue
        if takes_any or field in accepted:
            arguments[field] = value
        elif field not in _APPLIED_BY_LOADER and value != DatasetConfig.model_fields[field].default:
            raise DataError(
                f"{config_path}.{field}={value!r} does not apply to dataset_name={cfg.dataset_name!r}; "
                f"{cls.__name__} accepts: {sorted(accepted)}"
            )
    for key, value in cfg.kwargs.items():
        if not (takes_any or key in accepted):
            raise DataError(
                f"{config_path}.kwargs.{key}: {cls.__name__} does not accept it; it accepts: {sorted(accepted)}"
            )
        arguments[key] = value
    if "config_path" in accepted:
        arguments["config_path"] = config_path
    dataset = cls(**arguments)
    _check_dataset_interface(dataset, cfg.dataset_name, config_path)

    # What the class does not handle itself (every built-in class), the loader does.
    if cfg.split_validation_size and not (takes_any or "split_validation_size" in accepted):
        train, validation = split_train_validation(
            dataset.formatted_ds["train"], cfg.split_validation_size, cfg.seed
        )
        dataset.formatted_ds = {**dataset.formatted_ds, "train": train, "validation": validation}
    overrides = {
        name: getattr(cfg, name)
        for name in ("prompt_file", "system_prompt_file")
        if getattr(cfg, name) is not None and not (takes_any or name in accepted)
    }
    if overrides:
        spec = dataset.task_spec
        dataset.task_spec = TaskDataSpec(
            spec.task_name,
            prompt_file=overrides.get("prompt_file", spec.prompt_file),
            system_prompt_file=overrides.get("system_prompt_file", spec.system_prompt_file),
        )
    return dataset


def _accepted_parameters(cls: type) -> tuple[set[str], bool]:
    parameters = inspect.signature(cls).parameters.values()
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters)


def _check_dataset_interface(dataset: Any, name: str | None, config_path: str) -> None:
    contract = (
        "a dataset class must set self.formatted_ds = {'train': rows, 'validation': rows or None} "
        "and self.task_spec = TaskDataSpec(task_name=...)"
    )
    formatted = getattr(dataset, "formatted_ds", None)
    if not isinstance(formatted, dict) or "train" not in formatted:
        got = "no formatted_ds attribute" if formatted is None else f"formatted_ds={type(formatted).__name__}"
        raise DataError(
            f"{config_path}.dataset_name={name!r}: {type(dataset).__name__} has {got}; {contract}"
        )
    for split, rows in formatted.items():
        if rows is not None and not (hasattr(rows, "__len__") and hasattr(rows, "__getitem__")):
            raise DataError(
                f"{config_path}.dataset_name={name!r}: formatted_ds[{split!r}] is a {type(rows).__name__}, "
                "expected rows with len() and [] (a datasets.Dataset or a list)"
            )
    if not isinstance(getattr(dataset, "task_spec", None), TaskDataSpec):
        got = type(getattr(dataset, "task_spec", None)).__name__
        raise DataError(
            f"{config_path}.dataset_name={name!r}: {type(dataset).__name__}.task_spec is {got}; {contract}"
        )
