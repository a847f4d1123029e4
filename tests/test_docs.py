"""README.md and the docs/ pages: their Python examples run as written, and their relative links resolve.

A block fenced as ```python runs (each block in a fresh namespace, the blocks of a page in order); a
block that cannot run on a CPU machine is fenced as ```py or ```text and is not run."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]

# ```python opening a line, up to the first ``` that opens a line after it
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# [text](target) and ![alt](target); the target stops at whitespace or ")" (a title may follow)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def python_blocks(text: str) -> list[str]:
    return PYTHON_BLOCK.findall(text)


def relative_links(text: str) -> list[str]:
    """Link targets outside code, without URLs (scheme:) or absolute paths."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return [t for t in LINK.findall(prose) if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:|/", t)]


CODE_PAGES = [p for p in PAGES if python_blocks(p.read_text())]


def test_pages_found():
    assert len(PAGES) > 1 and ROOT / "README.md" in CODE_PAGES, PAGE_IDS


@pytest.mark.parametrize("page", CODE_PAGES, ids=[str(p.relative_to(ROOT)) for p in CODE_PAGES])
def test_python_blocks_run(page):
    for i, code in enumerate(python_blocks(page.read_text())):
        exec(compile(code, f"{page}, python block {i + 1}", "exec"), {"__name__": "__docs__"})


def test_readme_has_an_example_per_capability():
    code = "\n".join(python_blocks((ROOT / "README.md").read_text()))
    for name in ("sigmoid_focal_loss", "add_adapters", "tune_cascade", "evaluate"):
        assert f"fc.{name}(" in code, name


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ +(.+?) *$", FENCE.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links_exist(page):
    missing = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file.read_text())):
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files or headings: {missing}"


def test_link_check_sees_links_and_ignores_code():
    text = ("[a](docs/x.md) ![p](frontier.png \"t\") [u](https://e.org) [h](#top)\n"
            "`[c](no.md)`\n```text\n[d](no.md)\n```\n")
    assert relative_links(text) == ["docs/x.md", "frontier.png", "#top"]
    assert python_blocks("```python\nx = 1\n```\n```py\ny = 2\n```\n") == ["x = 1\n"]
    assert anchors("# Dice + focal for segmentation\n## fit\n```text\n# not a heading\n```\n") == {
        "dice--focal-for-segmentation", "fit"}
