"""What the durable writes cost, side by side in one run (issue 11: fsync + staged folders + locks).

    DS_ACCELERATOR=cpu python bench/durability.py [--size small] [--repeats 5] [--dir /scratch/x]

D1  checkpoint save (pretrain.checkpoint.save: staged tag folder, every file fsynced, marker, rename,
    fsynced `latest`) over the same save with every fsync replaced by a no-op: the price of
    durability on this filesystem. What matters is the added seconds against the checkpoint
    interval (minutes), printed beside the ratio.
D2  adapter publish (finetune.train.save_result: lock, staging folder, swap) over writing the same
    two files in place with save_adapter.
D3  reconstruction tree publish (launch.outputs.replaced_tree around the same writes) over writing
    img4ranking files straight into the final folder, for a tree of `--files` small files.

Medians over `--repeats`, each arm alternating with its baseline so both see the same machine load.
`--dir` chooses the filesystem measured (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def no_fsync():
    """Every fsync in launch.outputs (and os.fsync) becomes a no-op: the baseline arm."""
    import launch.outputs as lo

    saved = (os.fsync, lo.fsync_file, lo.fsync_dir)
    os.fsync = lambda fd: None
    lo.fsync_file = lambda path: None
    lo.fsync_dir = lambda path: None
    try:
        yield
    finally:
        os.fsync, lo.fsync_file, lo.fsync_dir = saved


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(arm: Callable[[int], None], base: Callable[[int], None], repeats: int) -> tuple[float, float]:
    """(median seconds of `arm`, of `base`), alternating the two."""
    a, b = [], []
    for i in range(repeats):
        a.append(timed(lambda: arm(i)))
        b.append(timed(lambda: base(i)))
    return statistics.median(a), statistics.median(b)


def bench_checkpoint(size: str, work: Path, repeats: int) -> tuple[float, float, int]:
    import torch

    from pretrain import checkpoint as ck
    from pretrain import engine as E
    from pretrain.dist_env import read_dist_env
    from pretrain.settings import PretrainConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    E.init_distributed(read_dist_env("cpu"))
    cfg = PretrainConfig()
    cfg.model.size, cfg.run.dir = size, str(work / "run")
    engine = E.build_engine(cfg, read_dist_env("cpu"), E.ds_config(cfg, 1))

    def save(folder: str) -> Callable[[int], None]:
        return lambda i: ck.save(engine, work / folder, i + 1, {}, cfg, keep=1, owner=folder)

    def base(i: int) -> None:
        with no_fsync():
            save("nofsync")(i)

    durable, plain = side_by_side(save("durable"), base, repeats)
    nbytes = sum(f.stat().st_size for f in (work / "durable").rglob("*") if f.is_file())
    torch.distributed.destroy_process_group()
    return durable, plain, nbytes


def bench_adapter(work: Path, repeats: int) -> tuple[float, float]:
    import torch

    from finetune.settings import FinetuneConfig
    from finetune.train import save_result
    from models.adapters import add_adapters, save_adapter
    from models.sizes import build_model

    torch.manual_seed(0)
    model = build_model("tiny")
    add_adapters(model, rank=8, alpha=16.0)
    cfg = FinetuneConfig()
    cfg.run.adapters = str(work / "bank")
    return side_by_side(lambda i: save_result(model, cfg, {}),
                        lambda i: save_adapter(model, work / "plain" / "cine_ktRadial", {}), repeats)


def bench_tree(work: Path, files: int, repeats: int) -> tuple[float, float]:
    import numpy as np

    from challenge.submission import save_img4ranking
    from launch.outputs import replaced_tree

    img = np.random.default_rng(0).random((60, 40, 2, 3)).astype(np.float32)

    def write(root: Path) -> None:
        for k in range(files):
            save_img4ranking(root / f"P{k:03d}" / f"cine_sax_kus_Uniform8.mat", img)

    def staged(i: int) -> None:
        with replaced_tree(work / "staged", "report.json") as stage:
            write(stage)
            (stage / "report.json").write_text("{}")

    def direct(i: int) -> None:
        write(work / "direct")

    return side_by_side(staged, direct, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cmrfm-durability-", dir=args.dir))
    try:
        d, p, nbytes = bench_checkpoint(args.size, work / "ck", args.repeats)
        ad, ap = bench_adapter(work / "ad", args.repeats)
        td, tp = bench_tree(work / "tree", args.files, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nfilesystem of {work.parent}; medians of {args.repeats}")
    print("| what | durable (s) | baseline (s) | ratio |\n|---|---|---|---|")
    print(f"| D1 checkpoint save, {args.size} model ({nbytes / 2**20:.1f} MiB) vs no fsync | {d:.3f} | {p:.3f} | {d / p:.2f}x |")
    print(f"| D2 adapter publish (lock, staging, swap) vs in place | {ad:.4f} | {ap:.4f} | {ad / ap:.2f}x |")
    print(f"| D3 tree of {args.files} img4ranking files, staged + swapped vs direct | {td:.3f} | {tp:.3f} | {td / tp:.2f}x |")
    print(f"\nAdded per checkpoint: {d - p:+.3f} s; per reconstructed file: {1000 * (td - tp) / args.files:+.1f} ms; "
          f"per adapter: {1000 * (ad - ap):+.1f} ms")
    print(f"\nCommand: DS_ACCELERATOR=cpu python bench/durability.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
