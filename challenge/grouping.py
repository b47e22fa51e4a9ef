"""Which scoring group a file belongs to: the organisers' sheet, or folder names when there is none.

The official scorers (docs/cmrxrecon.md §6.3) read an Excel sheet per task with the columns `Center`,
`Manufacturer`, `AnonPatientID` and, for TaskR2/S1/S2, `Disease1..4` (validation scorer) or
`Disease1..5` (test scorer). Disease names are stripped, commas removed and spaces turned into `_`.

- TaskR1 groups by (sheet Center, sheet Manufacturer). The sheet row is found with the key
  "<Center>|<Manufacturer>|<AnonPatientID>" built from the sheet itself and looked up with the *folder*
  names, so a patient absent from the sheet (or filed under other names) lands in ("Unknown",
  "Unknown"), a group with no expected files that never enters the mean. The expected counts are per
  *folder* (Center, Vendor).
- TaskR2/S1/S2 group by disease: a file counts in every disease of its patient; the expected count of
  a disease adds every file of every patient listing it (twice if the sheet lists it twice, as the
  scorers do). A patient absent from the sheet is in no group.

Without a sheet every task is grouped by folder (Center, Vendor), which is what TaskR1 gives with a
complete sheet; for TaskR2/S1/S2 that is not the organisers' grouping, and `source` says so.

A sheet is read from `.xlsx` (one sheet per task, named like the task; read with the standard library)
or `.csv` (the same columns, plus an optional `Task` column; rows without one apply to every task).
"""

from __future__ import annotations

import csv
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

Group = tuple[str, ...]
TASKS = ("TaskR1", "TaskR2", "TaskS1", "TaskS2")
UNKNOWN: Group = ("Unknown", "Unknown")
# How many Disease<i> columns each scorer reads.
DISEASE_COLUMNS = {"val2025": 4, "test2025": 5}


class SheetError(ValueError):
    """A mapping sheet that cannot be used; the message names the file and the problem."""


def patient_key(center: str, vendor: str, patient: str) -> str:
    """The scorers' `make_key`: "<Center>|<Vendor>|<Patient>"."""
    return f"{center}|{vendor}|{patient}"


def clean_disease(name: str) -> str:
    """A disease cell as the scorers normalise it: stripped, commas removed, spaces -> "_"."""
    return name.strip().replace(",", "").replace(" ", "_")


@dataclass
class GroupMap:
    """Groups of files per task, from a sheet or from folder names."""

    source: str = "folder names"  # what was used, for the user
    # task -> patient key -> row (column -> cell text); empty: folder names
    rows: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)

    def has_sheet(self, task: str) -> bool:
        return task in self.rows

    def summary_name(self, task: str) -> str:
        """"centers" or "diseases", as in `Mean_of_all_<name>_*_adj`."""
        return "diseases" if task != "TaskR1" and self.has_sheet(task) else "centers"

    def _diseases(self, row: dict[str, str], scorer: str) -> list[str]:
        n = DISEASE_COLUMNS.get(scorer, 5)
        cells = [row.get(f"Disease{i}", "") or "" for i in range(1, n + 1)]
        return [clean_disease(c) for c in cells if c.strip()]

    def file_groups(self, task: str, center: str, vendor: str, patient: str, scorer: str) -> list[Group]:
        """Groups a scored file counts in."""
        if not self.has_sheet(task):
            return [(center, vendor)]
        row = self.rows[task].get(patient_key(center, vendor, patient))
        if task == "TaskR1":
            return [(row["Center"], row["Manufacturer"])] if row else [UNKNOWN]
        return [(d,) for d in sorted(set(self._diseases(row, scorer)))] if row else []

    def expected_groups(self, task: str, center: str, vendor: str, patient: str, scorer: str) -> list[Group]:
        """Groups a reference file adds one expected file to (with the scorers' repeats)."""
        if not self.has_sheet(task) or task == "TaskR1":
            return [(center, vendor)]
        row = self.rows[task].get(patient_key(center, vendor, patient))
        return [(d,) for d in self._diseases(row, scorer)] if row else []


