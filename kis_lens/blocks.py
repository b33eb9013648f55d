"""How settings are declared and composed into the job configs: the machinery under kis_lens.config's blocks.

``setting`` declares one setting, a dataclass field with its CLI help as metadata. ``with_defaults`` and ``borrow``
restate a block's setting in a job (``Override``: another default, help or --help section), so each setting is
declared once; ``block_of`` projects a config onto a block. A field whose type is itself a block with a
``FLAG_PREFIX`` (``ValueSearch``: "value_") nests that block whole: ``flat_settings`` lists every setting flat, a
nested one under its prefixed name (value_steps), which is how kis_lens.flags makes a flag of each and
kis_lens.run_file reads one written flat, and ``with_flat`` lays flat values back into the nested blocks.
``at_least`` and ``check_finite_settings`` refuse what no job can run with a KisError naming the flag that fixes it.
"""

from __future__ import annotations

import functools
import math
import numbers
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

from kis_lens.errors import KisError


@dataclass(frozen=True)
class ValueAlias:
    """A flag of the original scripts that sets a setting through a table of its own values."""

    name: str  # the flag without dashes, e.g. "ds_name"
    values: Mapping[str, Any]  # flag value -> setting value (None: the setting is left as it is)
    help: str
    bare: str | None = None  # the value a bare flag stands for (e.g. --download = --download 1)
    refusal: str | None = None  # why a value outside the table is refused (None: the table's values are listed)


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    none: str | None = None,
    cli_none: Any = None,
    aliases: Sequence[str] = (),
    value_aliases: Sequence[ValueAlias] = (),
    infinite: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """Return a dataclass field with its CLI help as metadata.

    choices: the values the CLI accepts; none: what a None default means, shown in --help;
    cli_none: the CLI value that stands for None (e.g. 0 for "no token limit", or a word such as "all" that an int
        flag then accepts besides numbers: kis_lens.cli reads it, nothing else);
    aliases: other names of the same flag (the original scripts' spellings, e.g. "fact_token"; for a setting of a
        nested block also the flat names older configs gave it, which run files may still hold);
    value_aliases: the original scripts' flags that set this setting through a table of their values;
    infinite: what inf means for a float setting that accepts it (every other float setting must be finite);
    parse: turns the flag's text into the value (e.g. parse_bytes for "24GB"), raising KisError on bad text.
    """
    given = {"aliases": tuple(aliases), "value_aliases": tuple(value_aliases), "choices": choices, "none": none}
    given |= {"cli_none": cli_none, "infinite": infinite, "parse": parse}
    metadata = {"help": help, **{key: value for key, value in given.items() if value is not None and value != ()}}
    if "choices" in metadata:
        metadata["choices"] = tuple(metadata["choices"])
    return field(default=default, metadata=metadata)


def _flag(config: Any, name: str) -> str:
    """Return the flag of a setting of config (a nested block's: with its FLAG_PREFIX)."""
    return getattr(type(config), "FLAG_PREFIX", "") + name


