"""Every entry point starts from any working directory and prints its flags.

`deepspeed pretrain/run.py` runs the file as a script (pretrain/ first on sys.path, the repo not the
cwd); the other stages run in module mode. Each must accept --config/--set and exit 0 on --help.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ENTRY_POINTS = [
    [str(ROOT / "pretrain" / "run.py")],
    ["-m", "shards.synthetic"],
    ["-m", "shards.convert"],
    ["-m", "finetune.train"],
    ["-m", "finetune.bank"],
    ["-m", "finetune.reconstruct"],
    ["-m", "finetune.evaluate"],
    ["-m", "finetune.submission"],
]


@pytest.mark.parametrize("argv", ENTRY_POINTS, ids=lambda a: a[-1].replace(str(ROOT) + os.sep, ""))
def test_help_from_another_working_directory(argv: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout and "--set" in proc.stdout
    assert not list(tmp_path.iterdir()), "--help must not write anything"
