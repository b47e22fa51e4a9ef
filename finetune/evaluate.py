"""Score reconstruction trees as the CMRxRecon2025 organisers do, with tables and figures.

    python -m finetune.evaluate --set recon=<submission tree> --set reference=<FullSample tree> \
        [--set 'methods=zero_filled=DIR2,classical=DIR3'] [--set out=runs/eval] [--set challenge_exact=false] \
        [--set 'scorers=val2025,test2025'] [--set mapping=Disease_Info.xlsx]

A tree may also be the packed `Submission.zip` (`python -m finetune.submission`): it is unpacked to a
temporary folder and scored from where the validation scorer would score it.

Scorers (challenge.metrics): "val2025" (the validation scorer) and "test2025" (the test-phase scorer
that made the final ranking: it squeezes both arrays first). Both are reported by default, the first in
`scorers` is the primary one (results.json, tables, figures); "clean" (ground truth always the
reference, nothing squeezed) is reported beside them. Groups come from the organisers' sheet
(`mapping=`, .xlsx or .csv, challenge.grouping) or from folder names; which one is printed.

Each reconstruction file `.../UnderSample_<Task>/<Center>/<Vendor>/P###/<file>_kus_<Pattern><R>.mat`
(variable `img4ranking`) is paired with the hidden `.../FullSample_<Task>/<Center>/<Vendor>/P###/<file>.mat`.
A reference file holding `img4ranking` is used as it is (the organisers' ground truth); one holding
k-space gets its img4ranking computed with `challenge.ranking` (RSS, crop, slices, frames).

Writes under `out` (every file under a temporary name, then renamed):
- `per_file.csv`: one row per (method, file), both metric variants, status and comment;
- `per_center_vendor.csv`: adjusted means per (Center, Vendor), as the scorer aggregates;
- `per_contrast_pattern_R.csv`: means per contrast x sampling pattern x R (parsed from the kus name);
- `problems.csv`: missing, extra, shape-mismatched and unreadable files, each named;
- `results.json`: the organisers' `Result/results.json` for the first method and first task;
  `results_all.json`: {method: {task: {"val2025": ..., "test2025": ..., "clean": ...}}};
- `figures/bars_center_vendor.png`, `figures/bars_contrast_pattern_R.png`, `figures/case_*.png`
  (image grid: each method, the reference, and error maps);
- `eval_config.toml`: the resolved config.

Bad input never stops the run: a reference file with no reconstruction counts 0 and is listed; a file
off the layout's depth (a tree nested inside the submission, e.g. `<out>/_zero_filled`) or a second
file for a case already found is refused: named in problems.csv, never scored, exit status 3; an extra
reconstruction (no reference) is listed (in challenge-exact mode with the note that the official
validation scorer stops on it); a shape mismatch scores NaN and counts 0; an unreadable file is named.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from challenge.archive import extract_archive
from challenge.grouping import GroupMap, load_group_map
from challenge.metrics import (
    SCORERS, FileScore, Group, MetricError, missing_groups, results_json, score_file, summarise_groups,
)
from challenge.ranking import img4ranking_from_kspace
from challenge.submission import (
    IMG4RANKING_KEY, CaseId, SubmissionError, load_img4ranking, mat_keys, mat_version, parse_kus_path,
    parse_reference_path,
)
from finetune.settings import EvalConfig
from launch.outputs import EXIT_SKIPPED, write_atomic
from launch.trees import find_files
from shards.matfile import MatFileError, read_kspace

MatchKey = tuple[str, str, str, str, str, str, str]
STATUS_OK = "ok"
STATUS_NAN = "nan_metric"  # a valid file whose metric is NaN: counted as the scorers' pandas count it
STATUS_INF = "inf_metric"  # a valid file with an infinite metric (other than identical images' PSNR)
SCORED = (STATUS_OK, STATUS_NAN, STATUS_INF, "shape_mismatch", "error")
CLEAN = "clean"
EXTRA_NOTE = "the official validation scorer stops with RuntimeError('Extra file submitted')"


@dataclass
class FileResult:
    """One (method, file) row of per_file.csv."""

    method: str
    case: CaseId
    status: str  # ok | nan_metric | missing | extra | shape_mismatch | error (of the primary variant)
    recon_path: str = ""
    reference_path: str = ""
    score: FileScore = field(default_factory=lambda: FileScore(math.nan, math.nan, math.nan, 0, "not scored"))
    clean: FileScore = field(default_factory=lambda: FileScore(math.nan, math.nan, math.nan, 0, "not scored"))
    comment: str = ""
    scores: dict[str, FileScore] = field(default_factory=dict)  # variant ("val2025", "test2025", "clean") -> score
    groups: list[Group] = field(default_factory=list)  # scoring groups under the primary variant


@dataclass
class Evaluation:
    """Everything `evaluate` computed: rows, per-task expected counts, organiser summaries."""

    methods: list[str]
    rows: list[FileResult]
    expected: dict[str, dict[Group, int]]  # task -> group -> reference files (primary variant)
    results: dict[str, dict[str, dict[str, dict[str, object]]]]  # method -> task -> variant -> json
    images: dict[tuple[str, MatchKey], np.ndarray] = field(default_factory=dict)  # for the case figures
    variants: list[str] = field(default_factory=lambda: [*SCORERS, CLEAN])  # the first is the primary
    grouping: str = "folder names"  # where the groups came from
    # (method, task, variant) -> groups with reference files but no valid file (left out of the
    # official Mean_of_all_*; counted as zero in the clean summary)
    dropped: dict[tuple[str, str, str], list[Group]] = field(default_factory=dict)
    expected_by_variant: dict[tuple[str, str], dict[Group, int]] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return self.variants[0]


def parse_methods(cfg: EvalConfig) -> list[tuple[str, Path]]:
    """[(name, dir)]: `recon` first (as `recon_name`), then each `methods` entry "name=DIR"."""
    out: list[tuple[str, Path]] = []
    if cfg.recon:
        out.append((cfg.recon_name, Path(cfg.recon)))
    for item in cfg.methods:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(f"methods entry {item!r}: expected name=DIR")
        out.append((name.strip(), Path(folder.strip())))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    for name, folder in out:
        if not folder.is_dir() and not (folder.is_file() and folder.suffix.lower() == ".zip"):
            raise ValueError(f"method {name}: reconstruction folder (or .zip archive) {folder} does not exist")
    return out


def index_reference(
    root: Path, task: str = ""
) -> tuple[dict[MatchKey, tuple[CaseId, Path]], list[SubmissionError]]:
    """Reference files under `root` (any depth, symlinked folders followed) in FullSample_<Task> folders."""
    refs: dict[MatchKey, tuple[CaseId, Path]] = {}
    files, skipped = find_files(root, "*.mat")
    problems: list[SubmissionError] = [SubmissionError(s.partition(": ")[0], s.partition(": ")[2]) for s in skipped]
    for path in files:
        if len(path.parts) < 5 or not path.parts[-5].startswith("FullSample_"):
            continue
        try:
            case = parse_reference_path(path)
        except SubmissionError as exc:
            problems.append(exc)
            continue
        if task and case.task != task:
            continue
        refs[case.match_key] = (case, path)
    return refs, problems


#: parts of a submission file's path below the submission root:
#: <Task>/MultiCoil/<Modality>/<Set>/UnderSample_<Task>/<Center>/<Vendor>/P###/<file>_kus_<Pattern><R>.mat
LAYOUT_DEPTH = 9


def index_recon(root: Path, task: str = "") -> tuple[list[tuple[CaseId, Path]], list[SubmissionError]]:
    """Reconstruction files `*_kus_*.mat` exactly at the submission layout's depth below `root`, with
    the files refused: a path that does not parse, a file deeper or shallower than the layout (another
    tree nested inside this one, e.g. a baseline written to `<out>/_zero_filled`), and a second file
    for a case already found. Refused files are named and never scored: each case counts once."""
    found: list[tuple[CaseId, Path]] = []
    files, skipped = find_files(root, "*_kus_*.mat")
    problems: list[SubmissionError] = [SubmissionError(s.partition(": ")[0], s.partition(": ")[2]) for s in skipped]
    first: dict[MatchKey, Path] = {}
    for path in files:
        depth = len(path.relative_to(root).parts)
        if depth != LAYOUT_DEPTH:
            problems.append(SubmissionError(path, f"unexpected file: {depth} levels below {root}, the submission layout "
                                                  f"has {LAYOUT_DEPTH} (a tree nested inside this one?); not scored"))
            continue
        try:
            case = parse_kus_path(path)
        except SubmissionError as exc:
            problems.append(exc)
            continue
        if task and case.task != task:
            continue
        if case.match_key in first:
            problems.append(SubmissionError(path, f"duplicate: {first[case.match_key]} is already the reconstruction "
                                                  f"of this case; not scored"))
            continue
        first[case.match_key] = path
        found.append((case, path))
    return found, problems


def _load_views(path: Path, variants: list[str]) -> dict[str, np.ndarray]:
    """`img4ranking` as each scorer's loader returns it: the same array for MAT v5; for v7.3 the
    validation loader keeps h5py's reversed axes and the test loader transposes them back."""
    if mat_version(path) == "v5":
        arr = np.asarray(load_img4ranking(path))
        return {v: arr for v in variants}
    return {v: np.asarray(load_img4ranking(path, reverse_h5_axes=(v != "val2025"))) for v in variants}


