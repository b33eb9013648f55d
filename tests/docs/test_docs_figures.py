"""Every figure in docs/ works offline: HTML loads Plotly from a file beside it, Markdown embeds a static image."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_every_html_figure_loads_plotly_from_beside_it():
    pages = sorted(DOCS.rglob("*.html"))
    assert pages
    for page in pages:
        sources = re.findall(r'<script[^>]*\bsrc="([^"]+)"', page.read_text(encoding="utf-8"))
        assert sources, f"{page.relative_to(ROOT)} loads no Plotly"
        for source in sources:
            assert "://" not in source and not source.startswith("//"), f"{page.relative_to(ROOT)} loads {source}"
            assert (page.parent / source).is_file(), f"{page.relative_to(ROOT)} needs {source} beside it"


def test_every_markdown_figure_is_a_static_image_that_exists():
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        html_links = re.findall(r"\]\(([^)]+\.html)\)", text)
        for image in images:
            assert image.endswith((".png", ".svg")), f"{doc.name} embeds {image}"
            assert (doc.parent / image).is_file(), f"{doc.name} embeds {image}, which does not exist"
        embedded = {Path(image).with_suffix("").name for image in images}
        for link in html_links:  # an interactive figure always has its static image in the page too
            assert Path(link).with_suffix("").name in embedded, f"{doc.name} links {link} without its image"
