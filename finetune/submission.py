"""Check a reconstruction tree and pack it into `Submission.zip`, the archive the organisers accept.

    python -m finetune.submission --set tree=runs/recon --set input=<validation input tree> \\
        [--set out=Submission.zip] [--set check_only=true]

Everything is checked before anything is written (challenge.archive): every input kus file has its
reconstruction, nothing else sits in the task folders, and each file is MAT v5/v7 holding exactly one
single-precision `img4ranking`. Files outside the task folders (reports, configs) are left out and listed.
Prints the count per task and modality.

Exit codes: 0 archive written (or checked with check_only); 1 a check failed, nothing written;
2 usage error (no tree, archive exists).
"""

from __future__ import annotations

import sys
from pathlib import Path

from challenge.archive import ARCHIVE_NAME, plan_archive, write_archive
from challenge.submission import SubmissionError
from finetune.settings import SubmissionConfig


def main(argv: list[str] | None = None) -> int:
    from launch.cli import parse_args

    cfg = parse_args(SubmissionConfig, argv, description=__doc__.splitlines()[0])
    if not cfg.tree:
        print("[submission] set tree=<reconstruction tree>", file=sys.stderr)
        return 2
    tree = Path(cfg.tree)
    out = Path(cfg.out) if cfg.out else tree.resolve().parent / ARCHIVE_NAME
    if not cfg.input:
        print("[submission] no input=<validation input tree>: missing and extra files cannot be checked",
              file=sys.stderr)
    plan = plan_archive(tree, cfg.input or None)
    for (task, modality), n in sorted(plan.counts.items()):
        print(f"[submission] {task} {modality}: {n} file(s)")
    print(f"[submission] {len(plan.files)} file(s) in total")
    for p in plan.left_out:
        print(f"[submission] left out (not part of a submission): {p}", file=sys.stderr)
    for problem in plan.problems:
        print(f"[submission] problem: {problem}", file=sys.stderr)
    if plan.problems:
        print(f"[submission] {len(plan.problems)} problem(s): nothing written", file=sys.stderr)
        return 1
    if cfg.check_only:
        print("[submission] checked: every file as the organisers expect (check_only: nothing written)")
        return 0
    try:
        write_archive(plan, out)
    except SubmissionError as exc:
        print(f"[submission] error: {exc}", file=sys.stderr)
        return 2
    print(f"[submission] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
