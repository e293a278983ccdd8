"""Command-line overrides in Hydra's grammar, applied to an OmegaConf tree.

    a.b=c        set an existing key (an error names the closest existing key when it is missing)
    ++a.b=c      add or set
    +a.b=c       add (an error when the key already exists)
    ~a.b         delete (`~a.b=c` deletes only when the current value is c)

Values follow Hydra's grammar: `x=[1,2]`, `x=null`, `x="a string"`, `x=1e-5`, `x={a: 1}`.
As in NeMo RL, `a.b=c` also accepts any string for c that the grammar would reject or read as a
sweep (`x=a,b` sets the string 'a,b'). Hydra parses; we apply, so that a key whose parent is null
(`data.validation.data_path=...` when `data.validation: null`) becomes a mapping on the way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_rl.config.errors import closest, dotted

_KEY = re.compile(r"^[A-Za-z0-9_$\-]+(\.[A-Za-z0-9_$\-]+)*$")
_UNSET = object()

# The keys a schema defines under a key path: `a.b=c` may set such a key although the YAML
# leaves it out (its default then applies).
KnownKeys = Callable[[Sequence[str]], Collection[str]]


def _no_known_keys(path: Sequence[str]) -> Collection[str]:
    return ()


class OverrideError(ValueError):
    """A problem with one override; the loader gathers these into a ConfigError."""


class Kind(Enum):
    SET = "="  # a.b=c
    FORCE_ADD = "++"  # ++a.b=c
    ADD = "+"  # +a.b=c
    DELETE = "~"  # ~a.b


@dataclass(frozen=True)
class Override:
    kind: Kind
    key: str
    value: Any = None  # for DELETE: the value the key must hold, or _UNSET
    text: str = ""

    @property
    def path(self) -> list[str]:
        return self.key.split(".")


@cache
def _hydra_parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse_override(text: str) -> Override:
    """Parse one override with Hydra's grammar, falling back to NeMo RL's `key=any string`."""
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        parsed = _hydra_parser().parse_override(text)
    except HydraException as exc:
        return _parse_bare(text, hydra_message=str(exc).strip().splitlines()[0])
    key = parsed.key_or_group
    if parsed.package is not None or "/" in key:
        raise OverrideError(
            f"override '{text}': config groups and packages ('/', '@') are not supported; "
            "name a key with dots, e.g. policy.optimizer.kwargs.lr=1e-5"
        )
    if not _KEY.match(key):
        raise OverrideError(f"override '{text}': '{key}' is not a dotted key path like policy.model_name")
    kind = {
        OverrideType.CHANGE: Kind.SET,
        OverrideType.FORCE_ADD: Kind.FORCE_ADD,
        OverrideType.ADD: Kind.ADD,
        OverrideType.DEL: Kind.DELETE,
    }[parsed.type]
    if kind is Kind.DELETE:
        value = _UNSET if "=" not in text else parsed.value()
        if parsed.is_sweep_override():
            value = _raw_value(text)
        return Override(kind, key, value, text)
    value = _raw_value(text) if parsed.is_sweep_override() else parsed.value()
    return Override(kind, key, value, text)


def _raw_value(text: str) -> str:
    return text.split("=", 1)[1].strip()


def _parse_bare(text: str, hydra_message: str) -> Override:
    """NeMo RL's form: everything after the first '=' is the string value."""
    body = text
    kind = Kind.SET
    for prefix, prefix_kind in (("++", Kind.FORCE_ADD), ("+", Kind.ADD), ("~", Kind.DELETE)):
        if body.startswith(prefix):
            kind, body = prefix_kind, body[len(prefix) :]
            break
    if "=" not in body:
        if kind is Kind.DELETE and _KEY.match(body.strip()):
            return Override(kind, body.strip(), _UNSET, text)
        raise OverrideError(
            f"override '{text}': expected key=value (or ~key to delete); Hydra says: {hydra_message}"
        )
    key, value = body.split("=", 1)
    key, value = key.strip(), value.strip()
    if not _KEY.match(key):
        raise OverrideError(f"override '{text}': '{key}' is not a dotted key path like policy.model_name")
    if value[:1] in ("[", "{", "'", '"'):  # meant as a structured or quoted value: say what is wrong
        raise OverrideError(f"override '{text}': cannot parse the value {value}: {hydra_message}")
    return Override(kind, key, value, text)


# ---------------------------------------------------------------- applying to the tree


def _children(node: Any) -> list[str]:
    if isinstance(node, DictConfig):
        return [str(k) for k in node]
    if isinstance(node, ListConfig):
        return [str(i) for i in range(len(node))]
    return []


def _has(node: Any, part: str) -> bool:
    if isinstance(node, DictConfig):
        return part in node
    if isinstance(node, ListConfig):
        return part.isdigit() and int(part) < len(node)
    return False