def reference_views(path: Path, case: CaseId, variants: list[str]) -> dict[str, np.ndarray]:
    """img4ranking of a reference file per variant: read as is, or computed from its k-space."""
    keys = mat_keys(path)
    if IMG4RANKING_KEY in keys:
        return _load_views(path, variants)
    arr = img4ranking_from_kspace(read_kspace(path), case.stem)
    return {v: arr for v in variants}


def reference_image(path: Path, case: CaseId) -> np.ndarray:
    """img4ranking of a reference file as the validation scorer reads it (k-space: computed)."""
    return reference_views(path, case, ["val2025"])["val2025"]


# Val_Score2025.py renames one mislabelled vendor folder of the validation release before scoring
# (docs/cmrxrecon.md §6.3); the test scorer does not, so it finds no reconstruction there.
VAL_RENAME = (("TaskR2", "Mapping", "Center004", "UIH_30T_umr780"), "UIH_15T_umr680")
RENAME_NOTE = ("Recon data missing: filed under Center004/UIH_30T_umr780, which only the validation scorer "
               "renames to UIH_15T_umr680")


def _val_renamed(case: CaseId) -> CaseId | None:
    """The case as the validation scorer sees it after its folder rename, or None if it does not apply."""
    (task, modality, center, vendor), new_vendor = VAL_RENAME
    if (case.task, case.modality, case.center, case.vendor) != (task, modality, center, vendor):
        return None
    return CaseId(case.task, case.modality, case.set_type, case.center, new_vendor, case.patient, case.stem,
                  case.file_name, case.pattern, case.R)


