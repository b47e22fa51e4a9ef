"""Train the whole adapter bank: one adapter per (contrast, pattern) pair present in the training shards.

    python -m finetune.bank --config configs/finetune_tiny.toml                  (one process)
    accelerate launch --config_file launch/accelerate_cpu.yaml -m finetune.bank --config ...   (2 ranks)

A pair is present when a fully sampled training sample of that modality (meta["modality"], lower
case) carries masks of that pattern family (meta["task_masks"]: the Mask_TaskAll set of its file,
e.g. "ktRadial8"); only the families of `data.patterns` are trained. Samples of
`run.exclude_centers` / `run.exclude_scanners` do not count; `run.bank_contrasts` limits the contrasts. Each pair is then an ordinary
`finetune.train` run (`adapter.contrast` / `adapter.pattern` set, `run.dir` = <run.dir or
out/finetune>/<pair>), one after the other in the same process group, each writing
<run.adapters>/<contrast>_<pattern>/. Only meta.json members of the shards are read here.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections import Counter
from pathlib import Path

from accelerate import Accelerator

from finetune.settings import FinetuneConfig
from finetune.train import TrainResult, adapter_name, shard_metas, train
from launch.cli import parse_args

_FAMILY = re.compile(r"^(?P<pattern>[A-Za-z]+?)\d+$")


def find_pairs(cfg: FinetuneConfig) -> Counter:
    """(contrast, pattern) -> number of training samples that can train it (see module doc)."""
    families = set(cfg.data.patterns)
    centers, scanners = set(cfg.run.exclude_centers), set(cfg.run.exclude_scanners)
    contrasts = {c.lower() for c in cfg.run.bank_contrasts}
    pairs: Counter = Counter()
    for meta in shard_metas(cfg.data.shards, cfg.data.split):
        if not meta.get("fully_sampled") or meta.get("center") in centers or meta.get("scanner") in scanners:
            continue
        if contrasts and str(meta.get("modality", "")).lower() not in contrasts:
            continue
        found = {m["pattern"] for name in meta.get("task_masks") or [] if (m := _FAMILY.match(str(name)))}
        for pattern in sorted(found & families):
            pairs[(str(meta["modality"]).lower(), pattern)] += 1
    return pairs


def pair_config(cfg: FinetuneConfig, contrast: str, pattern: str) -> FinetuneConfig:
    """The single-adapter config of one pair: its own run folder below the bank's."""
    name = adapter_name(contrast, pattern)
    base = Path(cfg.run.dir) if cfg.run.dir else Path("out/finetune")
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, contrast=contrast, pattern=pattern),
                               run=dataclasses.replace(cfg.run, dir=str(base / name)))


def train_bank(cfg: FinetuneConfig) -> dict[str, TrainResult]:
    """Train every pair in turn; returns adapter name -> result."""
    acc = Accelerator(cpu=cfg.run.device == "cpu")
    pairs = find_pairs(cfg)
    if not pairs:
        raise ValueError(f"{cfg.data.shards}: no fully sampled {cfg.data.split} sample with masks of "
                         f"{cfg.data.patterns}: nothing to train")
    if acc.is_main_process:
        listing = ", ".join(f"{adapter_name(c, p)} ({n} samples)" for (c, p), n in sorted(pairs.items()))
        print(f"[bank] {len(pairs)} adapters to train: {listing}", file=sys.stderr)
    results = {}
    for contrast, pattern in sorted(pairs):
        results[adapter_name(contrast, pattern)] = train(pair_config(cfg, contrast, pattern), acc)
    return results


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(FinetuneConfig, argv, description="train one adapter per (contrast, pattern) pair")
    train_bank(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
