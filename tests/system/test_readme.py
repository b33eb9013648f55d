"""The README runs as written: its Python blocks execute, and every `kis` command and flag it names exists."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kis_lens.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, ROOT / "docs" / "caches.md", ROOT / "docs" / "editing.md"]
# The README's blocks are written for SmolLM2-135M; the test runs them on the random tiny GPT-2, which knows no
# facts (so "known" becomes "all"). Nothing else is changed.
ON_THE_TINY_MODEL = {'"smollm2-135m"': '"tiny-gpt2"', 'knowledge_type="known"': 'knowledge_type="all"'}


def fenced_blocks(text: str, language: str) -> list[str]:
    """Return the bodies of the ```language blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def block_commands(text: str) -> list[list[str]]:
    """Return the `kis` commands of the bash blocks, as argument lists without `kis` (comments dropped)."""
    commands = []
    for block in fenced_blocks(text, "bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and Path(words[0]).name == "kis":
                    commands.append(words[1:])
    return commands


def inline_commands(text: str) -> list[list[str]]:
    """Return the `kis …` commands written inline (`kis p-matrix --fact_token …`), as argument lists without `kis`."""
    spans = re.findall(r"`((?:\.venv/bin/)?kis [^`]+)`", text)
    spans += [match.split("kis_lens.cli", 1)[1] for match in re.findall(r"`(torchrun [^`]*kis_lens\.cli [^`]+)`", text)]
    return [span.replace("\\|", "|").split()[1:] if span.split()[0].endswith("kis") else span.split() for span in spans]


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices.get(command)


def unknown_words(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """Return what a written command names that `kis` does not have: its subcommand, or each unknown --flag."""
    if not words or words[0].startswith("-"):
        return [flag for flag in words if flag.startswith("--") and flag not in ("--version", "--help", "--config")]
    sub = _subparser(parser, words[0])
    if sub is None:
        return [words[0]]
    known = set(sub._option_string_actions)
    return [word.split("=")[0] for word in words[1:] if word.startswith("--") and word.split("=")[0] not in known]


def test_every_kis_command_and_flag_named_in_the_docs_exists():
    """Each `kis …` of the README and docs names a real command and real flags (`--null_model false` would fail)."""
    parser = build_parser()
    named = [(path.name, words) for path in DOCS for words in block_commands(path.read_text(encoding="utf-8"))]
    named += [(path.name, words) for path in DOCS for words in inline_commands(path.read_text(encoding="utf-8"))]
    assert len(named) > 20
    wrong = {f"{where}: kis {' '.join(words)}": bad for where, words in named if (bad := unknown_words(parser, words))}
    assert not wrong, wrong


def test_the_readme_block_commands_parse_with_their_values():
    """The commands of the README's bash blocks parse as written, values included."""
    parser = build_parser()
    commands = block_commands(README.read_text(encoding="utf-8"))
    assert ["all"] in commands and any(words[:1] == ["lifelong"] for words in commands)
    for words in commands:
        if words and words[0] != "--version":
            parser.parse_args(words)  # argparse exits (SystemExit) on a bad flag or value


def test_a_broken_flag_is_caught(tmp_path):
    """The checks above fail on a flag that does not exist, inline or in a block."""
    parser = build_parser()
    text = "run `kis reproduce --null_model false`\n```bash\nkis all --sample_sise 8\n```\n"
    assert unknown_words(parser, inline_commands(text)[0]) == ["--null_model"]
    assert unknown_words(parser, block_commands(text)[0]) == ["--sample_sise"]
    with pytest.raises(SystemExit):
        parser.parse_args(block_commands(text)[0])


@pytest.mark.slow
def test_the_readme_python_blocks_run_as_written(tmp_path):
    """Every ```python block of the README, in order in one process, on the tiny model, from an empty folder."""
    blocks = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    assert len(blocks) >= 4
    program = "\n".join(blocks)
    for written, tiny in ON_THE_TINY_MODEL.items():
        program = program.replace(written, tiny)
    assert "tiny-gpt2" in program
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "p_heatmaps.html").exists() and (tmp_path / "results").is_dir()
