"""`ConfigError` and the translation of pydantic's errors into messages for people.

Every message names the full dotted key path and what was expected:

    policy.optimizer.kwarg: unknown key (did you mean 'kwargs'?)
    policy.train_micro_batch_size: expected an integer, got 'abc'
    sft.max_num_steps: must be >= 1, got 0
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]


class ConfigError(ValueError):
    """A user error in a config file or an override; its message is complete on its own.

    `errors` holds the individual problems (one line each); `str(error)` lists them all.
    """

    def __init__(self, errors: str | Sequence[str], *, source: str | None = None):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.errors) == 1:
            return f"{self.source}: {self.errors[0]}" if self.source else self.errors[0]
        where = f" in {self.source}" if self.source else ""
        lines = [f"{len(self.errors)} errors{where}:"]
        lines += [f"  - {_indent(error)}" for error in self.errors]
        return "\n".join(lines)


def _indent(text: str) -> str:
    return text.replace("\n", "\n    ")


def dotted(loc: Iterable[str | int]) -> str:
    """('policy', 'scheduler', 0, 'name') -> 'policy.scheduler.0.name'"""
    return ".".join(str(part) for part in loc)


def closest(name: str, candidates: Iterable[Any]) -> str | None:
    """The candidate closest to `name` (difflib), or None when nothing is close."""
    names = [str(c) for c in candidates]
    matches = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
    if not matches:  # a case slip ('Kwargs') or a prefix ('lr' for 'lr_decay') still deserves a hint
        lowered = {n.lower(): n for n in names}
        matches = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
        matches = [lowered[m] for m in matches]
    return matches[0] if matches else None


def unknown_key_message(key: str | int, valid: Iterable[Any]) -> str:
    """'unknown key (did you mean 'kwargs'?)' or, when nothing is close, the valid names."""
    valid = sorted(str(v) for v in valid)
    suggestion = closest(str(key), valid)
    if suggestion is not None:
        return f"unknown key (did you mean '{suggestion}'?)"
    if not valid:
        return "unknown key (this section takes no keys)"
    return f"unknown key; valid keys here: {', '.join(valid)}"


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- walking the schema along a loc


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> list[Any] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return None


def _non_none(members: list[Any]) -> list[Any]:
    return [m for m in members if m is not type(None)]


def _tag_of(member: Any) -> str | None:
    """The discriminator Tag a union member carries, if any."""
    if typing.get_origin(member) is typing.Annotated:
        for meta in typing.get_args(member)[1:]:
            tag = getattr(meta, "tag", None)
            if isinstance(tag, str):
                return tag
    return None


def _member_for_tag(members: list[Any], tag: str) -> Any | None:
    """The union member pydantic names `tag` in a loc (a Tag, a class name or 'list[...]')."""
    for member in members:
        if _tag_of(member) == tag:
            return member
    for member in members:
        inner = _strip_annotated(member)
        origin = typing.get_origin(inner)
        if isinstance(inner, type) and inner.__name__ == tag:
            return member
        if origin is not None and tag.startswith(f"{getattr(origin, '__name__', origin)}["):
            return member
    return None


class _Step(typing.NamedTuple):
    clean_loc: Loc  # the loc without union tags: the user's key path
    union_sites: tuple[tuple[Loc, str], ...]  # (clean loc of the union, chosen member tag)
    parent: Any  # the type that holds the last key (a model class for unknown keys)
    leaf: Any  # the type at the end of the loc, or None when unknown


def _walk(root: type[BaseModel], loc: Loc) -> _Step:
    tp: Any = root
    parent: Any = None
    site_type: Any = None
    clean: list[str | int] = []
    sites: list[tuple[Loc, str]] = []
    parts = list(loc)
    i = 0
    while i < len(parts):
        tp = _strip_annotated(tp)
        members = _union_members(tp)
        if members is not None:
            real = _non_none(members)
            if len(real) == 1:
                tp = real[0]
                continue
            part = parts[i]
            member = _member_for_tag(real, str(part)) if isinstance(part, str) else None
            if member is None:  # not a tag we know: stop interpreting, keep the rest verbatim
                clean += parts[i:]
                return _Step(tuple(clean), tuple(sites), None, None)
            sites.append((tuple(clean), str(part)))
            site_type = tp
            tp = member
            i += 1
            if i == len(parts):  # the error is about the union as a whole (e.g. a wrong type)
                return _Step(tuple(clean), tuple(sites), parent, site_type)
            continue
        part = parts[i]
        parent = tp
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = schema_field(tp, str(part))
            tp = field.annotation if field is not None else None
        elif typing.get_origin(tp) in (list, tuple, Sequence):
            args = typing.get_args(tp)
            tp = args[0] if args else None
        elif typing.get_origin(tp) is dict:
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else None
        else:
            tp = None
        clean.append(part)
        i += 1
    return _Step(tuple(clean), tuple(sites), parent, _strip_annotated(tp) if tp is not None else None)


def _expand(tp: Any) -> list[Any]:
    """`tp` without Annotated, a union split into its members (None left out)."""
    tp = _strip_annotated(tp)
    members = _union_members(tp)
    if members is None:
        return [tp]
    return [t for member in _non_none(members) for t in _expand(member)]


def field_names_at(root: type[BaseModel], path: Sequence[str]) -> set[str]:
    """The keys the schema defines under the dotted `path` (empty where any or no key goes).

    ('policy', 'optimizer') -> {'name', 'kwargs'}; a union offers the keys of all its members.
    """
    current: list[Any] = [root]
    for part in path:
        following: list[Any] = []
        for tp in (t for candidate in current for t in _expand(candidate)):
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                field = schema_field(tp, part)
                if field is not None:
                    following.append(field.annotation)
            elif typing.get_origin(tp) in (list, tuple, Sequence) and part.isdigit():
                args = typing.get_args(tp)
                if args:
                    following.append(args[0])
        current = following
    names: set[str] = set()
    for tp in (t for candidate in current for t in _expand(candidate)):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            names.update(schema_keys_of(tp))
    return names


def schema_keys_of(model: type[BaseModel]) -> set[str]:
    """The YAML keys of `model`: a field's alias where it has one (`_v2`), else its name."""
    return {field.alias or name for name, field in model.model_fields.items()}


