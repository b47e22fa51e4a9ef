#!/usr/bin/env bash
# Makes the small pretrained backbone the README demo starts from (launch/weights/demo_tiny/):
#
#   bash launch/demo_backbone.sh           # about 40 minutes on 2 cores; CMRFM_OUT (default out/demo_backbone)
#
#   the demo's own synthetic corpus (same config and seed as launch/demo.sh writes) -> shards ->
#   self-supervised SSDU pretraining of the tiny model ($SSL_STEPS steps, no reference read) ->
#   supervised training of every parameter on the TRAINING split, every contrast and 2025 pattern
#   ($SUP_STEPS steps; the validation tree and its hidden references are never read) ->
#   backbone.safetensors + model_config.json copied to launch/weights/demo_tiny/.
# The demo then continues SSL pretraining from it and trains its adapters as usual.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/venv.sh
set -euo pipefail

out="${CMRFM_OUT:-out/demo_backbone}"
ssl_steps="${SSL_STEPS:-1500}"
sup_steps="${SUP_STEPS:-2500}"
dest="${CMRFM_WEIGHTS:-launch/weights/demo_tiny}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread: faster on a shared 2-core machine

[ -f "$out/data/synthetic_index.json" ] || python -m shards.synthetic --set "out=$out/data"
[ -f "$out/shards/manifest.json" ] || python -m shards.convert --set "input=$out/data" --set "out=$out/shards" --set shard_samples=4
port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" python pretrain/run.py --config configs/pretrain_tiny.toml \
    --set "data.shards=$out/shards" --set "log.eval_shards=" --set "run.dir=$out/pretrain" \
    --set "run.steps=$ssl_steps" --set run.threads=1 --set checkpoint.every=500
python -m finetune.train --config configs/finetune_tiny.toml --set "data.shards=$out/shards" \
    --set "run.backbone=$out/pretrain" --set run.full_finetune=true --set adapter.contrast=all \
    --set adapter.pattern=all --set "run.steps=$sup_steps" --set "run.adapters=$out/supervised" \
    --set "run.dir=$out/finetune" --set optim.lr=1e-3 --set optim.warmup_steps=20 --set run.checkpoint_every=500
mkdir -p "$dest"
cp "$out/supervised/all_all/backbone.safetensors" "$out/supervised/all_all/model_config.json" "$dest/"
echo "[demo_backbone] wrote $dest ($(du -sh "$dest" | cut -f1))"
