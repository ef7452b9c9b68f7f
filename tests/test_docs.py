"""The README and docs/ pages: every relative link points at a file that exists, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace or ")" (a title may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)")


def relative_links(markdown: str) -> list[str]:
    """Targets of the Markdown links in `markdown` that are neither URLs nor in-page anchors, fenced code skipped."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    return [target for target in LINK.findall(prose) if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)]


def test_the_link_finder_sees_links_and_images_and_skips_urls_anchors_and_code():
    text = "[a](docs/x.md) ![b](y.png \"t\") [c](https://e.org) [d](#top)\n```\n[e](z.md)\n```\n[f](w.md#part)"
    assert relative_links(text) == ["docs/x.md", "y.png", "w.md#part"]


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_points_at_a_file(page):
    missing = [target for target in relative_links(page.read_text())
               if not (page.parent / target.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"


def test_the_readme_is_short_and_every_doc_page_is_linked_from_it():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {Path(target.split("#")[0]).name for target in relative_links(readme)}
    assert {page.name for page in PAGES[1:]} <= linked
