"""The package is a map of the pipeline: every module imports only modules below it (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kis_lens"

# Bottom to top. A module may import from any earlier level, never from its own level or a later one.
LEVELS: list[tuple[str, ...]] = [
    ("errors", "_version", "tiny", "docs", "docs.verdict"),
    ("io", "layout", "facts", "tokens", "stats", "matrices", "gguf", "blocks"),
    ("models", "file_errors"),
    ("hooks", "corpus", "distributed", "w_out", "editing.shifted_forward_plan"),
    ("keys", "covariance", "storage", "fingerprint", "editing.shifted_forward", "editing.runs"),
    ("config", "editing.templates"),
    ("run_file",),
    ("classify", "results", "flags", "cache_pass"),
    ("cache_job",),
    ("runner",),
    ("quarters",),
    (
        "analysis",
        "uncertainty",
        "editing.weights",
        "editing.editors",
        "editing.values",
        "editing.counterfact",
        "editing.evaluation",
        "editing.metrics",
        "editing.verdicts",
        "docs.reproduction",
    ),
    ("plots", "figure_files", "editing.registry", "editing.options"),
    ("plot_distributions",),  # styles and titles its figures with plots
    ("report", "reproduction_plots", "editing.lifelong_files"),
    ("editing.simulation_plots", "editing.lifelong_plots"),
    ("editing.lifelong_report", "docs.lifelong_verdicts"),
    ("editing.simulation", "editing.lifelong_config", "editing.results", "docs.lifelong", "editing.api"),
    # The lifelong loop, bottom to top: what its editors share, what it measures, its steps, its record, its files.
    ("editing.lifelong_bench",),
    ("editing.lifelong_probes",),
    ("editing.lifelong_steps",),
    ("editing.lifelong_result",),
    ("editing.lifelong_identity",),
    ("editing.lifelong",),
    # A study across finished runs: which runs form one, its tables, then the study that gathers them.
    ("editing.study_runs",),
    ("editing.study_collapse", "editing.study_prediction", "editing.study_predictors", "editing.study_paired"),
    ("editing.lifelong_study",),
    ("docs.study_sections",),
    ("docs.study_prediction_sections",),
    ("docs.lifelong_study",),
    ("reproduce", "editing", "trace"),
    # Entry points.
    ("cli_stats",),
    ("cli", "__init__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    name = ".".join(parts)
    return "__init__" if name == "__init__" else name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kis_lens"):
            found.add(node.module.removeprefix("kis_lens").lstrip(".") or "__init__")
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix("kis_lens.") for alias in node.names if alias.name.startswith("kis_lens.")
            )
    return found


def test_every_module_has_a_level():
    """A new module must be placed in the pipeline on purpose."""
    level_of = {module for level in LEVELS for module in level}
    modules = {_module_name(path) for path in PACKAGE.rglob("*.py")}
    assert modules - level_of == set(), "add these modules to LEVELS"
    assert level_of - modules == set(), "LEVELS names modules that no longer exist"


def test_imports_only_go_down_the_pipeline():
    """No module imports one at its own level or above it, so data flows one way and there are no cycles."""
    level_of = {module: index for index, level in enumerate(LEVELS) for module in level}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for target in _imports(path):
            if target != module and level_of[target] >= level_of[module]:
                upward.append(f"{module} (level {level_of[module]}) imports {target} (level {level_of[target]})")
    assert upward == []


def test_result_readers_do_not_import_the_jobs():
    """analysis, plots and report read results files; they never need the job modules that write them."""
    jobs = {"runner", "cache_job", "covariance", "reproduce", "cli"}
    for reader in ("analysis", "plots", "plot_distributions", "report", "results"):
        assert _imports(PACKAGE / f"{reader}.py") & jobs == set(), reader


def _offered_imports(path: Path) -> list[str]:
    """Return the kis_lens names a module imports only to offer them: marked unused (noqa F401), aliased to
    themselves (`import x as x`), or listed in its __all__."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    offered, imported = [], set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kis_lens"):
            marked = any("noqa: F401" in lines[number - 1] for number in range(node.lineno, node.end_lineno + 1))
            offered += [alias.name for alias in node.names if marked or alias.asname == alias.name]
            imported |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__all__" for target in node.targets):
            offered += [element.value for element in node.value.elts if element.value in imported]
    return offered


def test_no_module_but_the_package_offers_names_it_imports():
    """Each name is imported from the module that defines it: no shim or re-export, bar the package's own front."""
    offering = {
        _module_name(path): _offered_imports(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if _module_name(path) != "__init__"
    }
    assert {module: names for module, names in offering.items() if names} == {}
    assert "load_model" in _offered_imports(PACKAGE / "__init__.py")  # the front the README documents
