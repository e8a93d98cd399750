"""Frozen, keyword-only configuration dataclasses and the CLI generated from them.

One dataclass per concern. Each field carries its help text in ``metadata``, so the
help is written once and the argparse flags, the config file keys and the error messages
all come from the same place:

    @dataclass(frozen=True, kw_only=True)
    class Opts:
        lr: float = option(1e-3, "peak learning rate")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Opts)               # --lr FLOAT
    opts = from_args(Opts, parser.parse_args(argv), file_values=load_file("run.toml"))

A command's config *composes* concerns (``Composite``): its fields are concern dataclasses,
and every concern's fields become flat flags and flat config-file keys (``--lr``, ``lr =``),
so flags, files and ``config.json`` read the same whichever concern a field belongs to.

Precedence: dataclass default < config file < command line. Every error is a ValueError
that names the field, the bad value and how to fix it.

Why not tyro, draccus or jsonargparse: each generates flags from nested dataclasses too,
but as nested names (``--optim.lr``; tyro can omit the prefixes) with its own messages for a
bad value, while gspo's flags, TOML/JSON files and runs' ``config.json`` are flat and every
error names the flag, the value and the fix (``--steps 'many' is not an int; give e.g.
--steps 8``, tested). Config files and ``config.json`` would stay ours either way, so a
library would replace only the ~100 lines that walk the fields into argparse, for a new
dependency and different errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# ---------------------------------------------------------------- generic machinery


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with its CLI help (and optional allowed values, metavar) attached.
    ``choices`` may be a function returning them, read when a parser is built or a value
    checked: a registry that grows at run time (tasks, engines) then lists every entry."""
    meta = {"help": help, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _field_kind(hint: Any) -> tuple[type, bool, tuple | None, bool]:
    """(base type, optional?, literal choices, a list?) for the hints this module supports:
    int, float, str, bool, Literal[...], X | None, and tuple[X, ...] (a list of values)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported tuple type {hint!r}; use tuple[X, ...]")
        base, optional, choices, _ = _field_kind(args[0])
        return base, optional, choices, True
    optional = False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"unsupported union type {hint!r}")
        hint, origin = args[0], typing.get_origin(args[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices, False
    if hint not in (int, float, str, bool):
        raise TypeError(f"unsupported field type {hint!r}")
    return hint, optional, None, False


@dataclass(frozen=True)
class Flag:
    """One flat option: ``name`` is the flag (``--name``) and the config-file key; ``owner``
    the composite's field (the concern) that holds it, None for a plain dataclass's own."""

    name: str
    owner: str | None
    field: dataclasses.Field
    base: type
    optional: bool
    choices: tuple | None
    many: bool
    default: Any


def _concerns(cls: type) -> dict[str, type]:
    """{field name: concern dataclass} of a composite (empty for a plain dataclass)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[f.name])}  # fmt: skip


def flags(cls: type) -> list[Flag]:
    """Every flat option of ``cls``: a plain dataclass's fields, or a composite's concerns'
    fields (with the composite's defaults) followed by its own."""
    hints, concerns, out = typing.get_type_hints(cls), _concerns(cls), []
    for f in dataclasses.fields(cls):
        if f.name in concerns:
            default = f.default_factory()
            out += [dataclasses.replace(flag, owner=f.name, default=getattr(default, flag.name))
                    for flag in flags(concerns[f.name])]  # fmt: skip
            continue
        base, optional, choices, many = _field_kind(hints[f.name])
        given = f.metadata.get("choices")
        choices = (given() if callable(given) else given) or choices
        out.append(Flag(f.name, None, f, base, optional, tuple(choices) if choices else None,
                        many, f.default))  # fmt: skip
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type,
                  aliases: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """Add one flag per flat option of ``cls`` (a composite's in a group per concern). Unset
    flags stay absent from the namespace (default=SUPPRESS) so a config file value is not
    overwritten by a default. ``aliases``: {other flag name: option name}, a second
    spelling of a flag (``--engine`` for ``--rollout``).

    A list field (tuple[X, ...]) takes one or more values, and the flag may repeat:
    ``--reward a:f --reward b:g`` and ``--reward a:f b:g`` both give ("a:f", "b:g")."""
    spelled = {}
    for other, name in (aliases or {}).items():
        spelled.setdefault(name, []).append(flag_name(other))
    groups = {}
    for flag in flags(cls):
        if flag.owner not in groups:
            title = None if flag.owner is None else f"{flag.owner} options"
            groups[flag.owner] = parser if title is None else parser.add_argument_group(title)
        _add_flag(groups[flag.owner], flag, spelled.get(flag.name, []))


