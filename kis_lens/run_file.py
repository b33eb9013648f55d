"""Run files: every setting of a `kis` job, written as YAML beside its results and read back by `kis --config`.

A run file holds the subcommand, the kis_lens version and every field of the job's config, defaults included, under
a comment header saying how to rerun it; a nested block (``value_search``) is a nested mapping of its settings.
``write_run_file`` writes one atomically; ``settings_from_file`` reads one back for a command and returns its
settings as config values, refusing an unknown key, a file of another command and a value of the wrong type with a
KisError naming the key and the fix. A nested setting written flat, by its flag's name or an alias (value_steps,
kl_factor: how run files held it before its block was nested), reads into its block. kis_lens.flags lays the flags
given on the command line over them.
"""

from __future__ import annotations

import difflib
import shlex
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from kis_lens._version import __version__
from kis_lens.blocks import FlatSetting, flat_settings, flat_values, help_groups, with_flat
from kis_lens.errors import KisError
from kis_lens.io import atomic_write

COMMAND_KEY = "command"
VERSION_KEY = "kis_lens_version"
CONFIG_KEY = "config"
TOP_KEYS: tuple[str, ...] = (COMMAND_KEY, VERSION_KEY, CONFIG_KEY)


def _plain(value: Any) -> Any:
    """Return a setting as YAML's safe dumper takes it: tuples as lists, paths as the text they were given as, a
    nested block as the mapping of its settings."""
    if is_dataclass(value) and not isinstance(value, type):
        return {item.name: _plain(getattr(value, item.name)) for item in fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(part) for part in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _yaml_value(value: Any) -> str:
    """Return one value as YAML on one line (a list in flow style: [rome, memit])."""
    # Dumped inside a one-item list so a scalar gets the same quoting it would get as a mapping's value, and no
    # document end marker; the list's brackets are then stripped.
    text = yaml.safe_dump([_plain(value)], default_flow_style=True, width=2**30, allow_unicode=True).strip()
    return text[1:-1]


def _shown(item: FlatSetting, value: Any) -> str:
    """Return a value as the file writes it, with what null means for this setting."""
    none = item.metadata.get("none")
    return f"null = {none}" if value is None and none else _yaml_value(value)


def _note(item: FlatSetting, value: Any) -> str:
    """Return what null means here, and the default when the value is another, so edited settings stand out."""
    notes = []
    if value is None and item.metadata.get("none"):
        notes.append(_shown(item, value))
    if _plain(item.default) != _plain(value):
        notes.append(f"default {_shown(item, item.default)}")
    return f" ({'; '.join(notes)})" if notes else ""


def _help(metadata: Mapping[str, Any]) -> str:
    return " ".join(str(metadata.get("help", "")).split())


def run_file_text(command: str, config: Any, path: str | Path) -> str:
    """Return the run file of a `kis <command>` job: a comment header, the command, the version, every setting."""
    shown = shlex.quote(str(path))
    lines = [
        f"# kis run file: every setting of a `kis {command}` run, defaults included (kis_lens {__version__}).",
        f"# Rerun it:                     kis --config {shown}",
        f"# Rerun it with some changes:   kis {command} --config {shown} --output_dir elsewhere",
        "# Flags given on the command line override the file. Paths are as the run was given them",
        "# (relative ones to the folder it ran in).",
        f"{COMMAND_KEY}: {_yaml_value(command)}",
        f"{VERSION_KEY}: {_yaml_value(__version__)}",
        f"{CONFIG_KEY}:",
    ]
    sections = help_groups(type(config))
    section: str | None = ""
    block: str | None = None
    values = flat_values(config)
    for item in flat_settings(type(config)):
        name = item.block or item.name
        if sections[name] != section:  # one comment line per block of settings, as `kis <command> --help`
            section = sections[name]
            lines.append(f"  # {section or f'settings of kis {command}'}")
        if item.block is not None and item.block != block:  # a nested block: its mapping's key, then its settings
            lines.append(f"  {item.block}:  # {_help(type(config).__dataclass_fields__[item.block].metadata)}")
        block, value = item.block, values[item.name]
        indent = "    " if item.block else "  "
        lines.append(f"{indent}{item.item.name}: {_yaml_value(value)}  # {_help(item.metadata)}{_note(item, value)}")
    text = "\n".join(lines) + "\n"
    expected = {
        COMMAND_KEY: command,
        VERSION_KEY: __version__,
        CONFIG_KEY: {item.name: _plain(getattr(config, item.name)) for item in fields(config)},
    }
    # The one-line rendering above is hand-assembled: read it back, so a value YAML would read otherwise fails here.
    if yaml.safe_load(text) != expected:
        raise RuntimeError(f"the run file of {config!r} does not read back as written:\n{text}")
    return text


def write_run_file(path: str | Path, command: str, config: Any) -> Path:
    """Write the run file of a `kis <command>` job to path, atomically; return path."""
    text = run_file_text(command, config, path)
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def announce_run_file(path: str | Path, command: str, config: Any, verb: str = "rerun") -> Path:
    """Write the job's run file to path and print where it is and how to run it."""
    written = write_run_file(path, command, config)
    print(f"run file: {written} ({verb}: kis --config {shlex.quote(str(written))})")
    return written


def read_run_file(path: str | Path) -> dict[str, Any]:
    """Return a run file's top level (command, kis_lens_version, config); KisError when it is no run file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KisError(f"no run file at {path}: give --config the run.yaml a kis job wrote") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KisError(f"cannot read run file {path} ({type(error).__name__}: {error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise KisError(f"run file {path} is not valid YAML ({error}): fix the line it names") from None
    if not isinstance(data, dict) or not data:
        raise KisError(
            f"run file {path} holds {type(data).__name__}, not the mapping a kis run file is "
            f"({COMMAND_KEY}:, {CONFIG_KEY}: its settings)"
        )
    unknown = [key for key in data if key not in TOP_KEYS]
    if unknown:
        raise KisError(
            f"run file {path}: unknown key {unknown[0]!r} at the top level: a run file holds only "
            f"{', '.join(TOP_KEYS)}; settings go under {CONFIG_KEY}: (indented)"
        )
    if COMMAND_KEY in data and not isinstance(data[COMMAND_KEY], str):
        raise KisError(f"run file {path}: {COMMAND_KEY} must be a kis command such as all, not {data[COMMAND_KEY]!r}")
    settings = data.get(CONFIG_KEY)
    if settings is None:
        data[CONFIG_KEY] = {}
    elif not isinstance(settings, dict):
        raise KisError(
            f"run file {path}: {CONFIG_KEY} must map setting names to values (e.g. `  model_name: tiny-gpt2` "
            f"on the line below it), not {type(settings).__name__}"
        )
    return data


def run_file_command(path: str | Path) -> str:
    """Return the command a run file is of, for `kis --config FILE` (which names none)."""
    command = read_run_file(path).get(COMMAND_KEY)
    if command is None:
        raise KisError(
            f"run file {path} names no command: add `{COMMAND_KEY}: all` (or its command) at the top, "
            f"or run `kis <command> --config {path}`"
        )
    return command


def _describe(item: FlatSetting) -> str:
    """Return what a setting's value must be, in words."""
    kind, meta = item.kind, item.metadata
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "text", tuple: "a list"}
    text = words.get(kind, kind.__name__)
    if "choices" in meta:
        text = f"{'a list of' if kind is tuple else 'one of'} {', '.join(map(str, meta['choices']))}"
    if item.optional:
        text += f", or null ({meta.get('none', 'unset')})"
    return text


