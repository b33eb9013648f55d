"""docs/cli.md and the README's commands table are what docs/render_cli.py writes from the parser."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from kis_lens.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _render_cli():
    spec = importlib.util.spec_from_file_location("kis_docs_render_cli", ROOT / "docs" / "render_cli.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_reference_is_current():
    assert _render_cli().main(["--check"]) == 0, "run: .venv/bin/python docs/render_cli.py"


def test_the_reference_names_every_command_and_flag():
    render = _render_cli()
    parser = build_parser()
    doc, table = render.cli_doc(parser), render.readme_table(parser)
    for name, (_, sub) in render.subcommands(parser).items():
        assert f"## kis {name}" in doc and f"`kis {name}`" in table
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert f"`{action.option_strings[0]}" in doc, (name, action.option_strings)
    assert "--no_null_model" in doc and "--null_model`" not in doc
