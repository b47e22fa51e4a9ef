"""Every `docs/<file>.md §N` the code, tests, scripts and README cite resolves to a real file and a real
section of the repo's own docs/ (and every cited trap number exists in docs/cmrxrecon.md §8)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/([a-z_]+)\.md(?:\s*§\s*(\d+(?:\.\d+)?))?")
TRAP = re.compile(r"traps? (\d+)(?:-(\d+))?")


def cited_files() -> list[Path]:
    kinds = ("*.py", "*.sh", "*.sbatch", "*.toml", "*.md", "*.yaml")
    return sorted(p for k in kinds for p in ROOT.rglob(k)
                  if ".git" not in p.parts and ".venv" not in p.parts and "out" not in p.parts[len(ROOT.parts):][:1])


def sections(doc: Path) -> set[str]:
    """'2', '2.2', ... from headings '## 2. Title' / '### 2.2 Title' / '### 10.2 Title'."""
    found = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"^#{2,4}\s+(\d+(?:\.\d+)?)\.?\s", line)
        if m:
            found.add(m.group(1))
    return found


def test_every_doc_citation_resolves() -> None:
    problems, n = [], 0
    for path in cited_files():
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in CITE.finditer(line):
                n += 1
                doc = ROOT / "docs" / f"{m.group(1)}.md"
                where = f"{path.relative_to(ROOT)}:{line_no}"
                if not doc.is_file():
                    problems.append(f"{where}: cites {doc.relative_to(ROOT)}, which does not exist")
                elif m.group(2) and m.group(2) not in sections(doc):
                    problems.append(f"{where}: cites {doc.name} §{m.group(2)}, which has no such section")
    assert n > 20, f"only {n} citations found: the scanner is broken"
    assert not problems, "\n".join(problems)


def test_every_cited_trap_exists() -> None:
    text = (ROOT / "docs" / "cmrxrecon.md").read_text()
    traps = text.split("## 8.", 1)[1].split("\n## ", 1)[0]
    numbers = {int(m.group(1)) for m in re.finditer(r"^(\d+)\. ", traps, re.M)}
    assert numbers == set(range(1, max(numbers) + 1)) and max(numbers) >= 18
    cited = set()
    for path in cited_files():
        if path.suffix == ".md" and path.parent.name == "docs":
            continue
        for m in TRAP.finditer(path.read_text(errors="replace")):
            cited |= set(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    assert cited and cited <= numbers, sorted(cited - numbers)
