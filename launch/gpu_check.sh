#!/bin/bash
# One prepared GPU check, under 9 minutes on one GPU, printing one table (bench/gpu_check.py):
# bf16 training-step samples/s, peak memory and MFU for 1b, base, small and tiny (with and without
# activation checkpointing, torch.compile while time is left) and DeepSpeed ZeRO-1/-3/-2 steps of 1b.
#
#   bash launch/gpu_check.sh                          # a machine with one CUDA GPU
#   bash launch/gpu_check.sh --set dry_run=true       # any CPU: the same code paths, tiny, ~30 s
#   bash launch/gpu_check.sh --set budget_s=300       # any GpuCheckConfig field
#
# Output: the table on stdout, and in $OUT (else out/gpu_check): gpu_check.log, results.json.
# Fails soft: a job that fails, runs out of memory or outlives its share of the budget is one row
# saying why; the script always ends inside 9 minutes (the jobs' budget is 480 s, this timeout 530 s).
#
# Python: $CMRFM_PYTHON, else $CMRFM_VENV/bin/python, else python3. A bare GPU image (torch, timm, einops,
# safetensors, no DeepSpeed) runs everything but the ZeRO rows, which then say "No module named
# 'deepspeed'". To get those too, put wheels in .whl/ and carry it: they are installed into /tmp/site
# first. Made where pip works: `pip wheel --no-deps -w .whl deepspeed==0.19.8` (pure Python: ops are
# built just in time, and pretrain.engine needs none) and `pip download --no-deps --only-binary=:all:
# -d .whl hjson pydantic pydantic-core annotated-types typing-inspection` for the target's Python.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
py="${CMRFM_PYTHON:-python3}"
[ -z "${CMRFM_PYTHON:-}" ] && [ -n "${CMRFM_VENV:-}" ] && py="$CMRFM_VENV/bin/python"
out="${OUT:-out/gpu_check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
        || echo "[gpu_check] installing .whl/ failed: the rows that need those packages will say so"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    timeout 530 "$py" bench/gpu_check.py --set out="$out" "$@"
    rc=$?
    [ "$rc" = 124 ] && echo "[gpu_check] stopped at 530 s: the rows above are what it measured"
    exit "$rc"
} 2>&1 | tee "$out/gpu_check.log"
