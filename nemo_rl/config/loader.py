"""From a YAML file and command-line overrides to one validated `MasterConfig`.

The steps, in order:

1. read the file and, depth-first, the files its `defaults:` names (relative to it); merge the
   parents in order, later wins, the child last. A mapping marked `_override_: true` replaces
   the inherited one instead of merging into it.
2. apply the overrides (`a.b=c`, `++a.b=c`, `+a.b=c`, `~a.b`) to the merged tree.
3. resolve `${...}` interpolations, including the arithmetic resolvers mul, add, sub, div, max, min.
4. merge `data.default` under `data.train` and `data.validation` (their own keys win).
5. validate into `MasterConfig`; every problem becomes one line of a `ConfigError`.
"""

from __future__ import annotations

import copy
import functools
import operator
import re
from collections.abc import Callable, Sequence
from functools import reduce
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from nemo_rl.config.errors import (
    ConfigError,
    Loc,
    dotted,
    field_names_at,
    unknown_key_message,
    validation_messages,
)
from nemo_rl.config.overrides import apply_overrides
from nemo_rl.config.schema import DatasetConfig, MasterConfig

RootConfig = TypeVar("RootConfig", bound=BaseModel)

OVERRIDE_MARKER = "_override_"
DEFAULTS_KEY = "defaults"

# ---------------------------------------------------------------- YAML reading


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-5 as a float (YAML 1.1 wants 1.0e-5) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as a dict; ConfigError with the file (and line) for anything wrong."""
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {where}: {path} (working directory: {Path.cwd()})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown line"
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise ConfigError(f"{kind} in {path} at {where}: {problem}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error in {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (sft:, policy:, ...), "
            f"got {type(data).__name__}"
        )
    return data


# ---------------------------------------------------------------- defaults: inheritance


def _parents_of(path: Path, data: dict[str, Any]) -> list[Path]:
    entries = data.pop(DEFAULTS_KEY, None)
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(
            f"{path}: '{DEFAULTS_KEY}' must be a path or a list of paths to YAML files "
            f"(relative to this file), got {entries!r}"
        )
    parents = []
    for entry in entries:
        parent = (path.parent / entry).resolve()
        if not parent.is_file():
            raise ConfigError(
                f"{path}: defaults entry '{entry}' not found (looked for {parent}); "
                "paths in 'defaults' are relative to the file that names them"
            )
        parents.append(parent)
    return parents


def _merge(base: dict[str, Any], over: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`over` merged into a copy of `base`: mappings merge key by key, anything else replaces.

    A mapping in `over` marked `_override_: true` replaces the inherited mapping whole.
    """
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict):
            replace = value.get(OVERRIDE_MARKER, False)
            if replace is not True and replace is not False:
                where = f"{prefix}{key}.{OVERRIDE_MARKER}"
                raise ConfigError(f"{where}: expected true or false, got {replace!r}")
            if not replace and isinstance(merged.get(key), dict):
                merged[key] = _merge(merged[key], value, f"{prefix}{key}.")
                continue
        merged[key] = copy.deepcopy(value)
    return merged


def _strip_markers(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_markers(v) for k, v in node.items() if k != OVERRIDE_MARKER}
    if isinstance(node, list):
        return [_strip_markers(v) for v in node]
    return node


def _read_with_parents(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path) :], path))
        raise ConfigError(f"'defaults' form a cycle: {cycle}")
    data = read_yaml(path)
    merged: dict[str, Any] = {}
    for parent in _parents_of(path, data):
        merged = _merge(merged, _read_with_parents(parent, (*chain, path)))
    if data.get(OVERRIDE_MARKER) is True:  # the whole file replaces what it inherits
        return data
    return _merge(merged, data)


def read_with_inheritance(path: str | Path) -> dict[str, Any]:
    """The file merged over its `defaults:` chain, with `_override_` markers applied and removed."""
    path = Path(path)
    if not path.is_file():
        read_yaml(path)  # raises the not-found error with the path as the user gave it
    return _strip_markers(_read_with_parents(path.resolve(), ()))


# ---------------------------------------------------------------- resolvers


def _number(resolver: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"${{{resolver}:...}} expects numbers, got {value!r}")
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"${{{resolver}:...}} expects numbers, got {value!r}") from None
    return value