def _score_variant(recon: np.ndarray, ref: np.ndarray, name: str, variant: str) -> FileScore:
    try:
        if variant == CLEAN:
            return score_file(recon, ref, False, name)
        return score_file(recon, ref, True, name, scorer=variant)
    except MetricError as exc:
        return FileScore(math.nan, math.nan, math.nan, 0, str(exc))


def _status(score: FileScore) -> str:
    if score.valid:
        return STATUS_NAN if score.has_nan else STATUS_INF if score.has_inf else STATUS_OK
    return "shape_mismatch" if (score.comment or "").startswith("Shape mismatch") else "error"


def variants_of(cfg: EvalConfig) -> list[str]:
    """Scored variants, the primary first: the scorers in `cfg.scorers` order, then "clean"
    (with `challenge_exact=false`, "clean" first)."""
    bad = [s for s in cfg.scorers if s not in SCORERS]
    if bad or not cfg.scorers:
        raise ValueError(f"scorers must be a non-empty list of {list(SCORERS)}, got {cfg.scorers}")
    exact = list(dict.fromkeys(cfg.scorers))
    return exact + [CLEAN] if cfg.challenge_exact else [CLEAN] + exact


def _unpack(methods: list[tuple[str, Path]], stack: ExitStack) -> list[tuple[str, Path]]:
    """Archives (`Submission.zip`) are unpacked to a temporary folder, scored from where the scorer would."""
    out = []
    for name, folder in methods:
        if folder.is_file():
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"cmrfm-eval-{name}-"))
            folder = extract_archive(folder, tmp)
        out.append((name, folder))
    return out