def _add_flag(parser, flag: Flag, more: list[str]) -> None:
    help_ = flag.field.metadata.get("help", "")
    shown = "none" if flag.default is None else flag.default
    if flag.many:
        shown = " ".join(map(str, flag.default)) if flag.default else "none"
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": flag.name}
    if flag.many:
        kwargs.update(nargs="+", action="extend")
    names = [flag_name(flag.name), *more]
    if flag.base is bool:
        parser.add_argument(*names, action=argparse.BooleanOptionalAction,
                            help=f"{help_} (default: {shown})", **kwargs)  # fmt: skip
        return
    parse = _parser_for(flag.name, flag.base, flag.optional, flag.choices)
    metavar = flag.field.metadata.get("metavar") or (
        "{" + ",".join(map(str, flag.choices)) + "}" if flag.choices else flag.base.__name__.upper()
    )
    parser.add_argument(*names, type=parse, metavar=metavar, help=f"{help_} (default: {shown})",
                        **kwargs)  # fmt: skip


def _parser_for(name: str, base: type, optional: bool, choices: tuple | None) -> Callable:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", ""):
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag_name(name)} {text!r} is not {_a(base)}; "
                f"give e.g. {flag_name(name)} {_example(base)}"
            ) from None
        if base is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag_name(name)} {text!r} must be finite")
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(
                f"{flag_name(name)} {text!r} is not one of {list(choices)}"
            )
        return value

    return parse


def _a(base: type) -> str:
    return {int: "an int", float: "a float", str: "a string", bool: "a bool"}[base]


def _example(base: type) -> str:
    return {int: "8", float: "0.001", str: "text"}.get(base, "1")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a flat JSON or TOML config (keys are field names, '-' or '_')."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(
            f"config file {str(path)!r} cannot be read ({err}); fix the path"
        ) from None
    try:
        if path.suffix.lower() == ".toml":
            values = _toml().loads(text)
        else:
            values = json.loads(text)
    except ValueError as err:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ValueError(f"config file {str(path)!r} is not valid {kind}: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold one object of field = value")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _toml():
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # 3.10: the same parser as a package (the `train` extra)
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError(
                "TOML config files need Python 3.11+ or `pip install tomli`; or use JSON"
            ) from None
    return tomllib