def _numbers(resolver: str, args: tuple[Any, ...], count: int | None = None) -> list[int | float]:
    if count is not None and len(args) != count:
        raise ValueError(f"${{{resolver}:...}} takes exactly {count} arguments, got {len(args)}")
    if not args:
        raise ValueError(f"${{{resolver}:...}} needs at least one argument")
    return [_number(resolver, a) for a in args]


def _mul(*args: Any) -> int | float:
    return reduce(operator.mul, _numbers("mul", args))


def _add(*args: Any) -> int | float:
    return sum(_numbers("add", args))


def _sub(*args: Any) -> int | float:
    a, b = _numbers("sub", args, count=2)
    return a - b


def _div(*args: Any) -> int | float:
    """True division; an int when both are ints and the division is exact (${div:8,2} = 4)."""
    a, b = _numbers("div", args, count=2)
    if b == 0:
        raise ValueError(f"${{div:{a},{b}}}: division by zero")
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b
    return a / b


def _max(*args: Any) -> int | float:
    return max(_numbers("max", args))


def _min(*args: Any) -> int | float:
    return min(_numbers("min", args))


RESOLVERS: dict[str, Callable[..., int | float]] = {
    "mul": _mul,
    "add": _add,
    "sub": _sub,
    "div": _div,
    "max": _max,
    "min": _min,
}


def register_resolvers() -> None:
    """Register the arithmetic resolvers with OmegaConf; a no-op once done (or when taken)."""
    for name, function in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


# ---------------------------------------------------------------- resolving


_WRAPPED = re.compile(r"^\w+ raised while resolving interpolation: ")


def _resolution_problems(cfg: DictConfig) -> dict[Loc, str]:
    """Every `???` left unset and every interpolation that does not resolve, by key path.

    The failing values are set to null in `cfg` so that the rest can still be resolved and
    validated (their own validation errors are then ignored).
    """
    problems: dict[Loc, str] = {}
    failed: list[tuple[DictConfig | ListConfig, Any]] = []

    def visit(node: DictConfig | ListConfig, prefix: tuple[Any, ...]) -> None:
        keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
        for key in keys:
            loc = (*prefix, key)
            path = dotted(loc)
            if OmegaConf.is_missing(node, key):
                problems[loc] = (
                    f"{path}: missing required value (the config says '???'; set it, e.g. {path}=...)"
                )
                failed.append((node, key))
                continue
            raw = node._get_node(key)._value()  # type: ignore[union-attr]
            try:
                value = node[key]
            except InterpolationToMissingValueError:
                problems[loc] = ""  # reported at the '???' itself
                failed.append((node, key))
                continue
            except OmegaConfBaseException as exc:
                reason = _WRAPPED.sub("", str(exc).strip().splitlines()[0])
                problems[loc] = f"{path}: cannot resolve {raw!r}: {reason}"
                failed.append((node, key))
                continue
            if isinstance(value, (DictConfig, ListConfig)) and not OmegaConf.is_interpolation(node, key):
                visit(value, (*prefix, key))

    visit(cfg, ())
    for node, key in failed:  # only now: a null would hide the errors of those that refer to it
        node[key] = None
    return problems


# ---------------------------------------------------------------- data.default


def _merge_data_defaults(data: dict[str, Any]) -> tuple[list[str], dict[Loc, str]]:
    """Merge `data.default` under `data.train` and `data.validation` in place.

    Returns (problems, notes): unknown keys in data.default, and for each key a split took from
    data.default a note that validation messages append.
    """
    section = data.get("data")
    if not isinstance(section, dict):
        return [], {}
    default = section.get("default")
    if default is None or not isinstance(default, dict):
        return [], {}  # validation reports a non-mapping
    known = DatasetConfig.model_fields
    problems = [
        f"data.default.{key}: {unknown_key_message(key, known)}" for key in default if key not in known
    ]
    usable = {k: v for k, v in default.items() if k in known}
    notes: dict[Loc, str] = {}
    for split in ("train", "validation"):
        own = section.get(split)
        if own is None and split == "validation":
            continue
        if own is None:
            own = {}
        if isinstance(own, list):  # a mixture: the defaults go under each of its datasets
            for index, entry in enumerate(own):
                if isinstance(entry, dict):
                    own[index] = _with_defaults(entry, usable, ("data", split, index), notes)
            continue
        if not isinstance(own, dict):
            continue  # validation reports it
        section[split] = _with_defaults(own, usable, ("data", split), notes)
    return problems, notes