def evaluate(cfg: EvalConfig) -> Evaluation:
    """Pair, score and aggregate every method's tree (or archive) against the reference tree."""
    with ExitStack() as stack:
        return _evaluate(cfg, stack)


def _evaluate(cfg: EvalConfig, stack: ExitStack) -> Evaluation:
    from tqdm import tqdm

    variants = variants_of(cfg)
    gmap: GroupMap = load_group_map(cfg.mapping)
    print(f"[evaluate] groups from {gmap.source}", file=sys.stderr)
    methods = _unpack(parse_methods(cfg), stack)
    if not methods:
        raise ValueError("nothing to evaluate: set recon=<dir> and/or methods=[\"name=DIR\"]")
    if not cfg.reference or not Path(cfg.reference).is_dir():
        raise ValueError(f"reference folder {cfg.reference!r} does not exist")
    refs, ref_problems = index_reference(Path(cfg.reference), cfg.task)
    for p in ref_problems:
        print(f"[evaluate] reference skipped: {p}", file=sys.stderr)
    if not refs:
        raise ValueError(f"no FullSample_<Task>/<Center>/<Vendor>/P###/*.mat files under {cfg.reference}")
    tasks = sorted({case.task for case, _ in refs.values()})
    n_refs = {t: sum(1 for case, _ in refs.values() if case.task == t) for t in tasks}
    for task in tasks:
        if task != "TaskR1" and not gmap.has_sheet(task):
            print(f"[evaluate] {task}: no mapping sheet, grouped by folder (Center, Vendor); the organisers "
                  "group it by disease (--set mapping=SHEET.xlsx)", file=sys.stderr)

    def scorer_of(variant: str) -> str:
        return variant if variant in SCORERS else "test2025"

    expected_by_variant: dict[tuple[str, str], dict[Group, int]] = {}
    for case, _ in refs.values():
        for v in variants:
            counts = expected_by_variant.setdefault((case.task, v), {})
            for g in gmap.expected_groups(case.task, case.center, case.vendor, case.patient, scorer_of(v)):
                counts[g] = counts.get(g, 0) + 1
    for task in tasks:
        for v in variants:
            expected_by_variant.setdefault((task, v), {})

    ref_cache: dict[MatchKey, dict[str, np.ndarray] | Exception] = {}
    rows: list[FileResult] = []
    images: dict[tuple[str, MatchKey], np.ndarray] = {}
    primary = variants[0]
    for name, folder in methods:
        found, bad = index_recon(folder, cfg.task)
        for exc in bad:  # not in the layout: named, not scored (the official scorer would not see it)
            rows.append(FileResult(name, CaseId("", "", "", "", "", "", "", Path(exc.path).name),
                                   "error", recon_path=exc.path, comment=str(exc)))
        seen: set[MatchKey] = set()
        t0 = time.perf_counter()
        bar = tqdm(found, desc=f"evaluate:{name}", unit="file", disable=not cfg.progress)
        for i, (case, path) in enumerate(bar, 1):
            key = case.match_key
            renamed = key not in refs and _val_renamed(case)
            if renamed and renamed.match_key in refs:  # the validation scorer's folder rename pairs it
                case, key = renamed, renamed.match_key
            else:
                renamed = None
            row = FileResult(name, case, "error", recon_path=str(path))
            rows.append(row)
            if key not in refs:
                row.status = "extra"
                row.comment = f"{path}: no reference file {case.stem}.mat for this reconstruction"
                if cfg.challenge_exact and "val2025" in variants:
                    row.comment += f" ({EXTRA_NOTE}; the test scorer ignores it)"
                continue
            seen.add(key)
            ref_case, ref_path = refs[key]
            row.reference_path = str(ref_path)
            try:
                if key not in ref_cache:
                    try:
                        ref_cache[key] = reference_views(ref_path, ref_case, variants)
                    except Exception as exc:  # noqa: BLE001 - any unreadable reference is named, run goes on
                        ref_cache[key] = SubmissionError(ref_path, f"reference unreadable ({exc})")
                ref = ref_cache[key]
                if isinstance(ref, Exception):
                    raise ref
                recon = _load_views(path, variants)
                row.scores = {v: _score_variant(recon[v], ref[v], str(path), v) for v in variants}
                if renamed and "test2025" in row.scores:  # the test scorer looks in the reference's folder
                    row.scores["test2025"] = FileScore(math.nan, math.nan, math.nan, 0, RENAME_NOTE)
                row.score, row.clean = row.scores[primary], row.scores[CLEAN]
                row.status = _status(row.score)
                notes = [f"{v}: {s.comment}" for v, s in row.scores.items() if not s.valid]
                notes += [f"{v}: {s.note}" for v, s in row.scores.items() if s.note]
                row.comment = f"{path}: " + "; ".join(notes) if notes else ""
                if row.status == STATUS_OK:
                    images[(name, key)] = recon[primary]
                    images[("__reference__", key)] = ref[primary]
            except (SubmissionError, MatFileError, MetricError, ValueError, OSError) as exc:
                row.status = "error"
                row.comment = str(exc) if str(path) in str(exc) or str(ref_path) in str(exc) else f"{path}: {exc}"
                row.score = row.clean = FileScore(math.nan, math.nan, math.nan, 0, row.comment)
                row.scores = {v: row.score for v in variants}
            bar.set_postfix(files_per_s=f"{i / max(time.perf_counter() - t0, 1e-9):.1f}")
        for key, (ref_case, ref_path) in sorted(refs.items()):
            if key not in seen:
                rows.append(FileResult(
                    name, ref_case, "missing", reference_path=str(ref_path),
                    comment=f"{ref_path}: no reconstruction {ref_case.stem}_kus_*.mat in {folder} (counts 0)",
                ))
        for r in rows:
            if r.method == name and (r.status != STATUS_OK or r.comment):
                print(f"[evaluate] {name}: {r.status}: {r.comment}", file=sys.stderr)

    _fill_pattern(rows)
    results: dict[str, dict[str, dict[str, dict[str, object]]]] = {}
    dropped: dict[tuple[str, str, str], list[Group]] = {}
    for name, _ in methods:
        for task in tasks:
            mine = [r for r in rows if r.method == name and r.case.task == task and r.status in SCORED]
            for v in variants:
                counts = expected_by_variant[(task, v)]
                scored = [(gmap.file_groups(task, r.case.center, r.case.vendor, r.case.patient, scorer_of(v)),
                           r.scores.get(v, r.score)) for r in mine]
                if v == primary:
                    for r, (groups, _) in zip(mine, scored):
                        r.groups = groups
                summary = gmap.summary_name(task)
                results.setdefault(name, {}).setdefault(task, {})[v] = results_json(
                    scored, counts, v != CLEAN, summary, total=n_refs[task])
                gone = missing_groups(scored, counts)
                if gone:
                    dropped[(name, task, v)] = gone
                    what = ("left out of the official Mean_of_all_" + summary + "_* (which rises as a result)"
                            if v != CLEAN else "counted as PSNR 0, SSIM 0, NMSE 2 in the clean summary")
                    print(f"[evaluate] WARNING {name} {task} {v}: {len(gone)} group(s) with no valid file, {what}: "
                          + ", ".join("_".join(g) for g in gone), file=sys.stderr)
    return Evaluation([n for n, _ in methods], rows, {t: expected_by_variant[(t, primary)] for t in tasks},
                      results, images, variants, gmap.source, dropped, expected_by_variant)


