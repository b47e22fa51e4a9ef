#!/usr/bin/env bash
# Source me: creates ./.venv on first use (torch pinned as docs/toolchain.md says), then activates it.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CMRFM_VENV:-$root/.venv}"
stamp="$venv/.cmrfm-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[cmrfm] installing into $venv (first use: about 5 minutes)" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
    # torch first: deepspeed's sdist build imports it.
    "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    "$venv/bin/python" -m pip install -q -e "$root[dev,bench]"
    # fastMRI's VarNet is a peer model in bench/quality.py only, not a pipeline dependency; --no-deps
    # keeps out pytorch-lightning and torchmetrics, which the model code never imports.
    "$venv/bin/python" -m pip install -q --no-deps "fastmri==0.3.0"
    echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
set +euo pipefail
