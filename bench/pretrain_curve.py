"""Does self-supervised pretraining learn? Held-out PSNR vs step on the synthetic corpus.

    DS_ACCELERATOR=cpu python bench/pretrain_curve.py [--steps 300] [--eval-every 25]

1. writes the default synthetic corpus (shards.synthetic) and converts it to shards, once, under
   out/bench_curve/ (reused when present);
2. pretrains with SSDU only (no fully sampled data is used for training) with the real entry point,
   `python pretrain/run.py --config configs/pretrain_tiny.toml`, one process, evaluating on the held-out
   validation shards (ValidationSet: acquired masks, hidden fully sampled reference) every
   `--eval-every` steps, step 0 included (the untrained model: run.py evaluates it first);
3. plots PSNR (and SSIM) of the model and of zero-filling vs step into docs/figures/pretrain_psnr.png
   and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # run as a script from any directory
    sys.path.insert(0, str(ROOT))


def build_shards(work: Path) -> Path:
    """The default synthetic corpus as shards, reused from an earlier run only when the same configs
    made them (shards.synthetic refuses a corpus of another config; the manifest's config is checked)."""
    from launch.cli import config_differences, config_to_dict
    from shards.convert import ConvertConfig, convert
    from shards.manifest import Manifest
    from shards.synthetic import SyntheticConfig, write_corpus

    shards = work / "shards"
    root = write_corpus(SyntheticConfig(out=str(work / "corpus")))
    want = ConvertConfig(input=str(root), out=str(shards), shard_samples=16, progress=False)
    if (shards / "manifest.json").exists():
        old = Manifest.read(shards)
        diffs = config_differences(old.config, config_to_dict(want), ignore=("progress", "workers", "input", "out"))
        if diffs or old.input != str(Path(root).resolve()):
            raise SystemExit(f"{shards}: made from {old.input} with another config ({'; '.join(diffs[:5])}); "
                             f"use another --work or remove it")
        return shards
    convert(want)
    return shards


def pretrain(shards: Path, run_dir: Path, steps: int, eval_every: int, extra: list[str]) -> list[dict]:
    """Run pretrain/run.py (1 process); return the eval.jsonl records."""
    if (run_dir / "eval.jsonl").exists():
        (run_dir / "eval.jsonl").unlink()
    args = ["--config", "configs/pretrain_tiny.toml", "--set", f"data.shards={shards}", "--set", f"run.dir={run_dir}",
            "--set", f"log.eval_shards={shards}", "--set", f"log.eval_every={eval_every}", "--set", f"run.steps={steps}",
            "--set", "log.eval_batches=16", "--set", "checkpoint.resume=false", "--set", f"checkpoint.every={steps}",
            *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29611")}
    subprocess.run([sys.executable, "pretrain/run.py", *args], cwd=ROOT, env=env, check=True)   # evaluates step 0 too
    return [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(steps, [r["psnr"] for r in records], "o-", label="pretrained model (SSDU, no reference used)")
    a.plot(steps, [r["psnr_zf"] for r in records], "--", color="gray", label="zero-filled")
    a.set(xlabel="optimizer step", ylabel="PSNR (dB)", title="held-out validation shards")
    a.legend(fontsize=8)
    b.plot(steps, [r["ssim"] for r in records], "o-", label="pretrained model")
    b.plot(steps, [r["ssim_zf"] for r in records], "--", color="gray", label="zero-filled")
    b.set(xlabel="optimizer step", ylabel="SSIM")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--work", default=str(ROOT / "out/bench_curve"))
    parser.add_argument("--figure", default=str(ROOT / "docs/figures/pretrain_psnr.png"))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra run.py overrides")
    args = parser.parse_args()
    work = Path(args.work)
    shards = build_shards(work)
    extra = [x for kv in args.extra for x in ("--set", kv)]
    records = pretrain(shards, work / "run", args.steps, args.eval_every, extra)
    plot(records, Path(args.figure))
    print(f"\n{'step':>6} {'PSNR model':>11} {'PSNR zf':>8} {'SSIM model':>11} {'SSIM zf':>8}  (held-out, {int(records[-1]['scored'])} samples)")
    for r in records:
        print(f"{r['step']:>6} {r['psnr']:>11.2f} {r['psnr_zf']:>8.2f} {r['ssim']:>11.4f} {r['ssim_zf']:>8.4f}")
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
