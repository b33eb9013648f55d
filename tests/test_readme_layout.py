"""The README's Layout table names every module of the package, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table_names() -> set[str]:
    """Return the modules the table names: the first column's, and in a subpackage's row each `name` that opens an
    entry (followed by " (" or " +", or by a comma in the first column)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout\n") : text.index("## Data and credits")]
    names: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first, rest = row.split("|")[1], "|".join(row.split("|")[2:])
        folder = re.match(r" `(\w+)/`", first)
        if folder:
            names |= {f"{folder.group(1)}.{name}" for name in re.findall(r"`(\w+)` (?:\(|\+)", rest)}
        else:
            names |= set(re.findall(r"`(\w+)`", first))
    return names


def _modules() -> set[str]:
    package = ROOT / "kis_lens"
    found = set()
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            continue
        found.add(".".join(parts))
    return found


def test_the_layout_table_matches_the_tree():
    table, modules = _table_names(), _modules()
    assert not modules - table, f"modules missing from the README's Layout table: {sorted(modules - table)}"
    assert not table - modules, f"the README's Layout table names modules that do not exist: {sorted(table - modules)}"
