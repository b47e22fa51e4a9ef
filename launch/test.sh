#!/usr/bin/env bash
# The README's test command: installs the venv on first use (launch/venv.sh), then runs the suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slurm"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/venv.sh
set -euo pipefail
exec python -m pytest -q --durations=15 "$@"