def schema_field(model: type[BaseModel], key: str) -> Any:
    """The field of `model` that YAML key `key` sets (by alias or by name), or None."""
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


# ---------------------------------------------------------------- describing expectations


_EXPECTED_BY_ERROR = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "str": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
    "list": "a list",
    "tuple": "a list",
}


def describe_type(tp: Any) -> str:
    """A phrase for what a value of type `tp` looks like: 'an integer', 'a mapping', ..."""
    tp = _strip_annotated(tp)
    if tp is None or tp is Any:
        return "a value"
    members = _union_members(tp)
    if members is not None:
        parts = [describe_type(m) for m in _non_none(members)]
        if type(None) in members:
            parts.append("null")
        unique = list(dict.fromkeys(parts))
        return unique[0] if len(unique) == 1 else ", ".join(unique[:-1]) + " or " + unique[-1]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping"
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        return f"a list of {_plural(args[0])}" if args and args[0] is not Any else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    text = describe_type(tp)
    for article in ("an ", "a "):
        if text.startswith(article):
            word = text[len(article) :]
            return {
                "integer": "integers",
                "number": "numbers",
                "string": "strings",
                "mapping": "mappings",
            }.get(word, word)
    return text


def _expected_from_error(error: dict[str, Any], leaf: Any) -> str:
    if leaf is not None and leaf is not Any:
        return describe_type(leaf)
    if error["type"] == "literal_error":
        return f"one of {error.get('ctx', {}).get('expected', '?')}"
    prefix = (
        "model_attributes" if error["type"].startswith("model_attributes") else error["type"].split("_")[0]
    )
    return _EXPECTED_BY_ERROR.get(prefix, "a different value")


