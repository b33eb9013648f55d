"""The flags of a job, generated from its config dataclass: one option per field, parsed back into the config.

``add_config_flags`` reads each setting's type, default and help metadata (kis_lens.blocks.setting), so a default
lives only on its field, and adds ``--config RUN.yaml`` (a run file, kis_lens.run_file). A block nested in the config
(its ``value_search``) is flattened: each of its settings is a flag of its own under the block's prefix
(--value_steps; kis_lens.blocks.flat_settings). ``config_from_args`` turns the run file's settings and the parsed
flags, which win, back into the config, a nested flag into its block. ``flag`` declares the few command options
that are not settings of a job, under the same two spellings.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Sequence

from kis_lens.blocks import FlatSetting, ValueAlias, flat_settings, with_flat
from kis_lens.config import RunConfig, check_outputs
from kis_lens.errors import KisError
from kis_lens.run_file import settings_from_file

BOOL_CHOICES: dict[str, bool | None] = {"auto": None, "true": True, "false": False}
ORIGINAL_GROUP = "the original scripts' spellings (each sets the setting it names)"
OWN_GROUP = "settings of this command"
RUN_FILE_OPTION = "--config"
RUN_FILE_DEST = "run_file"  # not "config": the namespace also carries every setting by its own name
WRITE_RUN_FILE_DEST = "write_config"


def _spellings(name: str) -> list[str]:
    """Return --snake_case (the original scripts' spelling) and --kebab-case for one option."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    return spellings


def add_subcommand(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """Add a `kis` subcommand whose help is its description; every one takes --debug."""
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add a hand-declared option under both spellings."""
    parser.add_argument(*_spellings(name), dest=name, **kwargs)


class _ValueAliasAction(argparse.Action):
    """Set a setting from one of the original scripts' flags through its table of values.

    The setting's own flag wins: given before the alias, the alias leaves it alone; given after, it overwrites.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, alias: ValueAlias, **kwargs: Any) -> None:
        self.alias = alias
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values not in self.alias.values and self.alias.refusal is not None:
            raise KisError(f"{option_string} {values!r} is not accepted: {self.alias.refusal}")
        if values not in self.alias.values:
            meanings = ", ".join(
                f"{value} (= --{self.dest} {target})" if target is not None else f"{value} (no change)"
                for value, target in self.alias.values.items()
            )
            raise KisError(
                f"{option_string} {values!r} is not accepted: use {meanings}, or give --{self.dest} directly"
            )
        target = self.alias.values[values]
        if target is not None and not hasattr(namespace, self.dest):
            setattr(namespace, self.dest, target)


def _add_value_alias(parser: argparse._ActionsContainer, dest: str, alias: ValueAlias) -> None:
    """Add one of the original scripts' flags that sets ``dest`` through its table of values."""
    parser.add_argument(
        *_spellings(alias.name),
        dest=dest,
        action=_ValueAliasAction,
        alias=alias,
        default=argparse.SUPPRESS,
        metavar="{" + ",".join(alias.values) + "}",
        help=alias.help,
        **({"nargs": "?", "const": alias.bare} if alias.bare is not None else {}),
    )


def default_of(owner: Any, name: str) -> Any:
    """Return the default a dataclass field or a function parameter declares (read, never repeated)."""
    if is_dataclass(owner):
        return {item.name: item.default for item in fields(owner)}[name]
    return inspect.signature(owner).parameters[name].default


def _number_or_none(kind: type, word: Any) -> Callable[[str], Any]:
    """Return the flag type of a number field whose CLI value ``word`` (its cli_none: 0, "all", "any") means None."""

    def parse(text: str) -> Any:
        if text == str(word):
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a number or {word}") from None
        return None if value == word else value

    parse.__name__ = kind.__name__
    return parse


def _shown_default(item: FlatSetting) -> str:
    """Return how --help states a setting's default."""
    meta = item.metadata
    if item.default is None:
        shown = meta.get("none", "none")
        return f"{meta['cli_none']} = {shown}" if "cli_none" in meta else shown
    shown = ",".join(item.default) if isinstance(item.default, tuple) else str(item.default)
    return f"{shown}; {meta['cli_none']} = {meta['none']}" if "cli_none" in meta else shown


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one option (--snake_case and --kebab-case) per setting of a config dataclass, from its type and metadata.

    Every setting gets its flag: a setting a job cannot honour is no field of its config (kis_lens.config), and a
    nested block's settings are flags under its prefix, listed in the block's own --help section.

    bool: --no_<name> when the default is True, else --<name>; ``bool | None``: auto|true|false; tuple: comma-separated.
    A setting's ``aliases`` are more names of the same option; its ``value_aliases`` are the original scripts' flags
    that set it through a table of their values; its ``cli_none`` is the CLI value that parses to None (a number
    field then takes that word too: --sample_size all). Unset options stay out of the namespace, so
    config_from_args leaves those settings to the run file's values (--config), else to the dataclass defaults.
    """
    # In the parser's own "options" section, beside --debug: it is no setting, and the sections name blocks.
    parser.add_argument(
        RUN_FILE_OPTION,
        dest=RUN_FILE_DEST,
        metavar="RUN.yaml",
        default=None,
        help="read every setting from a run file (the .yaml every kis job writes beside its results, e.g. run.yaml); "
        "flags given here override it",
    )
    flag(
        parser,
        WRITE_RUN_FILE_DEST,
        metavar="RUN.yaml",
        default=None,
        help="write the run file of these settings to RUN.yaml and stop, running nothing",
    )
    parser.set_defaults(config_class=config_class)  # what --write_config writes, read by kis_lens.cli
    groups: dict[str, argparse._ArgumentGroup] = {}
    # The original scripts' spellings, added after every setting so --help lists them last.
    value_aliases: list[tuple[str, ValueAlias]] = []
    alias_spellings: list[tuple[list[str], dict[str, Any]]] = []

    def group(title: str) -> argparse._ArgumentGroup:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    for item in flat_settings(config_class):  # TypeError there for a field not declared with setting()
        kind, optional, meta = item.kind, item.optional, item.metadata
        help_text = meta["help"]
        home = group(item.section or OWN_GROUP)
        value_aliases += [(item.name, alias) for alias in meta.get("value_aliases", ())]
        if kind is bool and not optional:
            negate = "no_" if item.default else ""
            action = "store_false" if item.default else "store_true"
            options: dict[str, Any] = {"dest": item.name, "action": action, "default": argparse.SUPPRESS}
            help_text = f"turn off: {help_text} (on by default)" if item.default else help_text
            home.add_argument(*_spellings(negate + item.name), **options, help=help_text)
        else:
            negate = ""
            options = {"dest": item.name, "default": argparse.SUPPRESS}
            options["help"] = f"{help_text} (default {_shown_default(item)})"
            if kind is bool:
                options["choices"] = tuple(BOOL_CHOICES)
            elif kind is tuple:
                options["metavar"] = "A,B,..."
            elif "parse" in meta:
                options["metavar"] = item.name.upper()  # the text stays text here; config_from_args parses it
            else:
                options["type"] = _number_or_none(kind, meta["cli_none"]) if "cli_none" in meta else kind
                if "choices" in meta:
                    options["choices"] = meta["choices"]
            home.add_argument(*_spellings(item.name), **options)
        aliases = [spelling for alias in meta.get("aliases", ()) for spelling in _spellings(negate + alias)]
        if aliases:  # the same option under the original scripts' names (a bool's: --no_fast_values)
            alias_spellings.append((aliases, {**options, "help": f"= --{negate}{item.name}"}))
    for dest, alias in value_aliases:
        _add_value_alias(group(ORIGINAL_GROUP), dest, alias)
    for spellings, options in alias_spellings:
        group(ORIGINAL_GROUP).add_argument(*spellings, **options)


def given_settings(args: argparse.Namespace, config_class: type = RunConfig) -> dict[str, Any]:
    """Return the settings args give, as config values: the run file's (--config), then the flags', which win.

    A nested block given by the file or by any flag of its settings is a value of the block (its other settings:
    the file's, else the config's default block's); KisError from the block's own checks.
    """
    given = vars(args)
    values: dict[str, Any] = {}
    if given.get(RUN_FILE_DEST) is not None:
        values.update(settings_from_file(given[RUN_FILE_DEST], given.get("command"), config_class))
    flat: dict[str, Any] = {}
    for item in flat_settings(config_class):
        if item.name not in given:
            continue
        value = given[item.name]
        if item.kind is bool and item.optional and isinstance(value, str):
            value = BOOL_CHOICES[value]
        elif item.kind is tuple and isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        elif "parse" in item.metadata and isinstance(value, str):
            value = item.metadata["parse"](value)  # after argparse, so its KisError reaches the user as written
        flat[item.name] = value
    return with_flat(config_class, values, flat)


def config_from_args(args: argparse.Namespace, config_class: type = RunConfig, **overrides: Any) -> Any:
    """Return the config (RunConfig by default) the run file and the flags describe; unset fields keep the defaults.

    Settings no job can run (a NaN, a folder that cannot be written) raise KisError here, before any model loads.
    """
    run_file = getattr(args, RUN_FILE_DEST, None)
    try:  # a nested block checks its settings as given_settings builds it, the config's own when it is built
        config = config_class(**{**given_settings(args, config_class), **overrides})
    except KisError as error:
        if run_file is None or str(run_file) in str(error):
            raise  # no run file, or the error already names it
        # The value may be the file's or a flag's: say both places to look.
        raise KisError(f"{error} (settings read from {run_file}, then the flags given)") from None
    check_outputs({item.name: getattr(config, item.name) for item in fields(config)})
    return config
