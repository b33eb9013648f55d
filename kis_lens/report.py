"""One HTML report of a run, offline: settings, the per-layer table, the figures and the most superposed pairs.
Other modules add sections without editing this one.

>>> from kis_lens.report import write_report
>>> write_report(load_result("results/runs/..."))          # -> <run dir>/report.html (+ plotly.min.js beside it)

Size: Plotly's JavaScript (4.8 MB) sits beside the report as plotly.min.js, shared with any figures in that folder
(self_contained=True embeds it: one file to mail, 4.8 MB larger). Each matrix's per-layer heatmaps are stored
packed (float16 relative to the layer's largest |value|, upper triangle of symmetric matrices) and drawn when the
slider reaches them, so 128 facts × 30 layers stay under 5 MB; thin=True also drops the histograms and KDEs and
keeps 8 bits per heatmap value.

Extra sections are always passed in, never registered globally: ``extra_sections=[("Editing", [fig1, fig2]),
ReportSection("Notes", html="<p>…</p>")]`` for sections already built, ``sections=[provider]`` for functions
result -> sections called with the reported run (``kis all --report`` and ``kis report`` both pass
kis_lens.editing.results.run_report_sections, which shows the run's own edit simulations and lifelong runs).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from kis_lens._version import __version__
from kis_lens.analysis import (
    DEFAULT_THRESHOLD,
    SuperposedPair,
    orthogonality_comparison,
    require_matrices,
    summary_table,
    top_pairs_by_layer,
    write_csv,
)
from kis_lens.errors import KisError
from kis_lens.figure_files import PLOTLY_BUNDLE, write_plotly_bundle
from kis_lens.io import atomic_write
from kis_lens.layout import SUMMARY_CSV_NAME, find_results, report_path, summary_csv_path
from kis_lens.plot_distributions import histogram_figure, kde_figure, layer_trends_figure, orthogonality_figure
from kis_lens.plots import LayerHeatmaps, matrix_style, packed_layer_heatmaps, result_model_name
from kis_lens.results import RunResult, load_result

PAPER = (
    "Hu et al. (2024), Knowledge in Superposition: Unveiling the Failures of Lifelong Knowledge Editing, "
    "arXiv:2408.07413"
)


@dataclass
class ReportSection:
    """A titled block of the report: optional intro text, figures, then trusted HTML (tables, notes)."""

    title: str
    figures: list[go.Figure | LayerHeatmaps] = field(default_factory=list)
    html: str = ""  # inserted as is: escape any user text with html.escape
    intro: str = ""  # plain text, escaped on output


SectionLike = ReportSection | tuple[str, go.Figure | Sequence[go.Figure] | str]
SectionProvider = Callable[[RunResult], Iterable[SectionLike]]


def as_section(section: SectionLike) -> ReportSection:
    """Return a ReportSection from itself or a (title, figure | figures | html) pair."""
    if isinstance(section, ReportSection):
        return section
    if not (isinstance(section, tuple) and len(section) == 2 and isinstance(section[0], str)):
        raise KisError(
            f"a report section is a ReportSection or a (title, figures or html) pair, got {type(section).__name__}"
        )
    title, content = section
    if isinstance(content, str):
        return ReportSection(title, html=content)
    if isinstance(content, (go.Figure, LayerHeatmaps)):
        return ReportSection(title, figures=[content])
    figures = list(content)
    if not all(isinstance(figure, (go.Figure, LayerHeatmaps)) for figure in figures):
        raise KisError(f"section {title!r}: content must be a plotly Figure, a list of Figures or an HTML string")
    return ReportSection(title, figures=figures)


@dataclass(frozen=True)
class Report:
    """A rendered report: the HTML text, how many Plotly figures it holds and its section titles."""

    html: str
    n_figures: int
    section_titles: list[str]
    bundle: str | None = PLOTLY_BUNDLE  # the script file the HTML loads from beside itself; None: Plotly inside


def format_number(value: Any) -> str:
    """Return a table cell: 4 significant digits for floats, 'nan' for NaN, str() otherwise."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def html_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, headers: Sequence[str] | None = None
) -> str:
    """Return an HTML table of rows of dicts, every cell escaped; numbers right-aligned."""
    if not rows:
        return "<p><em>no rows</em></p>"
    columns = list(columns or rows[0])
    headers = list(headers or columns)
    head = "".join(f"<th>{html.escape(str(header))}</th>" for header in headers)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(f"<td{' class=num' if numeric else ''}>{html.escape(format_number(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _flatten(settings: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append({"setting": name, "value": value if isinstance(value, (int, float, bool)) else str(value)})
    return rows


def _pairs_table(pairs: Sequence[SuperposedPair], symbol: str) -> str:
    rows = [
        {
            "rank": rank,
            f"{symbol}[i, j]": pair.value,
            "i": pair.row,
            "fact i (subject · prompt → answer)": (
                f"{pair.row_fact.subject} · {pair.row_fact.text} → {pair.row_fact.target_true}"
            ),
            "j": pair.column,
            "fact j (subject · prompt → answer)": (
                f"{pair.column_fact.subject} · {pair.column_fact.text} → {pair.column_fact.target_true}"
            ),
        }
        for rank, pair in enumerate(pairs, start=1)
    ]
    return html_table(rows)


def standard_sections(
    result: RunResult,
    names: Sequence[str] | None = None,
    top_k: int = 10,
    threshold: float = DEFAULT_THRESHOLD,
    thin: bool = False,
) -> list[ReportSection]:
    """Return the built-in sections: settings, per-layer table, trends, one per matrix, top pairs (thin: each
    matrix's heatmaps only, 8 bits a value, no histogram or KDE)."""
    names = require_matrices(result, names)
    config = result.settings.get("config") or {}
    model = result.settings.get("model") or {}
    key_settings = {
        "model": model.get("name", config.get("model_name")),
        "d_mlp": model.get("d_mlp"),
        "layers": f"{result.layers[0]}–{result.layers[-1]} ({len(result.layers)})",
        "facts": f"{len(result.facts)} from {config.get('facts', '?')} (seed {config.get('seed', '?')})",
        "token position": config.get("token_position"),
        "corpus": config.get("corpus"),
        "corpus token budget": config.get("max_tokens") or "all",
        "ridge": config.get("ridge"),
    }
    settings = ReportSection(
        "Run settings",
        html=html_table([{"setting": key, "value": value} for key, value in key_settings.items()])
        + "<details><summary>all settings</summary>"
        + html_table(_flatten(result.settings))
        + "</details>",
    )
    table = ReportSection(
        "Per-layer summary of off-diagonal values",
        intro=(
            f"Mean, population std, Fisher excess kurtosis (0 for a Gaussian), mean |value| and the share of "
            f"|value| > {threshold:g} over all i ≠ j entries, per matrix and layer. The same table is saved "
            f"as {SUMMARY_CSV_NAME} by `kis report`."
        ),
        html=html_table(summary_table(result, names, threshold)),
    )
    sections = [settings]
    trends = [layer_trends_figure(result, names, threshold)]
    comparison_html = ""
    if {"whitening_cos", "activation_cos"} <= set(names):
        trends.append(orthogonality_figure(result, threshold))
        comparison_html = html_table(
            [row.to_dict() for row in orthogonality_comparison(result, threshold)],
            columns=list(ORTHOGONALITY_HEADERS),
            headers=[header.format(t=f"{threshold:g}") for header in ORTHOGONALITY_HEADERS.values()],
        )
    sections.append(
        ReportSection(
            "Superposition across layers",
            figures=trends,
            intro=(
                "Heavy-tailed (high-kurtosis) off-diagonal values mean most fact pairs are nearly orthogonal "
                "but some overlap strongly. Whitening removes corpus-wide correlations; if knowledge were "
                "orthogonal in the whitened space, whitening-space |cos| would sit on the random baseline."
            ),
            html=comparison_html,
        )
    )
    sections.append(table)
    stored = (
        "8 bits between the layer's min and max (thin report)"
        if thin
        else "float16 relative to the layer's largest |value|, about 3 significant digits"
    )
    for name in names:
        style = matrix_style(name)
        figures: list[go.Figure | LayerHeatmaps] = [packed_layer_heatmaps(result, name, "u8" if thin else "f16")]
        if not thin:
            figures += [histogram_figure(result, name), kde_figure(result, name)]
        sections.append(
            ReportSection(
                style.title,
                figures=figures,
                intro=(
                    f"{style.axis_label}. Heatmap: drag the slider to change layer; hover names both facts; "
                    f"values stored as {stored} (the exact ones are in the results file)."
                ),
            )
        )
    pair_blocks = []
    for name in names:
        style = matrix_style(name)
        by_layer = top_pairs_by_layer(result, name, k=top_k)
        details = "".join(
            f"<details><summary>layer {layer}</summary>{_pairs_table(pairs, style.symbol)}</details>"
            for layer, pairs in by_layer.items()
        )
        pair_blocks.append(f"<h3>{html.escape(style.title)}</h3>{details}")
    sections.append(
        ReportSection(
            f"Top {top_k} most superposed pairs per layer",
            intro="Ranked by |value|, diagonal excluded; symmetric matrices list each pair once (i < j).",
            html="".join(pair_blocks),
        )
    )
    return sections


ORTHOGONALITY_HEADERS: dict[str, str] = {
    "layer": "layer",
    "whitening_mean_abs": "whitening mean |cos|",
    "activation_mean_abs": "activation mean |cos|",
    "random_mean_abs": "random mean |cos|",
    "whitening_over_random": "whitening ÷ random",
    "whitening_frac_above": "whitening share |cos| > {t}",
    "activation_frac_above": "activation share |cos| > {t}",
    "whitening_kurtosis": "whitening excess kurtosis",
    "activation_kurtosis": "activation excess kurtosis",
}

# Copied without the plotly.min.js beside it, the report says why it shows no figures instead of staying blank.
_MISSING_PLOTLY = (
    '<p id="kis-no-plotly" class="warn" hidden>The figures need plotly.min.js beside this file (kis writes it '
    "there; kis report --self_contained writes one file with Plotly inside).</p>"
    '<script type="text/javascript">if (typeof Plotly === "undefined") '
    'document.getElementById("kis-no-plotly").hidden = false;</script>'
)

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;\
padding:1rem 2rem;color:#222}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}\
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
details{margin:.3rem 0}summary{cursor:pointer}.figure{margin:1rem 0}.meta{color:#666;font-size:.9rem}
nav a{margin-right:1rem}.wide{overflow-x:auto}.warn{background:#fff3cd;padding:.5rem;border:1px solid #e0c36c}
"""


def _title(result: RunResult) -> str:
    model = result_model_name(result) or "model"
    return f"Knowledge superposition: {model}, {len(result.facts)} facts, layers {result.layers[0]}–{result.layers[-1]}"


def build_report(
    result: RunResult,
    extra_sections: Sequence[SectionLike] = (),
    names: Sequence[str] | None = None,
    top_k: int = 10,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    sections: Sequence[SectionProvider] = (),
    thin: bool = False,
    self_contained: bool = False,
) -> Report:
    """Return the rendered report: standard sections, then those of each provider in `sections`, then extra_sections
    (thin: see standard_sections; self_contained: Plotly inside the HTML, else loaded from plotly.min.js beside it)."""
    if top_k < 1:
        raise KisError(f"top_k must be at least 1, got {top_k}")
    built = standard_sections(result, names, top_k, threshold, thin)
    for provider in sections:
        built.extend(as_section(section) for section in provider(result))
    built.extend(as_section(section) for section in extra_sections)
    parts: list[str] = []
    n_figures = 0
    for number, section in enumerate(built, start=1):
        parts.append(f'<section id="section-{number}"><h2>{html.escape(section.title)}</h2>')
        if section.intro:
            parts.append(f"<p>{html.escape(section.intro)}</p>")
        for figure in section.figures:
            n_figures += 1
            div = figure.to_html(
                full_html=False,
                include_plotlyjs=False,
                div_id=f"figure-{n_figures}",
                config={"displaylogo": False, "responsive": True},
            )
            parts.append(f'<div class="figure">{div}</div>')
        parts.append(section.html)
        parts.append("</section>")
    title = _title(result)
    nav = "".join(f'<a href="#section-{n}">{html.escape(s.title)}</a>' for n, s in enumerate(built, start=1))
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = html.escape(str(result.path)) if result.path else "in memory"
    plotly = (
        f'<script type="text/javascript">{get_plotlyjs()}</script>'
        if self_contained
        else f'<script type="text/javascript" charset="utf-8" src="{PLOTLY_BUNDLE}"></script>'
    )
    document = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"{plotly}</head><body>{_MISSING_PLOTLY}"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">kis_lens {__version__} · {created} · results: {source} · {html.escape(PAPER)}</p>'
        f"<nav>{nav}</nav>{''.join(parts)}</body></html>"
    )
    return Report(document, n_figures, [section.title for section in built], None if self_contained else PLOTLY_BUNDLE)


def write_report(
    result: RunResult,
    path: str | Path | None = None,
    extra_sections: Sequence[SectionLike] = (),
    names: Sequence[str] | None = None,
    top_k: int = 10,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    sections: Sequence[SectionProvider] = (),
    thin: bool = False,
    self_contained: bool = False,
) -> Path:
    """Write the report HTML atomically (default: report.html beside the results), with plotly.min.js beside it
    unless self_contained, and return its path."""
    if path is None:
        if result.path is None:
            raise KisError("this result was never saved: pass a path for the report")
        path = report_path(result.path)
    report = build_report(
        result, extra_sections, names, top_k, threshold, sections=sections, thin=thin, self_contained=self_contained
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if report.bundle is not None:
        write_plotly_bundle(path.parent)
    return atomic_write(path, lambda temp: temp.write_text(report.html, encoding="utf-8"))


def write_report_files(
    result: RunResult,
    output: str | Path | None = None,
    top_k: int = 10,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    sections: Sequence[SectionProvider] = (),
    thin: bool = False,
    self_contained: bool = False,
) -> tuple[Path, Path]:
    """Write a run's report.html (with the providers' `sections`) and layer_summary.csv beside it; return both paths."""
    written = write_report(
        result,
        output,
        top_k=top_k,
        threshold=threshold,
        sections=sections,
        thin=thin,
        self_contained=self_contained,
    )
    return written, write_csv(summary_table(result, threshold=threshold), summary_csv_path(written))


def report_from_results(
    results: str | Path,
    output: str | Path | None = None,
    top_k: int = 10,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    sections: Sequence[SectionProvider] = (),
    thin: bool = False,
    self_contained: bool = False,
) -> tuple[Path, Path]:
    """Load a saved run (folder, file, or output dir with one run) and write its report and CSV; return both paths."""
    return write_report_files(
        load_result(find_results(results)),
        output,
        top_k,
        threshold,
        sections=sections,
        thin=thin,
        self_contained=self_contained,
    )