_RANGE = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_RANGE_CTX = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _describe_error(error: dict[str, Any], step: _Step) -> str:
    kind = error["type"]
    given = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        valid: list[str] = []
        if isinstance(step.parent, type) and issubclass(step.parent, BaseModel):
            valid = [field.alias or name for name, field in step.parent.model_fields.items()]
        return unknown_key_message(step.clean_loc[-1] if step.clean_loc else "?", valid)
    if kind == "missing":
        expected = describe_type(step.leaf) if step.leaf is not None else "a value"
        return f"missing required value (expected {expected})"
    if kind in _RANGE:
        bound = ctx.get(_RANGE_CTX[kind])
        return f"must be {_RANGE[kind]} {bound}, got {short_repr(given)}"
    if kind in ("too_short", "too_long"):
        return f"{error['msg'].lower()}, got {short_repr(given)}"
    if kind == "literal_error":
        expected = _expected_from_error(error, step.leaf)
        options = typing.get_args(step.leaf) if typing.get_origin(step.leaf) is Literal else ()
        hint = closest(str(given), [str(o) for o in options]) if options else None
        suffix = f" (did you mean '{hint}'?)" if hint is not None else ""
        return f"expected {expected}, got {short_repr(given)}{suffix}"
    if kind in ("value_error", "assertion_error"):
        message = error["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        return message
    if kind.endswith(("_type", "_parsing", "_from_float", "_fraction")) or kind in (
        "model_attributes_type",
        "union_tag_invalid",
        "union_tag_not_found",
    ):
        return f"expected {_expected_from_error(error, step.leaf)}, got {short_repr(given)}"
    return f"{error['msg']} (got {short_repr(given)})"


# ---------------------------------------------------------------- pydantic -> messages


Entry = tuple[dict[str, Any], _Step]


def _branch_score(entries: list[Entry], site: Loc, indices: list[int]) -> tuple[int, int]:
    """Lower is better: (rejected the input's type outright, number of errors)."""
    type_mismatch = any(
        entries[i][1].clean_loc == site and entries[i][0]["type"] != "value_error" for i in indices
    )
    return (int(type_mismatch), len(indices))


def _pick_union_branches(entries: list[Entry]) -> list[Entry]:
    """For each union that failed on every member, keep only the most useful member's errors.

    A member whose top-level type matched the input (it got as far as looking at the keys) beats
    one that rejected the input's type outright; among those, the one with fewest errors wins.
    """
    while True:
        by_site: dict[Loc, dict[str, list[int]]] = {}
        for index, (_, step) in enumerate(entries):
            for site_loc, tag in step.union_sites:
                by_site.setdefault(site_loc, {}).setdefault(tag, []).append(index)
        contested = [(site, tags) for site, tags in by_site.items() if len(tags) > 1]
        if not contested:
            return entries
        site, tags = min(contested, key=lambda item: len(item[0]))  # outermost first
        best = min(tags, key=lambda tag: _branch_score(entries, site, tags[tag]))
        drop = {i for tag, indices in tags.items() if tag != best for i in indices}
        entries = [entry for i, entry in enumerate(entries) if i not in drop]


def validation_messages(
    exc: ValidationError,
    root: type[BaseModel],
    notes: dict[Loc, str] | None = None,
    ignore: set[Loc] | None = None,
) -> list[str]:
    """One line per problem: '<dotted.key.path>: <what was wrong and what was expected>'.

    `notes` maps a key path to a remark appended to its errors (e.g. where the value came from);
    errors at a key path in `ignore` (already reported otherwise) are left out.
    """
    entries = [(error, _walk(root, tuple(error["loc"]))) for error in exc.errors()]
    entries = [(e, step) for e, step in entries if step.clean_loc not in (ignore or set())]
    entries = _pick_union_branches(entries)
    messages: list[str] = []
    for error, step in entries:
        text = _describe_error(error, step)
        path = dotted(step.clean_loc)
        note = (notes or {}).get(step.clean_loc)
        if note:
            text = f"{text} ({note})"
        mentions_path = error["type"] == "value_error" and (text.startswith(path) or f" {path}." in text)
        line = f"{path}: {text}" if path and not mentions_path else text
        if line not in messages:
            messages.append(line)
    return messages
