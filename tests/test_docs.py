"""The README and docs/ stay true to the tree: links, anchors and the files they name exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A repository path in backticks: a top-level folder of the tree, then a path without
# placeholders (`<name>`, `...`), e.g. `pimc_dist/eval/`, `configs/data/demo.yaml`.
TREE_PATH = re.compile(r"`((?:pimc_dist|configs|bench|slurm|tests|docs)/[\w./*-]*)`")
README_MAX_LINES = 150
# The pages the README links directly.
README_LINKS = (
    "usage.md",
    "datasets.md",
    "slurm.md",
    "performance.md",
    "quality.md",
    "development.md",
)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link {target!r}: {dest} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: link {target!r}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_repository_path_the_text_names_exists(page):
    for path in TREE_PATH.findall(page.read_text()):
        assert list(REPO.glob(path.rstrip("/"))), f"{page.name}: `{path}` is not in the tree"


def test_readme_is_a_short_front_door_that_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
    assert lines[2:6] == [
        "```bash",
        "bash dev.sh demo    # set up .venv, then shard, pretrain (DeepSpeed, 2 CPU ranks), "
        "evaluate the built-in dataset",
        "bash dev.sh test    # set up .venv, then run the test suite",
        "```",
    ]
    linked = {t.partition("#")[0] for t in relative_links(REPO / "README.md")}
    assert {f"docs/{name}" for name in README_LINKS} <= linked


def test_every_docs_page_is_reachable_from_the_readme():
    reachable = {
        (page.parent / t.partition("#")[0]).resolve()
        for page in PAGES
        for t in relative_links(page)
        if t.partition("#")[0]
    }
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in reachable]
    assert not orphans, f"docs pages no page links: {orphans}"