def _fill_pattern(rows: list[FileResult]) -> None:
    """Give missing rows the pattern / R another method's file of the same case was named with."""
    known = {r.case.match_key: (r.case.pattern, r.case.R, r.case.file_name) for r in rows if r.case.pattern}
    for r in rows:
        if r.status == "missing" and r.case.match_key in known:
            pattern, R, fname = known[r.case.match_key]
            c = r.case
            r.case = CaseId(c.task, c.modality, c.set_type, c.center, c.vendor, c.patient, c.stem, fname, pattern, R)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, data)


def _write_csv(path: Path, header: list[str], rows: Iterable[list[object]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return _write_atomic(path, buf.getvalue().encode())


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _nanstd(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    with np.errstate(invalid="ignore"):  # an infinite value makes the spread NaN, quietly
        return float(np.std(vals)) if vals else math.nan


def write_tables(ev: Evaluation, out: Path) -> list[Path]:
    """per_file.csv, per_center_vendor.csv, per_contrast_pattern_R.csv, problems.csv, results*.json.

    Tables use the primary variant (`ev.primary`); per_file.csv has every variant's metrics.
    """
    written = []
    extra_cols = [f"{m}_{v}" for v in ev.variants for m in ("psnr", "ssim", "nmse", "comment")]

    def variant_cells(r: FileResult) -> list[object]:
        cells: list[object] = []
        for v in ev.variants:
            s = r.scores.get(v)
            cells += [s.psnr, s.ssim, s.nmse, s.comment or s.note or ""] if s else [math.nan] * 3 + [""]
        return cells

    written.append(_write_csv(out / "per_file.csv", [
        "method", "task", "modality", "center", "vendor", "patient", "contrast", "file", "pattern", "R",
        "status", "n_images", "psnr", "ssim", "nmse", "psnr_clean", "ssim_clean", "nmse_clean",
        "comment", "recon_path", "reference_path", *extra_cols,
    ], ([r.method, r.case.task, r.case.modality, r.case.center, r.case.vendor, r.case.patient, r.case.stem,
         r.case.file_name, r.case.pattern or "", r.case.R if r.case.R is not None else "", r.status,
         r.score.n_images, r.score.psnr, r.score.ssim, r.score.nmse, r.clean.psnr, r.clean.ssim, r.clean.nmse,
         r.comment, r.recon_path, r.reference_path, *variant_cells(r)] for r in ev.rows)))

    cv_rows = []
    for method in ev.methods:
        for task, counts in sorted(ev.expected.items()):
            mine = [r for r in ev.rows if r.method == method and r.case.task == task and r.status in SCORED]
            groups = summarise_groups([(r.groups, r.score) for r in mine], counts, challenge_exact=False)
            for g in groups:
                valid = [r.score for r in mine if g.group in r.groups and r.score.valid]
                cv_rows.append([method, task, g.key, g.center, g.vendor, g.expected, g.submitted, g.psnr_adj,
                                g.ssim_adj, g.nmse_adj, _nanmean([s.psnr for s in valid]),
                                _nanmean([s.ssim for s in valid]), _nanmean([s.nmse for s in valid])])
    written.append(_write_csv(out / "per_center_vendor.csv", [
        "method", "task", "group", "center", "vendor", "expected", "scored", "psnr_adj", "ssim_adj", "nmse_adj",
        "psnr_mean", "ssim_mean", "nmse_mean",
    ], cv_rows))

    cpr: dict[tuple[str, str, str, str, str], list[FileResult]] = {}
    for r in ev.rows:
        if r.status == "extra" or not r.case.task:
            continue
        k = (r.method, r.case.modality, r.case.stem, r.case.pattern or "", str(r.case.R or ""))
        cpr.setdefault(k, []).append(r)
    cpr_rows = []
    for k in sorted(cpr):
        rs = cpr[k]
        ok = [r.score for r in rs if r.score.valid]
        cpr_rows.append([*k, len(rs), len(ok),
                         _nanmean([s.psnr for s in ok]), _nanstd([s.psnr for s in ok]),
                         _nanmean([s.ssim for s in ok]), _nanstd([s.ssim for s in ok]),
                         _nanmean([s.nmse for s in ok]), _nanstd([s.nmse for s in ok])])
    written.append(_write_csv(out / "per_contrast_pattern_R.csv", [
        "method", "modality", "contrast", "pattern", "R", "files", "scored",
        "psnr_mean", "psnr_std", "ssim_mean", "ssim_std", "nmse_mean", "nmse_std",
    ], cpr_rows))

    problems = [[r.method, r.status, r.recon_path or r.reference_path, r.comment]
                for r in ev.rows if r.status != STATUS_OK or r.comment]
    for (method, task, variant), gone in sorted(ev.dropped.items()):
        problems.append([method, "missing_group", task,
                         f"{variant}: no valid file in {', '.join('_'.join(g) for g in gone)} "
                         + ("(left out of the official Mean_of_all_*)" if variant != CLEAN else "(counted as 0)")])
    written.append(_write_csv(out / "problems.csv", ["method", "kind", "path", "message"], problems))

    first_method = ev.methods[0]
    first_task = sorted(ev.results[first_method])[0]
    written.append(_write_atomic(out / "results.json",
                                 json.dumps(ev.results[first_method][first_task][ev.primary], indent=4).encode()))
    written.append(_write_atomic(out / "results_all.json", json.dumps(ev.results, indent=2).encode()))
    return written


def _savefig(fig: object, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    return _write_atomic(path, buf.getvalue())


def _bars(ax: object, labels: list[str], series: dict[str, list[float]], title: str) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(labels))
    for i, (method, values) in enumerate(series.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, np.nan_to_num(values, nan=0.0), width, label=method)  # type: ignore[attr-defined]
    ax.set_xticks(x)  # type: ignore[attr-defined]
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=9)  # type: ignore[attr-defined]


def write_figures(ev: Evaluation, out: Path, n_cases: int = 3) -> list[Path]:
    """Metric bars per (center, vendor) and per contrast x pattern x R, and image / error grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    variant = ev.primary
    groups = sorted({(t, g) for t, counts in ev.expected.items() for g in counts})
    labels = [f"{t}/{'_'.join(g)}" if len(ev.expected) > 1 else "_".join(g) for t, g in groups]
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 1.2 * len(labels) + 4), 3.8), layout="constrained")
    for ax, metric in zip(axes, ("PSNR", "SSIM", "NMSE")):
        series = {m: [ev.results[m][t][variant].get(f"{'_'.join(g)}_{metric}_adj", math.nan) for t, g in groups]
                  for m in ev.methods}
        _bars(ax, labels, series, f"{metric}_adj per center/vendor")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CMRxRecon2025 scoring ({variant})", fontsize=10)
    written.append(_savefig(fig, out / "figures" / "bars_center_vendor.png"))
    plt.close(fig)

    keys = sorted({(r.case.stem, r.case.pattern or "?", r.case.R or 0) for r in ev.rows if r.case.task and r.status != "extra"})
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 0.8 * len(keys) + 4), 3.8), layout="constrained")
    for ax, metric in zip(axes, ("psnr", "ssim", "nmse")):
        series = {}
        for m in ev.methods:
            vals = []
            for stem, pattern, R in keys:
                sc = [r.score for r in ev.rows
                      if r.method == m and r.case.stem == stem and (r.case.pattern or "?") == pattern
                      and (r.case.R or 0) == R and r.status == STATUS_OK]
                vals.append(_nanmean([getattr(s, metric) for s in sc]))
            series[m] = vals
        _bars(ax, [f"{s} {p}{R}" for s, p, R in keys], series, f"mean {metric.upper()} per contrast x pattern x R")
    axes[0].legend(fontsize=7)
    written.append(_savefig(fig, out / "figures" / "bars_contrast_pattern_R.png"))
    plt.close(fig)

    # Image grids: baselines first, the first (primary) method last, next to the reference.
    order = ev.methods[1:] + ev.methods[:1]
    primary = ev.methods[0]
    cases = sorted(k for (m, k) in ev.images if m == primary)[: max(n_cases, 0)]
    for key in cases:
        ref = _first_image(ev.images[("__reference__", key)])
        shown = [(m, _first_image(ev.images[(m, key)])) for m in order if (m, key) in ev.images]
        ncol = len(shown) + 1
        fig, axes = plt.subplots(2, ncol, figsize=(2.2 * ncol, 4.6), squeeze=False, layout="constrained")
        refn = _norm(ref)
        vmax_err = max([float(np.abs(_norm(img) - refn).max()) for _, img in shown] + [1e-6])
        for j, (m, img) in enumerate(shown):
            axes[0, j].imshow(_norm(img).T, cmap="gray", vmin=0, vmax=1.2)
            axes[0, j].set_title(m, fontsize=8)
            axes[1, j].imshow(np.abs(_norm(img) - refn).T, cmap="magma", vmin=0, vmax=vmax_err)
            axes[1, j].set_title(f"|{m} - reference|", fontsize=7)
        axes[0, -1].imshow(refn.T, cmap="gray", vmin=0, vmax=1.2)
        axes[0, -1].set_title("reference", fontsize=8)
        axes[1, -1].axis("off")
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        stem = "_".join(key[3:])  # center_vendor_patient_file
        fig.suptitle(f"{key[0]} {key[1]} {stem} (first slice, first frame)", fontsize=8)
        written.append(_savefig(fig, out / "figures" / f"case_{key[0]}_{key[1]}_{stem}.png"))
        plt.close(fig)
    return written


def _first_image(arr: np.ndarray) -> np.ndarray:
    """The first 2-D image (first slice, first frame) of an img4ranking array (MATLAB order)."""
    return np.asarray(arr)[(slice(None), slice(None)) + (0,) * (np.ndim(arr) - 2)]


def _norm(img: np.ndarray) -> np.ndarray:
    """The scorer's per-image 99.5th-percentile normalisation, for display."""
    from challenge.metrics import normalize_percentile

    return normalize_percentile(img)


def run(cfg: EvalConfig) -> Evaluation:
    """Evaluate and write every output under `cfg.out`."""
    from launch.cli import dump_config

    out = Path(cfg.out)
    trees = [folder for _, folder in parse_methods(cfg)] + ([Path(cfg.reference)] if cfg.reference else [])
    for tree in trees:   # tables inside a submission tree would be extra files in the submission
        if out.resolve() == tree.resolve() or tree.resolve() in out.resolve().parents:
            raise ValueError(f"out {out} is inside the tree {tree}: evaluation outputs would become extra files "
                             f"there; choose a folder outside it")
    dump_config(cfg, out / "eval_config.toml")
    ev = evaluate(cfg)
    write_tables(ev, out)
    if cfg.figures:
        write_figures(ev, out, cfg.n_cases)
    return ev


def main(argv: list[str] | None = None) -> int:
    from launch.cli import parse_args

    cfg = parse_args(EvalConfig, argv, description=__doc__.splitlines()[0])
    try:
        ev = run(cfg)
    except ValueError as exc:
        print(f"[evaluate] error: {exc}", file=sys.stderr)
        return 2
    print(f"[evaluate] groups from {ev.grouping}")
    for method in ev.methods:
        for task, res in sorted(ev.results[method].items()):
            for variant in ev.variants:
                summary = {k: v for k, v in res[variant].items() if k.startswith("Mean_of_all") or k == "Num_Files"}
                gone = ev.dropped.get((method, task, variant))
                left = f"  ({len(gone)} group(s) without a valid file, see problems.csv)" if gone else ""
                print(f"[evaluate] {method} {task} ({variant}): {summary}{left}")
    n_bad = sum(r.status != STATUS_OK for r in ev.rows) + len(ev.dropped)
    print(f"[evaluate] tables, results.json ({ev.primary}) and figures in {cfg.out} "
          f"({n_bad} problem row(s), see problems.csv)")
    # unreadable, unexpected or duplicate files: the scores stand, but a script must be able to tell
    return EXIT_SKIPPED if any(r.status == "error" for r in ev.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