def at_least(name: str, value: int | None, minimum: int, none_means: str | None = None) -> None:
    """Raise KisError unless value is an int >= minimum (or None where none_means says what None does)."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fix = f" (or None for {none_means})" if none_means is not None else ""
        raise KisError(f"{name} must be at least {minimum}{fix}, not {value!r}: pass --{name} {minimum} or more")


@functools.cache
def _float_fields(config_class: type) -> tuple[tuple[Field, bool], ...]:
    """Return (field, whether None is allowed) of each float or float | None field of a config dataclass."""
    hints = typing.get_type_hints(config_class)
    found = []
    for item in fields(config_class):
        args = typing.get_args(hints[item.name]) or (hints[item.name],)
        if [arg for arg in args if arg is not type(None)] == [float]:
            found.append((item, type(None) in args))
    return tuple(found)


def check_finite_settings(config: Any) -> None:
    """Raise KisError for a float setting of config that is NaN, inf (unless its field accepts inf) or no number.

    Every float field is checked, so a new setting is covered without a line of its own; None passes where the
    annotation allows it, and a field declared with ``setting(..., infinite=...)`` takes inf. The message names the
    setting's flag (a nested block's with its FLAG_PREFIX: --value_lr).
    """
    for item, optional in _float_fields(type(config)):
        value, flag = getattr(config, item.name), _flag(config, item.name)
        if value is None and optional:
            continue
        number = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
        if number and (math.isfinite(value) or "infinite" in item.metadata):
            continue
        if item.default is None or item.default is MISSING:
            fix = f"leave --{flag} out for {item.metadata.get('none', 'its default')}, or give a number"
        else:
            fix = f"e.g. --{flag} {item.default} (its default)"
        kind = "a number" if "infinite" in item.metadata else "a finite number"
        raise KisError(f"--{flag} must be {kind}, not {value!r}: {fix}")


_BLOCKS_DEFAULT: Any = object()  # an Override that changes only the help keeps the block's default


@dataclass(frozen=True)
class Override:
    """A restated setting's new default (unless only its help changes) and its help for this job (None: the block's).

    section: the --help section it is listed in for this job (None: its block's HELP_GROUP), for a setting borrowed
    from a block whose section would mislead there (BOS of a job that reads no corpus).
    """

    default: Any = _BLOCKS_DEFAULT
    help: str | None = None
    none: str | None = None
    section: str | None = None


Block = TypeVar("Block")


def _restate(cls: type, source: Field, change: Any) -> None:
    """Give cls its own copy of a block's field, with another default and help, before @dataclass reads cls."""
    override = change if isinstance(change, Override) else Override(change)
    metadata = dict(source.metadata)
    changes = (("help", override.help), ("none", override.none), ("section", override.section))
    metadata.update({key: value for key, value in changes if value})
    own = dict(cls.__dict__.get("__annotations__", {}))
    # An inherited field keeps its place in the field order; a borrowed one comes before the class's own fields.
    cls.__annotations__ = {source.name: source.type, **own}
    default = source.default if override.default is _BLOCKS_DEFAULT else override.default
    setattr(cls, source.name, field(default=default, metadata=metadata))
    cls.__restated__ = (*cls.__dict__.get("__restated__", ()), source.name)


def with_defaults(**defaults: Any) -> Callable[[type], type]:
    """Class decorator (below @dataclass): restate inherited settings with this job's defaults (or Override)."""

    def decorate(cls: type) -> type:
        for name, change in defaults.items():
            owners = [base for base in cls.__mro__[1:] if name in getattr(base, "__dataclass_fields__", {})]
            if not owners:
                raise TypeError(f"{cls.__name__} inherits no setting {name!r} to give another default")
            _restate(cls, owners[0].__dataclass_fields__[name], change)
        return cls

    return decorate


def borrow(block: type, *names: str, **defaults: Any) -> Callable[[type], type]:
    """Class decorator (below @dataclass): take single settings of a block the job does not honour in full.

    names keep the block's default; keyword names take this job's default (a value, or an Override).
    """

    def decorate(cls: type) -> type:
        for name in reversed((*names, *defaults)):  # each goes first: reversed, they keep the order given
            if name not in block.__dataclass_fields__:
                raise TypeError(f"{block.__name__} has no setting {name!r} for {cls.__name__} to borrow")
            _restate(cls, block.__dataclass_fields__[name], defaults.get(name, Override()))
        cls.__borrowed__ = {**cls.__dict__.get("__borrowed__", {}), **dict.fromkeys((*names, *defaults), block)}
        return cls

    return decorate


def field_kind(hint: Any) -> tuple[type, bool]:
    """Return (base type, whether None is allowed) of a field annotation such as ``int | None``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [arg for arg in args if arg is not type(None)]
    return typing.get_origin(hint) or hint, optional


def field_kinds(config_class: type) -> dict[str, tuple[type, bool]]:
    """Return {setting: (base type, whether None is allowed)} of every field of a config class."""
    hints = typing.get_type_hints(config_class)
    return {item.name: field_kind(hints[item.name]) for item in fields(config_class)}


def help_groups(config_class: type) -> dict[str, str | None]:
    """Return every setting's --help section: its block's HELP_GROUP (a borrowed one's too, unless its Override names
    a section); None for a job's own."""
    return {
        item.name: item.metadata.get("section") or _help_group(config_class, item.name) for item in fields(config_class)
    }


def _help_group(config_class: type, name: str) -> str | None:
    for cls in config_class.__mro__:
        if name in vars(cls).get("__borrowed__", {}):
            return _help_group(vars(cls)["__borrowed__"][name], name)
    for cls in reversed(config_class.__mro__):  # the block that first declares it, before a job that restates it
        if name in vars(cls).get("__annotations__", {}) and "HELP_GROUP" in vars(cls):
            return vars(cls)["HELP_GROUP"]
    return None


def block_of(config: Any, block: type[Block]) -> Block:
    """Return the block's settings as config has them; settings config lacks keep the block's defaults."""
    return block(**{item.name: getattr(config, item.name) for item in fields(block) if hasattr(config, item.name)})


def is_nested(kind: type) -> bool:
    """Return whether a field of this type nests a block (a dataclass whose settings have flags under FLAG_PREFIX)."""
    return is_dataclass(kind) and isinstance(getattr(kind, "FLAG_PREFIX", None), str)


@dataclass(frozen=True)
class FlatSetting:
    """One setting as the flags see it: a field of the config, or a field of a block nested in it."""

    name: str  # its flag: the field's name, or the nested block's FLAG_PREFIX + the field's (value_steps)
    item: Field  # the field that declares it (the nested block's own, for a nested setting)
    default: Any  # its default in this config (a nested one's: the config's default block's)
    kind: type
    optional: bool
    section: str | None  # its --help section (None: the job's own settings)
    block: str | None = None  # the config field that holds its nested block (None: a field of the config itself)
    # Plain attributes, not properties: the flag generator reads them for every setting of every command.
    metadata: Mapping[str, Any] = field(init=False)  # the declaring field's (help, aliases, choices, …)
    key: str = field(init=False)  # where it sits in a config: "layer", or "value_search.steps"

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", self.item.metadata)
        object.__setattr__(self, "key", self.name if self.block is None else f"{self.block}.{self.item.name}")

    def value_of(self, config: Any) -> Any:
        """Return the setting's value in config."""
        return getattr(getattr(config, self.block) if self.block else config, self.item.name)


def flat_values(config: Any) -> dict[str, Any]:
    """Return every setting of a config by its flag name (a nested block's settings flattened), in field order."""
    return {item.name: item.value_of(config) for item in flat_settings(type(config))}


def _declared(config_class: type, item: Field) -> None:
    if "help" not in item.metadata or item.default is MISSING:
        raise TypeError(
            f"{config_class.__name__}.{item.name} needs a default and help: declare it with kis_lens.blocks.setting()"
        )


@functools.cache
def flat_settings(config_class: type) -> tuple[FlatSetting, ...]:
    """Return every setting of a config class by its flag, in field order, a nested block's settings in its place.

    A nested block's --help section is its own HELP_GROUP (or the nesting field's Override section). TypeError for a
    field without setting()'s help and default, or two settings that would share a flag.
    """
    kinds, sections, found = field_kinds(config_class), help_groups(config_class), []
    for item in fields(config_class):
        _declared(config_class, item)
        kind, optional = kinds[item.name]
        if not is_nested(kind):
            found.append(FlatSetting(item.name, item, item.default, kind, optional, sections[item.name]))
            continue
        if optional or not isinstance(item.default, kind):
            raise TypeError(f"{config_class.__name__}.{item.name} nests {kind.__name__}: its default must be one")
        section = item.metadata.get("section") or getattr(kind, "HELP_GROUP", None) or sections[item.name]
        for inner, (inner_kind, inner_optional) in zip(fields(kind), field_kinds(kind).values()):
            _declared(kind, inner)
            name, default = kind.FLAG_PREFIX + inner.name, getattr(item.default, inner.name)
            found.append(FlatSetting(name, inner, default, inner_kind, inner_optional, section, item.name))
    names = [flat.name for flat in found]
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise TypeError(f"{config_class.__name__}: settings {twice} would share a flag: rename one")
    return tuple(found)


def with_flat(config_class: type, values: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
    """Return config values (field → value) with flat settings (flag name → value) laid over them.

    A nested setting replaces its field in its block: the block values hold, else the config's default block (the
    block's own checks run then: a KisError names the flag).
    """
    settings = {setting.name: setting for setting in flat_settings(config_class)}
    merged, changes = dict(values), {}
    for name, value in flat.items():
        block = settings[name].block
        if block is None:
            merged[name] = value
        else:
            changes.setdefault(block, {})[settings[name].item.name] = value
    for block, change in changes.items():
        merged[block] = replace(merged.get(block, config_class.__dataclass_fields__[block].default), **change)
    return merged
