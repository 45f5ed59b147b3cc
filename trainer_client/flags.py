"""Command-line flags derived from config dataclasses: one flag per field, its help the comment above the field.

``crest train``, ``crest demo`` and ``crest bench frontier`` take their selection flags from ``LoaderConfig`` (and
its nested ``RegionConfig``) this way, so a setting is declared, documented and validated once, in its field::

    flags = config_flags(LoaderConfig, prefix="crest-", aliases={"coreset_weights": ("--crest-weights",)})
    add_flags(parser, flags, recipes=RECIPES)
    ...
    config = with_overrides(LoaderConfig.from_recipe(args.recipe), given(args, flags))

A field's flag is ``--<prefix><field-name>`` (a nested dataclass's fields ``--<prefix><field>-<name>``): ``bool``
fields take ``--x`` / ``--no-x``, ``Literal`` fields their values as choices, ``int``/``float``/``str`` a value.
Every flag defaults to "not given" (``argparse.SUPPRESS``): what a command line gives is an override of the recipe,
and nothing else is.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Literal, get_args, get_origin, get_type_hints

__all__ = ["Flag", "add_flags", "config_flags", "field_docs", "given", "nested", "with_overrides"]

# The namespace attribute of a derived flag: its dotted field path under this prefix ("loader__region__tau").
DEST_PREFIX = "loader__"


@dataclass(frozen=True)
class Flag:
    """One derived flag: the dotted path of its field, its option strings, how its value parses, and its help."""

    path: str  # "num_subsets", "region.tau"
    names: tuple[str, ...]  # ("--num-subsets",), the derived name first, then any aliases
    kind: type  # bool, int, float or str
    choices: tuple[Any, ...] | None
    help: str

    @property
    def dest(self) -> str:
        return DEST_PREFIX + self.path.replace(".", "__")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the comment lines right above its declaration, joined} of a dataclass defined in a file."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    body = ast.parse("\n".join(lines)).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment: list[str] = []
            row = node.lineno - 2  # the line above, 0-based
            while row >= 0 and lines[row].strip().startswith("#"):
                comment.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            docs[node.target.id] = " ".join(comment)
    return docs


def config_flags(
    cls: type,
    *,
    prefix: str = "",
    aliases: Mapping[str, Iterable[str]] | None = None,
    skip: Iterable[str] = (),
    extra_help: Mapping[str, str] | None = None,
) -> list[Flag]:
    """The flags of every field of the dataclass ``cls`` (nested dataclasses flattened), in field order.

    ``aliases`` adds option strings to a field's flag ({dotted path: ("--old-name",)}); ``skip`` leaves fields
    out (dotted paths: set by the command itself); ``extra_help`` appends to a field's help. Raises ``TypeError``
    naming a field whose type has no flag (a ``list``, an optional dataclass) and ``ValueError`` for a field
    without a comment.
    """
    aliases, extra_help, skipped = aliases or {}, extra_help or {}, set(skip)
    out: list[Flag] = []

    def walk(klass: type, path: str, name_prefix: str) -> None:
        hints, docs = get_type_hints(klass), field_docs(klass)
        for f in fields(klass):
            dotted = f"{path}{f.name}"
            if dotted in skipped:
                continue
            hint = hints[f.name]
            if isinstance(hint, type) and is_dataclass(hint):
                walk(hint, f"{dotted}.", f"{name_prefix}{f.name.replace('_', '-')}-")
                continue
            if not docs.get(f.name):
                raise ValueError(f"{klass.__name__}.{f.name} has no comment above it: its flag would have no help")
            choices: tuple[Any, ...] | None = None
            if get_origin(hint) is Literal:
                choices = get_args(hint)
                kind: type = type(choices[0])
            elif hint in (bool, int, float, str):
                kind = hint
            else:
                raise TypeError(f"{klass.__name__}.{f.name}: no flag for a field of type {hint!r}")
            help_text = docs[f.name] + (f" {extra_help[dotted]}" if dotted in extra_help else "")
            names = (f"--{prefix}{name_prefix}{f.name.replace('_', '-')}", *aliases.get(dotted, ()))
            out.append(Flag(dotted, names, kind, choices, help_text))

    walk(cls, "", "")
    return out


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag], recipes: Mapping[str, Any] | None = None) -> None:
    """Add ``flags`` to ``parser``; with ``recipes`` ({name: config}), each help names the recipes' values."""
    for flag in flags:
        help_text = flag.help
        if recipes:
            values = {name: _get(config, flag.path) for name, config in recipes.items()}
            shown = ", ".join(f"{name} {_show(v)}" for name, v in values.items())
            same = len({repr(v) for v in values.values()}) == 1
            help_text += f" [every recipe: {_show(next(iter(values.values())))}]" if same else f" [{shown}]"
        common: dict[str, Any] = {
            "dest": flag.dest,
            "default": argparse.SUPPRESS,
            "help": help_text.replace("%", "%%"),
        }
        if flag.kind is bool:
            parser.add_argument(*flag.names, action=argparse.BooleanOptionalAction, **common)
        else:
            metavar = None if flag.choices else flag.path.rsplit(".", 1)[-1].upper()
            parser.add_argument(*flag.names, type=flag.kind, choices=flag.choices, metavar=metavar, **common)


def given(args: argparse.Namespace, flags: Iterable[Flag]) -> dict[str, Any]:
    """{dotted path: value} of the derived flags the command line gave."""
    return {f.path: getattr(args, f.dest) for f in flags if hasattr(args, f.dest)}


def nested(overrides: Mapping[str, Any], base: Any) -> dict[str, Any]:
    """``overrides`` ({dotted path: value}) as keyword arguments of ``replace(base, ...)``: a nested field's
    values become a replaced copy of ``base``'s nested dataclass ({"region.tau": 0.2} -> {"region": ...})."""
    top: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}
    for path, value in overrides.items():
        head, _, rest = path.partition(".")
        if rest:
            inner.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, values in inner.items():
        top[head] = with_overrides(getattr(base, head), values)
    return top


def with_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
    """``config`` with ``overrides`` ({dotted path: value}) applied (nested dataclasses replaced, not mutated)."""
    return replace(config, **nested(overrides, config)) if overrides else config


def _get(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