def _example(item: FlatSetting) -> str:
    """Return a line that would be right: the setting at its default."""
    where = f" under `{item.block}:`" if item.block else ""
    return f"`{item.item.name}: {_yaml_value(item.default)}`{where} (its default)"


def _checked(path: Path, item: FlatSetting, value: Any) -> Any:
    """Return a run file's value of one setting as the config holds it; KisError naming the key if it is no fit."""
    kind, meta = item.kind, item.metadata
    written = value  # named in the message as the file has it, before any conversion

    def refuse() -> KisError:
        return KisError(
            f"run file {path}: setting {item.key} is {written!r}, which is not {_describe(item)}: "
            f"write e.g. {_example(item)}"
        )

    if value is None:
        if item.optional:
            return None
        raise refuse()
    # The flags' words for None ("all", "any") read the same here; numbers such as 0 do not, so a value the
    # config can hold (checkpoint_every: 0) reads back as itself.
    if isinstance(meta.get("cli_none"), str) and value == meta["cli_none"]:
        return None
    if "parse" in meta and isinstance(value, str):
        try:
            return meta["parse"](value)
        except KisError as error:
            raise KisError(f"run file {path}: setting {item.key}: {error}") from None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is tuple:
        ok = isinstance(value, list) and all(isinstance(part, str) for part in value)
        value = tuple(value) if ok else value
    else:  # a field type this reader does not know: a new kind of setting needs a rule here
        raise TypeError(f"run files cannot read setting {item.key} of type {kind}")
    if not ok:
        raise refuse()
    choices = meta.get("choices")
    if choices is not None and not all(part in choices for part in (value if kind is tuple else (value,))):
        raise refuse()
    return value


