"""Walk a CMRxRecon (2023/2024/2025, training or validation) or fastMRI tree into `Case` records.

A case is one k-space file to convert, with everything the path tells about it (docs/cmrxrecon.md §2)::

    2025 training   ChallengeData/MultiCoil/<Mod>/TrainingSet/FullSample/<Center>/<Scanner>/P###/<file>.mat
                    (+ <file>_info.csv; masks in Mask_TaskAll/<same>/<file>_mask_<Pattern><R>.mat)
    2025 val-style  ChallengeData_ValSet/<Task>/MultiCoil/<Mod>/ValidationSet/UnderSample_<Task>/<Center>/
                    <Scanner>/P###/<file>_kus_<Pattern><R>.mat (+ Mask_<Task>/..., optional hidden
                    reference FullSample_<Task>/.../<file>.mat); TestSet likewise
    2024            ChallengeData/MultiCoil/<Mod>/TrainingSet/FullSample/P###/<file>.mat (kspace_full;
                    masks in Mask_Task1, Mask_Task2; info csv in ImgSnapshot/P###/);
                    ValidationSet/UnderSample_Task<N>/P###/<file>_kus_<mask>.mat
    2023            ChallengeData/MultiCoil/<Mod>/<Train|Val>Set/{FullSample,AccFactor04,08,10}/P###/<file>.mat
                    (+ <file>_mask.mat in the AccFactor folders)
    fastMRI         any folder of *.h5 files (multicoil_train/, multicoil_val/, ...)

The year is read from the layout: center/scanner levels -> 2025; AccFactorNN folders -> 2023;
otherwise 2024 (a 2023 FullSample-only tree looks exactly like 2024: pass `year=` to say so).
An empty or unrecognised folder raises LayoutError naming it; single files that fit no rule are
returned in `Scan.ignored` with the reason, so the converter can record them.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.trees import find_files

SPLITS = {"TrainingSet": "train", "ValidationSet": "val", "TestSet": "test"}
_SCANNER = re.compile(r"^(?P<vendor>[A-Za-z]+)_(?P<field>\d+)T_(?P<model>.+)$")
_PATIENT = re.compile(r"^P\d+$")
_KUS = re.compile(r"^(?P<file>.+)_kus_(?P<pattern>[A-Za-z]+?)(?P<R>\d+)$")
_MASK = re.compile(r"^(?P<file>.+)_mask(_(?P<pattern>[A-Za-z]+?)(?P<R>\d+))?$")
_ACC = re.compile(r"^AccFactor(?P<R>\d+)$")
#: the single scanner of the 2023 and 2024 releases (one center, 3.0 T Siemens Vida).
_SINGLE_SITE_SCANNER = "Siemens_30T_Vida"


class LayoutError(ValueError):
    """A folder that is empty or holds no recognisable CMRxRecon / fastMRI layout."""


@dataclass
class Case:
    """One k-space file to convert and what its path says about it."""

    year: int | None            # 2023 | 2024 | 2025; None for fastMRI
    split: str                  # "train" | "val" | "test"
    task: str                   # "TaskAll" (training) | "TaskR1".. | "Task1".. | "AccFactor04"..
    set: str                    # "FullSample" | "UnderSample"
    center: str                 # "Center005" or "" (2023/2024/fastMRI)
    scanner: str                # "Siemens_30T_Vida" or ""
    vendor: str
    field_T: float | None
    model: str
    patient: str                # "P003" (fastMRI: the file stem)
    modality: str               # "Cine", "Mapping", ... ("fastMRI")
    file: str                   # file stem without _kus_<P><R>: "cine_lax_4ch"
    view: str                   # "lax_4ch" | "sax" | ""
    kspace_path: Path
    source: str                 # kspace_path relative to the input root (posix)
    mask_paths: list[Path] = field(default_factory=list)   # acquired mask (UnderSample) or Mask_TaskAll set
    reference_path: Path | None = None                      # hidden fully sampled reference, if present
    pattern: str | None = None  # acquired pattern of an UnderSample file
    R: int | None = None
    info: dict[str, Any] = field(default_factory=dict)      # <file>_info.csv

    @property
    def stem(self) -> str:
        """The k-space file stem (keeps _kus_<P><R>): part of the sample key."""
        return self.kspace_path.stem


@dataclass
class Scan:
    cases: list[Case]
    ignored: list[tuple[str, str]]   # (source path, reason)


def parse_scanner(name: str) -> tuple[str, float | None, str]:
    """'Siemens_30T_Vida' -> ('Siemens', 3.0, 'Vida'); unknown forms -> (name, None, '')."""
    m = _SCANNER.match(name)
    if not m:
        return name, None, ""
    return m["vendor"], int(m["field"]) / 10.0, m["model"]


def view_of(file: str) -> str:
    """'cine_lax_4ch' -> 'lax_4ch', 'lge_sax' -> 'sax', 'aorta_tra' -> 'tra', 'T1map' -> ''."""
    head, sep, rest = file.partition("_")
    return rest if sep and head.lower() in ("cine", "lge", "aorta") else ""


def read_info(path: Path) -> dict[str, Any]:
    """`Parameter,Value` rows -> dict (numbers as float); a missing or unreadable file -> {}."""
    out: dict[str, Any] = {}
    try:
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) < 2 or not row[0].strip() or row[0].strip().lower() == "parameter":
                    continue
                key, value = row[0].strip(), row[1].strip()
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return out


def _set_index(parts: tuple[str, ...]) -> int | None:
    for i, p in enumerate(parts):
        if p in SPLITS:
            return i
    return None


def _classify(root: Path, path: Path, year_hint: int | None) -> Case | str | None:
    """A Case, None (a side file: mask, hidden reference), or a reason string (unrecognised)."""
    rel = path.relative_to(root)
    parts = rel.parts
    stem = path.stem
    i = _set_index(parts)
    if i is None or i < 1 or len(parts) < i + 4:
        return "not under <Modality>/<TrainingSet|ValidationSet|TestSet>/<set>/[...]/P###/"
    modality, split, set_dir = parts[i - 1], SPLITS[parts[i]], parts[i + 1]
    sub = parts[i + 2:-1]            # [Center, Scanner, P###] (2025) or [P###] (2023/2024)
    base = root.joinpath(*parts[: i + 1])
    if set_dir.startswith("Mask_") or set_dir.startswith("FullSample_") or set_dir == "ImgSnapshot" \
            or _MASK.match(stem):
        return None                   # side files, attached to the case they belong to
    if not sub or not _PATIENT.match(sub[-1]):
        return f"expected a P### patient folder, got {sub[-1] if sub else '(none)'!r}"
    if len(sub) == 3:
        center, scanner, patient = sub
        year = year_hint or 2025
    elif len(sub) == 1:
        center, scanner, patient = "", _SINGLE_SITE_SCANNER, sub[0]
        year = year_hint or (2023 if any(_ACC.match(p.name) for p in base.iterdir()) else 2024)
    else:
        return f"unexpected folder depth under {set_dir} ({'/'.join(sub)})"
    vendor, field_T, model = parse_scanner(scanner)
    tail = Path(*sub)
    kus, acc = _KUS.match(stem), _ACC.match(set_dir)
    task, set_, pattern, R, masks, ref = "TaskAll", "FullSample", None, None, [], None
    file = stem
    if set_dir == "FullSample":
        # training-style: every Mask_* folder beside FullSample holds masks for this file
        for mdir in sorted(p for p in base.iterdir() if p.name.startswith("Mask_")):
            masks += sorted((mdir / tail).glob(f"{stem}_mask_*.mat"))
    elif set_dir.startswith("UnderSample_") and kus:
        task, set_, file = set_dir.removeprefix("UnderSample_"), "UnderSample", kus["file"]
        pattern, R = kus["pattern"], int(kus["R"])
        m = base / f"Mask_{task}" / tail / f"{file}_mask_{pattern}{R}.mat"
        masks = [m] if m.exists() else []
        r = base / f"FullSample_{task}" / tail / f"{file}.mat"
        ref = r if r.exists() else None
    elif acc:
        task, set_, pattern, R = set_dir, "UnderSample", "Uniform", int(acc["R"])
        m = path.with_name(f"{stem}_mask.mat")
        masks = [m] if m.exists() else []
        r = base / "FullSample" / tail / f"{stem}.mat"
        ref = r if r.exists() else None
    else:
        return f"unrecognised set folder {set_dir!r} or file name {path.name!r}"
    info_path = path.with_name(f"{file}_info.csv")
    if not info_path.exists():
        info_path = base / "ImgSnapshot" / tail / f"{file}_info.csv"   # 2024 keeps them there
    return Case(year=year, split=split, task=task, set=set_, center=center, scanner=scanner, vendor=vendor,
                field_T=field_T, model=model, patient=patient, modality=modality, file=file,
                view=view_of(file), kspace_path=path, source=rel.as_posix(), mask_paths=masks,
                reference_path=ref, pattern=pattern, R=R, info=read_info(info_path))


def _fastmri_case(root: Path, path: Path) -> Case:
    folder = path.parent.name.lower()
    split = "val" if "val" in folder else "test" if "test" in folder else "train"
    return Case(year=None, split=split, task="TaskAll", set="FullSample", center="", scanner="", vendor="",
                field_T=None, model="", patient=path.stem, modality="fastMRI", file=path.stem, view="",
                kspace_path=path, source=path.relative_to(root).as_posix())


def scan(root: str | os.PathLike, year: int | None = None) -> Scan:
    """Every convertible file under `root`, sorted by path. Raises LayoutError for a missing, empty
    or unrecognised folder (the message names it)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    found, walk_problems = find_files(root)           # symlinked folders followed; broken links reported
    files = [p for p in found if p.suffix in (".mat", ".h5")]
    if not files:
        raise LayoutError(f"{root}: empty folder (no .mat or .h5 files below it)"
                          + (f"; {len(walk_problems)} entries could not be walked: {walk_problems[0]}" if walk_problems else ""))
    cases, ignored = [], []
    for problem in walk_problems:
        where, _, why = problem.partition(": ")
        try:
            where = Path(where).relative_to(root).as_posix()
        except ValueError:
            pass
        ignored.append((where, why))
    for path in files:
        if path.suffix == ".h5":
            cases.append(_fastmri_case(root, path))
            continue
        got = _classify(root, path, year)
        if isinstance(got, Case):
            cases.append(got)
        elif isinstance(got, str):
            ignored.append((path.relative_to(root).as_posix(), got))
    if not cases:
        example = ignored[0] if ignored else ("?", "?")
        raise LayoutError(f"{root}: unrecognised folder: none of its {len(files)} .mat/.h5 files fits a "
                          f"CMRxRecon 2023/2024/2025 or fastMRI layout (e.g. {example[0]}: {example[1]})")
    return Scan(cases=cases, ignored=ignored)


def find_cases(root: str | os.PathLike, year: int | None = None) -> list[Case]:
    """The cases of `root` (see `scan`)."""
    return scan(root, year).cases
