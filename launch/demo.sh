#!/usr/bin/env bash
# The README's first command: the whole cmrfm pipeline on a synthetic corpus, on this machine's CPUs.
#
#   bash launch/demo.sh                      # about 10 minutes on 2 cores after the first install
#
#   synthetic CMRxRecon corpus -> WebDataset shards -> self-supervised pretraining (DeepSpeed, 2 gloo
#   ranks, tiny model) -> LoRA adapters per (contrast, pattern) (accelerate, 2 processes) ->
#   reconstruction of the validation-style TaskR1 tree (+ zero-filled and ESPIRiT/CG-SENSE baselines)
#   -> challenge-exact evaluation: CSV tables, results.json and PNG figures.
#
# Environment (all optional):
#   CMRFM_OUT              output folder (default ./out/demo)
#   CMRFM_DATA             an existing synthetic corpus to use instead of writing one
#   CMRFM_SHARDS           existing shards of that corpus to use instead of converting
#   CMRFM_PRETRAIN_STEPS   pretraining steps (default 60)     CMRFM_PRETRAIN_RANKS  DeepSpeed ranks (default 2; 1 = plain python)
#   CMRFM_FINETUNE_STEPS   steps per adapter (default 30)      CMRFM_FINETUNE_RANKS  accelerate processes (default 2)
#   CMRFM_CONTRASTS        contrasts that get adapters (default cine,lge: those of the validation tree)
#   CMRFM_BASELINES        baseline trees beside cmrfm (default zero_filled,sense)
#   CMRFM_INIT             weights pretraining starts from (default launch/weights/demo_tiny, the shipped
#                          backbone made by launch/demo_backbone.sh; "none" = a random init)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/venv.sh
set -euo pipefail

out="${CMRFM_OUT:-out/demo}"
data="${CMRFM_DATA:-$out/data}"
shards="${CMRFM_SHARDS:-$out/shards}"
pretrain_steps="${CMRFM_PRETRAIN_STEPS:-60}"
pretrain_ranks="${CMRFM_PRETRAIN_RANKS:-2}"
finetune_steps="${CMRFM_FINETUNE_STEPS:-30}"
finetune_ranks="${CMRFM_FINETUNE_RANKS:-2}"
contrasts="${CMRFM_CONTRASTS:-cine,lge}"
baselines="${CMRFM_BASELINES:-zero_filled,sense}"
init="${CMRFM_INIT:-launch/weights/demo_tiny}"
mkdir -p "$out"
start=$SECONDS
stage() { echo; echo "[demo $((SECONDS - start))s] $*"; }

if [ -z "${CMRFM_DATA:-}" ]; then
    stage "1/6 synthetic CMRxRecon corpus -> $data"
    python -m shards.synthetic --set "out=$data"
fi
if [ -z "${CMRFM_SHARDS:-}" ]; then
    stage "2/6 shards -> $shards"
    python -m shards.convert --set "input=$data" --set "out=$shards" --set shard_samples=4
fi

stage "3/6 self-supervised pretraining, $pretrain_ranks rank(s), $pretrain_steps steps -> $out/pretrain"
pretrain_args=(--config configs/pretrain_tiny.toml --set "data.shards=$shards" --set "log.eval_shards=$shards"
               --set "run.dir=$out/pretrain" --set "run.steps=$pretrain_steps")
if [ "$init" != "none" ] && [ -f "$init/backbone.safetensors" ]; then
    echo "  starting from $init (made by launch/demo_backbone.sh; CMRFM_INIT=none for a random init)"
    pretrain_args+=(--set "run.init=$init")
fi
# a free rendezvous port: the default 29500 may be taken by another run on this machine
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
if [ "$pretrain_ranks" -gt 1 ]; then
    DS_ACCELERATOR=cpu deepspeed --num_gpus "$pretrain_ranks" --master_port "$port" pretrain/run.py "${pretrain_args[@]}"
else
    MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" python pretrain/run.py "${pretrain_args[@]}"
fi

stage "4/6 adapters for ${contrasts} x each pattern, $finetune_ranks process(es), $finetune_steps steps each -> $out/adapters"
finetune_args=(--config configs/finetune_tiny.toml --set "data.shards=$shards" --set "run.backbone=$out/pretrain"
               --set "run.adapters=$out/adapters" --set "run.dir=$out/finetune" --set "run.steps=$finetune_steps"
               --set "run.bank_contrasts=$contrasts")
if [ "$finetune_ranks" -gt 1 ]; then
    ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate_cpu.yaml \
        --num_processes "$finetune_ranks" -m finetune.bank "${finetune_args[@]}"
else
    python -m finetune.bank "${finetune_args[@]}"
fi

stage "5/6 reconstruction of the validation-style tree (cmrfm + $baselines) -> $out/recon"
methods="cmrfm${baselines:+,$baselines}"
python -m finetune.reconstruct --set "input=$data/ChallengeData_ValSet" --set "out=$out/recon/cmrfm" \
    --set "backbone=$out/pretrain" --set "adapters=$out/adapters" --set batch_size=4 --set "methods=$methods"

stage "6/6 evaluation against the hidden FullSample_TaskR1 references -> $out/eval"
side=()
IFS=',' read -r -a names <<< "$baselines"
for name in "${names[@]}"; do
    [ -n "$name" ] && side+=("$name=$out/recon/cmrfm_$name")
done
eval_args=(--config configs/eval.toml --set "recon=$out/recon/cmrfm" --set "reference=$data/ChallengeData_ValSet"
           --set "out=$out/eval")
[ "${#side[@]}" -gt 0 ] && eval_args+=(--set "methods=$(IFS=','; echo "${side[*]}")")
python -m finetune.evaluate "${eval_args[@]}"

stage "done in $((SECONDS - start)) s"
echo "  submission tree : $out/recon/cmrfm   (baselines: $out/recon/cmrfm_{${baselines}})"
echo "  tables          : $(ls "$out"/eval/*.csv 2>/dev/null | tr '\n' ' ')"
echo "  results         : $out/eval/results.json"
echo "  figures         : $out/eval/figures/"
echo "  TensorBoard     : tensorboard --logdir $out   (pretraining and fine-tuning curves)"
