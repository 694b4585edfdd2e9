"""docs/RESULTS.md stays navigable: its contents list matches its headings, and every
``section "..."`` it cites names a heading that exists (sections get renamed as results move);
the citations of one document by another (``BENCHMARKS.md, "The main job"``), in the docs,
the code's comments and the configs, name a heading or a bold paragraph of it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "RESULTS.md"
CITED_DOCS = ("RESULTS", "BENCHMARKS", "RELIABILITY", "ARCHITECTURE")
# RESULTS "Heading", BENCHMARKS.md, "Heading", `docs/RESULTS.md`, section "Heading"
CROSS_CITATION = re.compile(r'\b(' + "|".join(CITED_DOCS) + r')(?:\.md)?`?,?\s+(?:section\s+)?"([^"]{3,200})"')


def _words(text: str) -> str:
    return " ".join(text.split())


def _headings(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2)) for m in re.finditer(r"^(##+) (.*)$", text, re.M)]


def _github_anchor(title: str, seen: dict[str, int]) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens, -1, -2 on repeats."""
    slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return f"{slug}-{count}" if count else slug


def contents_lines(text: str) -> list[str]:
    """The contents list RESULTS.md should carry (print it: ``python tests/test_docs.py``)."""
    seen: dict[str, int] = {}
    return [f"{'  ' * (level - 2)}- [{title}](#{_github_anchor(title, seen)})" for level, title in _headings(text)]


def test_the_contents_list_is_every_heading_in_order():
    text = RESULTS.read_text(encoding="utf-8")
    contents = text.split("<details><summary>Contents", 1)[1].split("</details>", 1)[0]
    listed = [line for line in contents.splitlines() if line.strip().startswith("- [")]
    assert listed == contents_lines(text), "out of date: `python tests/test_docs.py` prints the list"


def test_every_cited_section_exists():
    text = RESULTS.read_text(encoding="utf-8")
    headings = [_words(title) for _, title in _headings(text)]
    cited = set()
    for match in re.finditer(r'sections?\s+"([^"]+)"((?:,?\s*(?:and\s+)?"[^"]+")*)', text):
        cited.add(_words(match.group(1)))
        cited.update(_words(name) for name in re.findall(r'"([^"]+)"', match.group(2)))
    # a citation may abbreviate with a leading "..." or quote part of a long heading
    missing = sorted(name for name in cited
                     if not name.startswith("...") and not any(name.rstrip(".,") in h for h in headings))
    assert len(cited) > 20 and missing == []


def _citing_files() -> list[Path]:
    return [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("benchmarks/**/*.md"),
            *REPO.glob("benchmarks/*.py"), *REPO.glob("ntp_ssl/**/*.py"), *REPO.glob("encoders/**/*.py"),
            *REPO.glob("configs/**/*.yaml"), *(p for p in REPO.glob("tests/*.py") if p.name != Path(__file__).name)]


def test_every_citation_of_another_document_names_a_heading_or_bold_paragraph_of_it():
    texts = {name: (REPO / "docs" / f"{name}.md").read_text(encoding="utf-8") for name in CITED_DOCS}
    targets = {name: [_words(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)]
               + [_words(bold) for bold in re.findall(r"\*\*(.+?)\*\*", text, re.S)]
               for name, text in texts.items()}
    cited, missing = 0, []
    for path in _citing_files():
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".py", ".yaml"):
            text = re.sub(r"\s*\n\s*#\s*", " ", text)  # a comment's wrapped lines, joined
        for match in CROSS_CITATION.finditer(text):
            document, name = match.group(1), _words(match.group(2)).rstrip(".,")
            cited += 1
            if not name.startswith("...") and not any(name in target for target in targets[document]):
                missing.append(f"{path.relative_to(REPO)}: {document} {name!r}")
    assert cited > 20 and missing == []


if __name__ == "__main__":
    print("\n".join(contents_lines(RESULTS.read_text(encoding="utf-8"))))
