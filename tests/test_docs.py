"""docs/RESULTS.md stays navigable: its contents list matches its headings, and every
``section "..."`` it cites names a heading that exists (sections get renamed as results move)."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"


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


if __name__ == "__main__":
    print("\n".join(contents_lines(RESULTS.read_text(encoding="utf-8"))))