def _with_defaults(own: dict[str, Any], usable: dict[str, Any], loc: Loc, notes: dict[Loc, str]) -> dict[str, Any]:
    for key in usable:
        if key not in own:
            notes[(*loc, key)] = "inherited from data.default"
    return {**copy.deepcopy(usable), **own}


# ---------------------------------------------------------------- the public functions


def schema_keys(path: Sequence[str]) -> set[str]:
    """The keys MasterConfig defines under `path`; data.default takes a dataset's keys."""
    if tuple(path) == ("data", "default"):
        return set(DatasetConfig.model_fields)
    return field_names_at(MasterConfig, path)


def _source(path: str | Path, overrides: Sequence[str]) -> str:
    if not overrides:
        return str(path)
    return f"{path} with overrides {' '.join(overrides)}"


def _compose(
    path: str | Path, overrides: Sequence[str], root: type[BaseModel] = MasterConfig
) -> tuple[dict[str, Any], dict[Loc, str], list[str], dict[Loc, str]]:
    if isinstance(overrides, str):
        overrides = [overrides]
    overrides = list(overrides)
    register_resolvers()
    merged = read_with_inheritance(path)
    try:
        cfg = OmegaConf.create(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).strip().splitlines()[0]}") from None
    keys_at = schema_keys if root is MasterConfig else functools.partial(field_names_at, root)
    problems = apply_overrides(cfg, overrides, keys_at)
    if problems:
        raise ConfigError(problems, source=str(path))
    unresolved = _resolution_problems(cfg)
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    problems, notes = _merge_data_defaults(data)
    return data, unresolved, problems, notes


def compose_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The composed, interpolation-resolved config as a plain dict, not validated.

    Inheritance, overrides, interpolation and the `data.default` merge are applied; raises
    ConfigError for a missing file, bad YAML, a bad override or an unresolvable interpolation.
    """
    data, unresolved, _, _ = _compose(path, overrides)
    if unresolved:
        raise ConfigError([m for m in unresolved.values() if m], source=_source(path, overrides))
    return data


def load_config(path: str | Path, overrides: Sequence[str] = (), *, root: type[RootConfig] = MasterConfig) -> RootConfig:
    """Compose, resolve and validate a config; raises ConfigError listing every problem found.

    `root` is the schema of the whole file: MasterConfig for training, EvalMasterConfig
    (`nemo_rl.config.eval_schema`) for evaluation."""
    data, unresolved, default_problems, notes = _compose(path, overrides, root)
    problems = [m for m in unresolved.values() if m] + default_problems
    try:
        cfg = root.model_validate(data)
    except ValidationError as exc:
        problems += validation_messages(exc, root, notes, ignore=set(unresolved))
        cfg = None
    if problems:
        raise ConfigError(problems, source=_source(path, overrides))
    assert cfg is not None
    return cfg


def _escape_interpolations(node: Any) -> Any:
    """Strings that look like `${...}` are data here: escape them so a reload keeps them verbatim."""
    if isinstance(node, dict):
        return {k: _escape_interpolations(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_interpolations(v) for v in node]
    if isinstance(node, str) and "${" in node:
        return node.replace("${", "\\${")
    return node


def config_to_yaml(cfg: BaseModel) -> str:
    """The validated config as YAML: what `show` prints and checkpoints store as config.yaml.

    `load_config` on this text gives a config equal to `cfg`.
    """
    data = _escape_interpolations(cfg.model_dump())
    return yaml.dump(data, Dumper=_YamlDumper, sort_keys=False, allow_unicode=True, width=100)


class _YamlDumper(yaml.SafeDumper):
    """Multi-line strings (chat templates) as literal blocks; lists inside mappings indented."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value and not any(line != line.rstrip() for line in value.split("\n")):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_YamlDumper.add_representer(str, _represent_str)
