"""ZeRO on CPU, side by side in one run: per-rank memory (P4), DeepSpeed overhead (P5), samples/s.

    DS_ACCELERATOR=cpu python bench/zero.py [--size small] [--steps 6]

P4  per-rank model + optimizer state memory for ZeRO-0/1/2/3 on 2 gloo ranks, as ratios to ZeRO-0
    (goal: ZeRO-3 <= 0.55x). Measured as the bytes of every distinct tensor storage alive in the
    rank (a gc scan, deduplicated by storage), taken after backward and before the optimizer step of
    the 2nd step (parameters + gradients + Adam states + DeepSpeed's flat buffers), minus what was
    alive before the engine was built.
P5  DeepSpeed step time (1 process, ZeRO-0 and ZeRO-2) over a plain PyTorch step (same model,
    batch, AdamW, clipping) (goal <= 1.25x).
    samples/s on 1 and 2 ranks (ZeRO-2, same micro-batch per rank, cores split over ranks).

Every number comes from the same invocation; the 2-rank part is a real 2-process gloo group started
by this script (torchrun-style variables), run after the 1-process part so they never share cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable by the garbage collector in this process."""
    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                st = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if st.data_ptr():
                storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    return sum(storages.values())


def make_batch(micro: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(micro, 3, 48, 64)
    mask[:, :, ::4] = 1
    mask[:, :, 20:28] = 1
    k = torch.randn(micro, 3, 8, 48, 64, dtype=torch.complex64, generator=g) * mask[:, :, None]
    return {"kspace": k, "mask": mask, "meta": [{"__key__": f"b{i}"} for i in range(micro)]}


def config(size: str, stage: int, micro: int, steps: int, bucket: int = 2_000_000):
    from pretrain.settings import PretrainConfig

    cfg = PretrainConfig()
    cfg.model.size, cfg.data.micro_batch, cfg.deepspeed.zero_stage = size, micro, stage
    cfg.deepspeed.bucket_size = bucket
    cfg.optim.warmup_steps, cfg.run.steps = 0, steps + 2
    return cfg


def ds_steps(engine, cfg, batch, steps: int) -> float:
    """Seconds per step over `steps` timed DeepSpeed steps (after one warm-up step)."""
    from pretrain.objective import ssdu_step_loss

    def one(i: int) -> None:
        loss = ssdu_step_loss(engine, batch, cfg.objective, 0, i)
        engine.backward(loss)
        engine.step()

    one(0)
    t = time.perf_counter()
    for i in range(steps):
        one(i + 1)
    return (time.perf_counter() - t) / steps


def rank_main(size: str, steps: int, micro: int, out: str) -> None:
    """One rank of the 2-rank group: memory per ZeRO stage, and ZeRO-2 samples/s."""
    import torch
    import torch.distributed as tdist

    from pretrain import engine as E
    from pretrain.dist_env import read_dist_env
    from pretrain.objective import ssdu_step_loss

    torch.set_num_threads(1)   # one core per rank
    dist = read_dist_env("cpu")
    E.init_distributed(dist)
    batch = make_batch(micro, seed=dist.rank)
    result = {"memory": {}, "sec_per_step": None}
    for precision, stage in [(p, s) for p in ("fp32", "bf16") for s in (0, 1, 2, 3)]:
        gc.collect()
        before = tensor_bytes()
        cfg = config(size, stage, micro, steps)
        cfg.deepspeed.precision = precision
        engine = E.build_engine(cfg, dist, E.ds_config(cfg, dist.world_size))
        for i in range(2):
            loss = ssdu_step_loss(engine, batch, cfg.objective, 0, i)
            engine.backward(loss)
            if i == 1:                                    # after backward, before step: grads + states held
                gc.collect()
                result["memory"][f"{precision}/{stage}"] = tensor_bytes() - before
            engine.step()
        if stage == 2 and precision == "fp32":
            result["sec_per_step"] = ds_steps(engine, cfg, batch, steps)
        engine.destroy()
        del engine, loss
        tdist.barrier()
    if dist.rank == 0:
        Path(out).write_text(json.dumps(result))


def single_main(size: str, steps: int, micro: int) -> dict:
    """1 process: plain PyTorch step vs DeepSpeed ZeRO-0 / ZeRO-2 step on the same model and batch."""
    import torch

    from models.sizes import build_model
    from pretrain import engine as E
    from pretrain.dist_env import read_dist_env
    from pretrain.objective import ssdu_step_loss
    from pretrain.settings import PretrainConfig

    torch.set_num_threads(1)   # the same one core as each of the 2 ranks gets
    batch = make_batch(micro)
    cfg = config(size, 0, micro, steps)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)

    def plain(i: int) -> None:
        loss = ssdu_step_loss(model, batch, cfg.objective, 0, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist = read_dist_env("cpu")
    E.init_distributed(dist)
    # P5 times the configuration users run: the default bucket size (P4's small buckets only make the
    # memory effect visible on a 19M-parameter model and cost extra reduce calls per step)
    default_bucket = PretrainConfig().deepspeed.bucket_size
    engines = {stage: E.build_engine(config(size, stage, micro, steps, default_bucket), dist,
                                     E.ds_config(config(size, stage, micro, steps, default_bucket), 1))
               for stage in (0, 2)}
    # interleave the measurements (plain, ZeRO-0, ZeRO-2, repeated) so that load drift hits all alike
    times = {"plain": [], 0: [], 2: []}
    plain(0)
    for _ in range(2):
        t = time.perf_counter()
        for i in range(steps):
            plain(i + 1)
        times["plain"].append((time.perf_counter() - t) / steps)
        for stage, engine in engines.items():
            times[stage].append(ds_steps(engine, cfg, batch, steps))
    best = {k: min(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    return {"plain": best["plain"], "zero0": best[0], "zero2": best[2], "params": n_params}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="model size (models.sizes.SIZES)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--micro", type=int, default=2, help="micro-batch per rank")
    parser.add_argument("--rank-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_main(args.size, args.steps, args.micro, args.rank_worker)
        return

    print(f"[1/2] 1 process: plain PyTorch vs DeepSpeed, model {args.size}, micro-batch {args.micro}", flush=True)
    single = single_main(args.size, args.steps, args.micro)
    print("[2/2] 2 gloo ranks: ZeRO-0/1/2/3 memory, ZeRO-2 throughput", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out, port = Path(tmp) / "ranks.json", free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps),
                                   "--micro", str(args.micro), "--rank-worker", str(out)],
                                  env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                       "DS_ACCELERATOR": "cpu"},
                                  stdout=subprocess.DEVNULL if r else None, stderr=subprocess.DEVNULL if r else None)
                 for r in range(2)]
        if any(p.wait() != 0 for p in procs):
            sys.exit("2-rank worker failed")
        ranks = json.loads(out.read_text())

    mem = ranks["memory"]
    print(f"\nmodel {args.size}: {single['params'] / 1e6:.1f}M parameters ({single['params'] * 4 / 2**20:.0f} MiB fp32); "
          f"micro-batch {args.micro}; {os.cpu_count()} cores; ZeRO buckets 2M elements")
    print("\nP4  per-rank params + grads + optimizer states + ZeRO buffers (2 ranks, rank 0)")
    print(f"    {'':8} {'fp32 (CPU runs)':>24} {'bf16 (GPU config)':>26}")
    for stage in (0, 1, 2, 3):
        f, b = mem[f"fp32/{stage}"], mem[f"bf16/{stage}"]
        print(f"    ZeRO-{stage}: {f / 2**20:8.1f} MiB  {f / mem['fp32/0']:.2f}x     {b / 2**20:8.1f} MiB  {b / mem['bf16/0']:.2f}x")
    for p in ("fp32", "bf16"):
        r = mem[f"{p}/3"] / mem[f"{p}/0"]
        print(f"    -> {p}: ZeRO-3 / ZeRO-0 = {r:.2f} ({'meets' if r <= 0.55 else 'misses'} the <= 0.55x goal)")
    print("\nP5  step time, 1 process, same model and batch")
    print(f"    plain PyTorch {single['plain'] * 1e3:7.1f} ms")
    for stage in ("zero0", "zero2"):
        ratio = single[stage] / single["plain"]
        print(f"    DeepSpeed {stage.replace('zero', 'ZeRO-')}  {single[stage] * 1e3:7.1f} ms   {ratio:.2f}x plain "
              f"({'meets' if ratio <= 1.25 else 'misses'} the <= 1.25x goal)")
    one = args.micro / single["zero2"]
    two = 2 * args.micro / ranks["sec_per_step"]
    print("\nsamples/s (DeepSpeed ZeRO-2, micro-batch per rank fixed)")
    print(f"    1 rank : {one:6.2f} samples/s")
    print(f"    2 ranks: {two:6.2f} samples/s   ({two / one:.2f}x; the 2 ranks share the {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
