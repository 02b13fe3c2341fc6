"""The repository stands alone: every document the code and docs cite is in the repository.

Citations look like ``docs/method.md §2.4`` or ``docs/checkpoint_formats.md §8(a)``; each must
name an existing file and a section heading that exists in it. Names of design notes kept outside
the repository must not appear at all.
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([\w\-]+\.md)(?:\s+§(\d+(?:\.\d+)?(?:\([a-z]\))?))?")
# Names of the design notes kept outside the repository, spelled in pieces so that this file
# does not itself contain them.
OUTSIDE_NOTES = tuple("".join(parts) for parts in (
    ("SOCO", "_SPEC"), ("CHECKPOINT", "_FORMATS"), ("ARCHITECTURE", ".md"), ("STYLE", ".md"),
    ("spec", " §"), ("brief", " contract")))


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (e.g. an sdist): walk the tree instead
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    else:
        names = out.stdout.split()
    suffixes = {".py", ".md", ".yaml", ".yml", ".sh", ".toml"}
    return [ROOT / n for n in names if Path(n).suffix in suffixes and (ROOT / n).is_file()
            and not n.startswith(".venv")]


def _section_numbers(doc: Path):
    """Section numbers of a markdown file: ``## 8.`` → "8", ``### 2.4`` → "2.4", ``### 8(a)``."""
    numbers = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{2,4}\s+(\d+(?:\.\d+)?(?:\([a-z]\))?)[.\s]", line + " ")
        if m:
            numbers.add(m.group(1))
    return numbers


def test_no_citation_of_notes_outside_the_repository():
    offenders = []
    for path in _tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in OUTSIDE_NOTES:
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle!r}")
    assert not offenders, "cites notes that are not in the repository:\n" + "\n".join(offenders)


def test_every_cited_doc_and_section_exists():
    sections = {}
    missing = []
    for path in _tracked_text_files():
        for m in CITATION.finditer(path.read_text(encoding="utf-8", errors="replace")):
            doc = ROOT / "docs" / m.group(1)
            if not doc.is_file():
                missing.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)} does not exist")
                continue
            if m.group(2):
                have = sections.setdefault(doc, _section_numbers(doc))
                top = m.group(2).split(".")[0].split("(")[0]
                if m.group(2) not in have and not ("." in m.group(2) and top in have
                                                   and not any(h.startswith(top + ".") for h in have)):
                    missing.append(f"{path.relative_to(ROOT)}: docs/{m.group(1)} has no §{m.group(2)}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("doc,expected", [("method.md", {"1.1", "2.4", "3.7", "4.6", "8", "9"}),
                                          ("checkpoint_formats.md", {"1", "7", "8(a)", "9"})])
def test_section_parser_finds_headings(doc, expected):
    assert expected <= _section_numbers(ROOT / "docs" / doc)
