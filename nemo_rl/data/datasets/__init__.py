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
validation is the train dataset's `validation` split. `data.train` or `data.validation` may be a
list of datasets: their rows are mixed (`mixture.MixedRows`), each keeping its dataset's prompt
and processor.

`max_samples` caps every split the class returns to a random choice of that many rows (under
`seed`, in their original order), before `split_validation_size` splits the train rows. A class
with no validation split of its own may declare `DEFAULT_SPLIT_VALIDATION_SIZE` (as NeMo RL's
OpenMathInstruct-2 and Tulu 3 loaders hold out 5%): it applies when the config leaves
`split_validation_size` unset and gives no `data.validation`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import random
from dataclasses import dataclass
from typing import Any

from nemo_rl.config.schema import DataConfig, DatasetConfig
from nemo_rl.data.datasets.alpaca import AlpacaDataset
from nemo_rl.data.datasets.common import select, split_train_validation
from nemo_rl.data.datasets.general_conversations import GeneralConversationsJsonlDataset
from nemo_rl.data.datasets.mixture import MixedRows, MixturePart
from nemo_rl.data.datasets.multiple_choice import MultipleChoiceDataset
from nemo_rl.data.datasets.oasst import OasstDataset
from nemo_rl.data.datasets.openai_format import OpenAIFormatDataset
from nemo_rl.data.datasets.openmathinstruct2 import OpenMathInstruct2Dataset
from nemo_rl.data.datasets.preserving import PreservingDataset
from nemo_rl.data.datasets.response_dataset import ResponseDataset
from nemo_rl.data.datasets.squad import SquadDataset
from nemo_rl.data.datasets.tulu3 import Tulu3SftMixtureDataset
from nemo_rl.data.interfaces import DataError, TaskDataSpec

DATASET_REGISTRY: dict[str, type] = {
    "squad": SquadDataset,
    "ResponseDataset": ResponseDataset,
    "openai_format": OpenAIFormatDataset,
    "alpaca": AlpacaDataset,
    "OpenMathInstruct-2": OpenMathInstruct2Dataset,
    "openmathinstruct2": OpenMathInstruct2Dataset,  # NeMo RL's older name for it
    "tulu3_sft_mixture": Tulu3SftMixtureDataset,
    "open_assistant": OasstDataset,
    "GeneralConversationsJsonlDataset": GeneralConversationsJsonlDataset,
    "multiple_choice": MultipleChoiceDataset,
}

# Fields that select or post-process a dataset rather than configure its class. The loader applies
# the first five of _APPLIED_BY_LOADER to the class's output unless the class accepts them; `split`
# picks a separate validation dataset's rows (load_datasets).
_LOADER_FIELDS = ("dataset_name", "processor", "kwargs")
_APPLIED_BY_LOADER = (
    "split_validation_size", "seed", "prompt_file", "system_prompt_file", "max_samples", "split"
)