def _index(node: Any, part: str) -> Any:
    return int(part) if isinstance(node, ListConfig) else part


def _child(node: Any, part: str) -> Any:
    """The child node (not its resolved value: interpolations stay untouched)."""
    return node._get_node(_index(node, part))


def _is_null(node: Any, part: str) -> bool:
    child = _child(node, part)
    return child is not None and not OmegaConf.is_interpolation(node, _index(node, part)) and child._is_none()


def _missing_key_error(override: Override, upto: int, node: Any, known: Collection[str]) -> OverrideError:
    path = override.path
    missing = dotted(path[: upto + 1])
    prefix = dotted(path[:upto])
    candidates = list(dict.fromkeys([*_children(node), *sorted(known)]))
    suggestion = closest(path[upto], candidates)
    if suggestion is not None:
        hint = f"did you mean '{dotted([*path[:upto], suggestion])}'?"
    elif candidates:
        hint = f"keys under {prefix or 'the top level'}: {', '.join(candidates)}"
    else:
        hint = f"{prefix or 'the top level'} has no keys"
    # in a free-form mapping (optimizer kwargs) a new key may be meant; in a schema section not
    addable = override.kind is Kind.SET and isinstance(node, DictConfig) and not known
    add = f"; use '++{override.text}' to add it" if addable else ""
    return OverrideError(f"override '{override.text}': key '{missing}' does not exist ({hint}){add}")


def apply_override(
    cfg: DictConfig,
    override: Override,
    opened: set[str] | None = None,
    known_keys: KnownKeys = _no_known_keys,
) -> None:
    """Apply one parsed override to `cfg` in place; raises OverrideError.

    `a.b=c` sets a key the tree has, or one `known_keys(path)` names (the schema's keys).
    `opened` collects the key paths of mappings made from null, where any key goes (the schema
    checks them later); pass the same set to each call of one composition.
    """
    opened = set() if opened is None else opened
    path = override.path
    create = override.kind in (Kind.FORCE_ADD, Kind.ADD)
    node: Any = cfg
    for depth, part in enumerate(path[:-1]):
        if not _has(node, part):
            allowed = create or (
                override.kind is Kind.SET
                and isinstance(node, DictConfig)
                and part in known_keys(path[:depth])
            )
            if not allowed:
                raise _missing_key_error(override, depth, node, known_keys(path[:depth]))
            if not isinstance(node, DictConfig):
                raise OverrideError(
                    f"override '{override.text}': {dotted(path[:depth]) or 'the top level'} is a list; "
                    f"'{part}' is not an index in it"
                )
            node[part] = {}
        elif _is_null(node, part) and override.kind is not Kind.DELETE:
            node[_index(node, part)] = {}  # `data.validation: null` becomes a mapping
            opened.add(dotted(path[: depth + 1]))
        child = _child(node, part)
        if not isinstance(child, (DictConfig, ListConfig)):
            where = dotted(path[: depth + 1])
            raise OverrideError(
                f"override '{override.text}': {where} holds {child._value()!r}, not a mapping, "
                f"so it has no key '{path[depth + 1]}'"
            )
        node = child
    last = path[-1]
    exists = _has(node, last)
    key = _index(node, last)
    if override.kind is Kind.SET and not exists:
        known = known_keys(path[:-1])
        if not (isinstance(node, DictConfig) and (dotted(path[:-1]) in opened or last in known)):
            raise _missing_key_error(override, len(path) - 1, node, known)
    if override.kind is Kind.ADD and exists:
        raise OverrideError(
            f"override '{override.text}': key '{override.key}' already exists; "
            f"use '{override.key}=...' or '++{override.text[1:]}' to change it"
        )
    if override.kind is Kind.DELETE:
        if not exists:
            raise _missing_key_error(override, len(path) - 1, node, ())
        if override.value is not _UNSET:
            current = OmegaConf.to_container(node, resolve=False)[key]  # type: ignore[index]
            if current != override.value:
                raise OverrideError(
                    f"override '{override.text}': key '{override.key}' holds {current!r}, "
                    f"not {override.value!r}; nothing deleted"
                )
        del node[key]
        return
    if isinstance(node, ListConfig) and not exists:
        raise OverrideError(
            f"override '{override.text}': index {last} is out of range for "
            f"{dotted(path[:-1])} (length {len(node)})"
        )
    node[key] = override.value


def apply_overrides(
    cfg: DictConfig, overrides: Sequence[str], known_keys: KnownKeys = _no_known_keys
) -> list[str]:
    """Apply all overrides in order; returns one message per failed override (empty: all applied)."""
    problems: list[str] = []
    opened: set[str] = set()
    for text in overrides:
        try:
            apply_override(cfg, parse_override(text), opened, known_keys)
        except OverrideError as exc:
            problems.append(str(exc))
    return problems