def _unknown_key(path: Path, command: str | None, config_class: type, key: Any, block: str | None = None) -> KisError:
    """Return the error of a key that is no setting (of the nested block, if one is named), with its likely meaning."""
    settings = flat_settings(config_class)
    if block is None:  # the config's fields, and its nested settings by their flags' names
        names = [item.block or item.name for item in settings] + [item.name for item in settings if item.block]
    else:
        names = [item.item.name for item in settings if item.block == block]
    owner = next((item for item in settings if item.block == block and key in item.metadata.get("aliases", ())), None)
    if owner is not None:
        hint = f"{key} is the original scripts' name of {owner.item.name}: write {owner.item.name} instead"
    else:
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        hint += "remove it, or fix its name"
    where = f"`kis {command}`" if command else config_class.__name__
    return KisError(
        f"run file {path}: unknown setting {key!r}{f' under {block}:' if block else ''} for {where}: {hint} "
        f"(`kis {command or '<command>'} --help` lists the settings)"
    )


def settings_from_file(path: str | Path, command: str | None, config_class: type) -> dict[str, Any]:
    """Return the settings of a run file for `kis <command>`, checked and typed as config_class's fields.

    command None (a parser without subcommands) skips the command check. Settings the file leaves out are left out,
    so they keep the config's defaults: a hand-written file may name only some. A nested block's mapping may name
    only some of its settings too (the rest: the config's default block's), and a nested setting written flat by
    its flag's name or an alias (as older run files held it) reads into its block.
    """
    path = Path(path)
    data = read_run_file(path)
    written_for = data.get(COMMAND_KEY)
    if command is not None and written_for is not None and written_for != command:
        raise KisError(
            f"run file {path} is of `kis {written_for}`, not `kis {command}`: rerun it with "
            f"`kis --config {path}` (or `kis {written_for} --config {path}`)"
        )
    settings = flat_settings(config_class)
    own = {item.name: item for item in settings if item.block is None}
    blocks = {item.block for item in settings if item.block is not None}
    flat_names = {
        name: item for item in settings if item.block for name in (item.name, *item.metadata.get("aliases", ()))
    }
    values: dict[str, Any] = {}
    nested: dict[str, Any] = {}  # flag name → value of each nested setting the file gives

    def give(item: FlatSetting, value: Any) -> None:
        if item.name in nested:
            raise KisError(
                f"run file {path}: {item.key} is given twice (under {item.block}: and flat, or by two of its names, "
                f"{item.name} and its aliases): keep one"
            )
        nested[item.name] = _checked(path, item, value)

    for key, value in data[CONFIG_KEY].items():
        if key in own:
            values[key] = _checked(path, own[key], value)
        elif key in blocks:
            inner = {item.item.name: item for item in settings if item.block == key}
            if not isinstance(value, Mapping):
                first = next(iter(inner.values()))
                raise KisError(
                    f"run file {path}: {key} must map its settings to values (e.g. `{first.item.name}: "
                    f"{_yaml_value(first.default)}` indented on the line below it), not {value!r}"
                )
            for name, part in value.items():
                if name not in inner:
                    raise _unknown_key(path, command, config_class, name, key)
                give(inner[name], part)
        elif key in flat_names:
            give(flat_names[key], value)
        else:
            raise _unknown_key(path, command, config_class, key)
    try:
        return with_flat(config_class, values, nested)
    except KisError as error:
        raise KisError(f"run file {path}: {error}") from None