__all__ = [
    "DATASET_REGISTRY",
    "AlpacaDataset",
    "GeneralConversationsJsonlDataset",
    "MixedRows",
    "MixturePart",
    "MultipleChoiceDataset",
    "OasstDataset",
    "OpenAIFormatDataset",
    "OpenMathInstruct2Dataset",
    "PreservingDataset",
    "ResponseDataset",
    "SFTDatasets",
    "SquadDataset",
    "Tulu3SftMixtureDataset",
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

    if isinstance(data_cfg.train, list):
        return _load_mixture(data_cfg)
    check_processor_name(data_cfg.train.processor, "data.train.processor")
    train_dataset = build_dataset(data_cfg.train, "data.train", default_split=data_cfg.validation is None)
    train_rows = train_dataset.formatted_ds["train"]
    if train_rows is None or len(train_rows) == 0:
        raise DataError(f"data.train (dataset_name={data_cfg.train.dataset_name!r}) has no training rows")
    if data_cfg.validation is None:
        validation_rows = train_dataset.formatted_ds.get("validation")
        validation_spec = train_dataset.task_spec if validation_rows is not None else None
    elif isinstance(data_cfg.validation, list):
        validation_rows = MixedRows(_validation_parts(data_cfg.validation))
        validation_spec = validation_rows.parts[0].task_spec
    else:
        check_processor_name(data_cfg.validation.processor, "data.validation.processor")
        validation_dataset = build_dataset(data_cfg.validation, "data.validation")
        validation_rows = _validation_split(validation_dataset, data_cfg.validation)
        validation_spec = validation_dataset.task_spec
    return SFTDatasets(train_rows, validation_rows, train_dataset.task_spec, validation_spec)


def _validation_split(dataset: Any, cfg: DatasetConfig) -> Any:
    """A validation dataset's `split` rows when it has that split, else its train rows."""
    key = cfg.split if cfg.split in dataset.formatted_ds else "train"
    return dataset.formatted_ds[key]


def _load_mixture(data_cfg: DataConfig) -> SFTDatasets:
    """`data.train` as a list: every dataset's train rows, mixed; validation from `data.validation`,
    else every dataset's own validation rows, mixed."""
    from nemo_rl.data.processors import check_processor_name

    train_parts, own_validation_parts = [], []
    for index, cfg in enumerate(data_cfg.train):
        config_path = f"data.train[{index}]"
        check_processor_name(cfg.processor, f"{config_path}.processor")
        dataset = build_dataset(cfg, config_path, default_split=data_cfg.validation is None)
        rows = dataset.formatted_ds["train"]
        if rows is None or len(rows) == 0:
            raise DataError(f"{config_path} (dataset_name={cfg.dataset_name!r}) has no training rows")
        train_parts.append(MixturePart(config_path, cfg.dataset_name, rows, dataset.task_spec, cfg.processor))
        validation = dataset.formatted_ds.get("validation")
        if validation is not None and len(validation) > 0:
            own_validation_parts.append(
                MixturePart(config_path, cfg.dataset_name, validation, dataset.task_spec, cfg.processor)
            )
    if data_cfg.validation is None:
        validation_parts = own_validation_parts
    elif isinstance(data_cfg.validation, list):
        validation_parts = _validation_parts(data_cfg.validation)
    else:
        validation_parts = _validation_parts([data_cfg.validation], single=True)
    train = MixedRows(train_parts)
    validation = MixedRows(validation_parts) if validation_parts else None
    return SFTDatasets(
        train,
        validation,
        train_parts[0].task_spec,
        validation_parts[0].task_spec if validation_parts else None,
    )


def _validation_parts(cfgs: list[DatasetConfig], *, single: bool = False) -> list[MixturePart]:
    from nemo_rl.data.processors import check_processor_name

    parts = []
    for index, cfg in enumerate(cfgs):
        config_path = "data.validation" if single else f"data.validation[{index}]"
        check_processor_name(cfg.processor, f"{config_path}.processor")
        dataset = build_dataset(cfg, config_path)
        rows = _validation_split(dataset, cfg)
        parts.append(MixturePart(config_path, cfg.dataset_name, rows, dataset.task_spec, cfg.processor))
    return parts


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


def build_dataset(cfg: DatasetConfig, config_path: str = "data.train", *, default_split: bool = False) -> Any:
    """Constructs the dataset class of `cfg`, checks that it exposes formatted_ds and task_spec, and
    applies `max_samples`, the split and the prompt files it does not handle itself.

    `default_split`: apply the class's DEFAULT_SPLIT_VALIDATION_SIZE when the config sets none
    (the train dataset of a run without `data.validation`)."""
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
    if cfg.max_samples is not None and not (takes_any or "max_samples" in accepted):
        dataset.formatted_ds = {
            split: None if rows is None else _at_most(rows, cfg.max_samples, cfg.seed)
            for split, rows in dataset.formatted_ds.items()
        }
    split_size = cfg.split_validation_size
    if (
        split_size is None
        and default_split
        and "split_validation_size" not in cfg.model_fields_set
        and dataset.formatted_ds.get("validation") is None
    ):
        split_size = getattr(cls, "DEFAULT_SPLIT_VALIDATION_SIZE", None)
    if split_size and not (takes_any or "split_validation_size" in accepted):
        train, validation = split_train_validation(dataset.formatted_ds["train"], split_size, cfg.seed)
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


def _at_most(rows, max_samples: int, seed: int):
    """`max_samples` rows of `rows` chosen at random under `seed`, in their original order."""
    if len(rows) <= max_samples:
        return rows
    chosen = sorted(random.Random(seed).sample(range(len(rows)), max_samples))
    return select(rows, chosen)


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
