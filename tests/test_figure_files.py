"""kis_lens.figure_files: figures written as HTML that opens offline, the same bytes when redrawn unchanged."""

from __future__ import annotations

import plotly.graph_objects as go

from kis_lens.figure_files import PLOTLY_BUNDLE, write_html_figures


def test_a_figure_redrawn_unchanged_is_the_same_file(tmp_path):
    def draw() -> go.Figure:
        return go.Figure(go.Scatter(y=[1.0, 3.0, 2.0]))

    first = write_html_figures({"curve": draw()}, tmp_path / "a")["curve"]
    again = write_html_figures({"curve": draw()}, tmp_path / "b")["curve"]
    assert first.read_bytes() == again.read_bytes()
    text = first.read_text(encoding="utf-8")
    assert 'id="curve"' in text and f'src="{PLOTLY_BUNDLE}"' in text and (first.parent / PLOTLY_BUNDLE).is_file()