def load_group_map(path: str | Path | None) -> GroupMap:
    """The sheet at `path` (.xlsx or .csv), or folder-name grouping when `path` is empty."""
    if not path:
        return GroupMap()
    path = Path(path)
    if not path.is_file():
        raise SheetError(f"{path}: mapping sheet not found")
    if path.suffix.lower() == ".xlsx":
        tables = _read_xlsx(path)
    elif path.suffix.lower() == ".csv":
        tables = _read_csv(path)
    else:
        raise SheetError(f"{path}: mapping sheet must be .xlsx or .csv")
    rows: dict[str, dict[str, dict[str, str]]] = {}
    for task, table in tables.items():
        for i, row in enumerate(table):
            missing = [c for c in ("Center", "Manufacturer", "AnonPatientID") if c not in row]
            if missing:
                raise SheetError(f"{path}: sheet {task} row {i + 2} lacks column(s) {missing}")
            rows.setdefault(task, {})[patient_key(row["Center"], row["Manufacturer"], row["AnonPatientID"])] = row
    if not rows:
        raise SheetError(f"{path}: no sheet named like a task ({', '.join(TASKS)}) with rows")
    return GroupMap(f"sheet {path} ({', '.join(sorted(rows))})", rows)


def _read_csv(path: Path) -> dict[str, list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        table = [{k.strip(): (v or "") for k, v in r.items() if k} for r in csv.DictReader(fh)]
    out: dict[str, list[dict[str, str]]] = {}
    for row in table:
        task = row.get("Task", "").strip()
        for t in ([task] if task else TASKS):
            out.setdefault(t, []).append(row)
    return out


_NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
       "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships"}


def _col(ref: str) -> int:
    """0-based column of a cell reference ("C7" -> 2)."""
    letters = re.match(r"[A-Z]+", ref)
    n = 0
    for ch in letters.group(0) if letters else "A":
        n = n * 26 + ord(ch) - 64
    return n - 1


def _read_xlsx(path: Path) -> dict[str, list[dict[str, str]]]:
    """Sheets named like a task, as lists of {header: cell text} (every cell as text, as dtype=str)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            shared = []
            if "xl/sharedStrings.xml" in names:
                for si in ElementTree.fromstring(z.read("xl/sharedStrings.xml")).findall("m:si", _NS):
                    shared.append("".join(t.text or "" for t in si.iter(f"{{{_NS['m']}}}t")))
            rels = {r.get("Id"): r.get("Target") for r in ElementTree.fromstring(z.read("xl/_rels/workbook.xml.rels"))}
            out = {}
            for sheet in ElementTree.fromstring(z.read("xl/workbook.xml")).find("m:sheets", _NS):
                name = sheet.get("name", "")
                if name not in TASKS:
                    continue
                target = rels[sheet.get(f"{{{_NS['r']}}}id")].lstrip("/")
                target = target if target.startswith("xl/") else f"xl/{target}"
                grid = []
                for row in ElementTree.fromstring(z.read(target)).iter(f"{{{_NS['m']}}}row"):
                    cells: dict[int, str] = {}
                    for c in row.findall("m:c", _NS):
                        kind, v = c.get("t"), c.find("m:v", _NS)
                        if kind == "s" and v is not None:
                            text = shared[int(v.text)]
                        elif kind == "inlineStr":
                            text = "".join(t.text or "" for t in c.iter(f"{{{_NS['m']}}}t"))
                        else:
                            text = v.text if v is not None and v.text else ""
                        cells[_col(c.get("r", "A1"))] = text
                    grid.append([cells.get(i, "") for i in range(max(cells) + 1)] if cells else [])
                if grid:
                    header = [h.strip() for h in grid[0]]
                    out[name] = [dict(zip(header, r + [""] * (len(header) - len(r)))) for r in grid[1:] if any(r)]
            return out
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError) as exc:
        raise SheetError(f"{path}: not a readable .xlsx workbook ({exc})") from None