def coerce(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check names and types of flat ``values`` (from a file or JSON) against ``cls``."""
    known = {flag.name: flag for flag in flags(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
    out = {}
    for name, value in values.items():
        flag = known[name]
        if flag.many:
            # A list field takes a JSON/TOML array; one value or null (older config.json
            # files, where the field was a single value) is a list of one or of none.
            items = [] if value is None else value if isinstance(value, list | tuple) else [value]
            out[name] = tuple(_coerce_one(name, v, flag.base, False, flag.choices, source)
                              for v in items)  # fmt: skip
        else:
            out[name] = _coerce_one(name, value, flag.base, flag.optional, flag.choices, source)
    return out


def _coerce_one(name, value, base, optional, choices, source) -> Any:
    if value is None and optional:
        return None
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        kind = type(value)
        kind_text = _a(kind) if kind in (int, float, str, bool) else kind.__name__
        raise ValueError(
            f"{source}: field {name!r} = {value!r} is {kind_text}; "
            f"it must be {_a(base)}" + (" or null" if optional else "")
        )
    if choices and value not in choices:
        raise ValueError(f"{source}: field {name!r} = {value!r} must be one of {list(choices)}")
    return value


def from_args(
    cls: type, args: argparse.Namespace, *, file_values: Mapping[str, Any] | None = None
) -> Any:
    """Build ``cls`` from defaults, then the config file, then flags given on the command line."""
    values = coerce(cls, file_values or {}, "config file")
    names = {flag.name for flag in flags(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """The flat ``{option: value}`` of a config (what config.json and config files hold)."""
    out = {}
    for flag in flags(type(config)):
        holder = config if flag.owner is None else getattr(config, flag.owner)
        value = getattr(holder, flag.name)
        out[flag.name] = list(value) if flag.many else value
    return out


def check_choices(config: Any) -> None:
    """What the CLI checks of choices, for code that builds a config directly."""
    for flag in flags(type(config)):
        value = getattr(config, flag.name)
        for item in (value if flag.many else (value,)) if flag.choices else ():
            check(item in flag.choices, flag.name, item, f"use one of {list(flag.choices)}")


class Composite:
    """A command's config: concern dataclasses as its fields (plus options of its own).

    Subclasses are ``@dataclass(frozen=True, init=False)`` with one field per concern
    (``default_factory`` = the concern with this command's defaults). It is built from
    concern instances, from flat options, or both: ``TrainConfig(lr=1e-4, group_size=4)``
    sets ``optim.lr`` and ``run.group_size``. Flat names also read: ``config.lr`` is
    ``config.optim.lr`` (the flag's name, for the Python API and tests); code inside the
    package reads the concern it needs. ``__post_init__`` holds the cross-concern checks.
    """

    aliases: dict[str, str] = {}  # {other spelling: option name}, e.g. gspo eval's --engine

    def __init__(self, **values: Any) -> None:
        values = {self.aliases.get(k, k): v for k, v in values.items()}
        concerns = _concerns(type(self))
        owners = {flag.name: flag.owner for flag in flags(type(self))}
        whole, parts, own = {}, {name: {} for name in concerns}, {}
        for key, value in values.items():
            if key in concerns and isinstance(value, concerns[key]):
                whole[key] = value
            elif key not in owners:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                                f"{key!r}")  # fmt: skip
            elif owners[key] is None:
                own[key] = value
            else:
                parts[owners[key]][key] = value
        for f in dataclasses.fields(self):
            if f.name in concerns:
                base = whole.get(f.name) or f.default_factory()
                value = dataclasses.replace(base, **parts[f.name]) if parts[f.name] else base
            else:
                value = own.get(f.name, f.default)
            object.__setattr__(self, f.name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a flat option name.
        if name.startswith("_"):
            raise AttributeError(name)
        name = self.aliases.get(name, name)
        for owner in _concerns(type(self)):
            concern = self.__dict__.get(owner)
            if concern is not None and hasattr(concern, name):
                return getattr(concern, name)
        raise AttributeError(f"{type(self).__name__!r} has no option {name!r}")

    def replace(self, **values: Any):
        """A copy with flat options (or whole concerns) changed."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return type(self)(**{**current, **values})


def check(ok: bool, name: str, value: Any, fix: str) -> None:
    """Raise the project's standard config error unless ``ok``."""
    if not ok:
        raise ValueError(f"{flag_name(name)} / {name} = {value!r} is invalid: {fix}")


def check_dataset_fields(config: Any) -> None:
    """The --dataset flags (gspo.train.config.TaskConfig): one source of prompts, and the
    column flags only with --dataset (they would silently do nothing otherwise)."""
    check(config.dataset is None or config.prompts is None, "dataset", config.dataset,
          "give --dataset or --prompts, not both")  # fmt: skip
    for name in ("dataset_split", "prompt_field", "answer_field"):
        value = getattr(config, name)
        check(value is None or config.dataset is not None, name, value,
              "it names a column or split of --dataset PATH: add --dataset or drop it")  # fmt: skip
        check(value is None or value.strip() != "", name, value, "give a name, or none")


