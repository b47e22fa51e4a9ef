"""Self-supervised pretraining of the reconstruction backbone: `deepspeed pretrain/run.py --config FILE`.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 pretrain/run.py --config configs/pretrain_tiny.toml
    srun python -u pretrain/run.py --config configs/pretrain_1b.toml          (launch/pretrain.sbatch)
    python pretrain/run.py --config configs/pretrain_tiny.toml --set run.steps=10   (one process)

`main()` is the table of contents: config -> distributed environment -> loader -> engine (model
inside) -> resume -> loop -> final checkpoint + backbone export. A step is one optimizer update
(`deepspeed.grad_accum` micro-batches). The loop owns the step counter and the checkpoint, logging,
evaluation and stop cadences; `train_step` owns forward, loss, backward and the optimizer step.

Preemption: SIGTERM or SIGUSR1 (SLURM's warning signal) sets a flag; at the end of the current step
every rank agrees (an all-reduce of the flag, so a signal that reached one rank is enough), saves a
checkpoint, prints "preempted" and exits 0. The next launch resumes from `latest` on its own.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):   # run as a script: make `import pretrain.x` work from any cwd
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as tdist

from launch.cli import dump_config, parse_args
from pretrain import checkpoint
from pretrain.dist_env import DistEnv, cpu_threads, read_dist_env
from pretrain.engine import build_engine, current_lr, ds_config, grad_norm, init_distributed, write_ds_config
from pretrain.evaluation import evaluate
from pretrain.logbook import Logbook, check_finite, step_metrics
from pretrain.objective import ssdu_step_loss
from pretrain.settings import PretrainConfig, checkpoint_dir
from shards.loader import ShardLoader, make_loader


def main(argv: list[str] | None = None) -> int:
    """Pretrain as `argv` (default sys.argv) says; returns the exit code (0 also when preempted)."""
    cfg = parse_args(PretrainConfig, argv, description=__doc__.splitlines()[0])
    dist = read_dist_env(cfg.run.device)
    torch.set_num_threads(cpu_threads(cfg.run.threads))
    init_distributed(dist)
    config = ds_config(cfg, dist.world_size)
    run_dir = prepare_run_dir(cfg, dist, config)
    stop = StopFlag.install()

    loader = make_loader(cfg.data, dist.rank, dist.world_size)
    engine = build_engine(cfg, dist, config)

    ckdir = checkpoint_dir(cfg)
    start, owner = 0, checkpoint.new_owner()   # the lineage whose old tags this run may prune
    if cfg.checkpoint.resume:
        state = checkpoint.resume(engine, ckdir)
        if state is not None:
            loader.load_state_dict(state.loader)
            start, owner = state.step, state.owner
    book = Logbook(dist, cfg.log, run_dir, start, cfg.run.steps)
    book.print(f"world {dist.world_size} x micro-batch {cfg.data.micro_batch} x accumulation "
               f"{cfg.deepspeed.grad_accum} = global batch {config['train_batch_size']}; ZeRO-{cfg.deepspeed.zero_stage}, "
               f"{'bf16' if config['bf16']['enabled'] else 'fp32'}, peak lr {cfg.optim.lr:g}; "
               + (f"resumed from {ckdir / checkpoint.tag_for(start)}" if start else "fresh start"))

    try:
        step, preempted = train_loop(engine, loader, cfg, dist, book, start, stop, owner)
    finally:
        book.close()

    if step > start or preempted:
        checkpoint.save(engine, ckdir, step, loader.state_dict(), cfg, cfg.checkpoint.keep, owner)
    if preempted:
        book.print(f"preempted: checkpoint {ckdir / checkpoint.tag_for(step)} written at step {step}; exiting 0")
    elif cfg.checkpoint.export:
        checkpoint.export_backbone(engine, run_dir, step)
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


def train_loop(engine: Any, loader: ShardLoader, cfg: PretrainConfig, dist: DistEnv, book: Logbook,
               start: int, stop: "StopFlag", owner: str = "") -> tuple[int, bool]:
    """Steps start+1 .. run.steps; returns (last step done, preempted?). The final save is main's job."""
    batches = iter(loader)     # the training loader is endless (a fresh seeded permutation per epoch)
    step = start
    if step == 0 and cfg.log.eval_shards and cfg.log.eval_every:   # the untrained baseline of the curve
        book.evaluation(0, evaluate(engine, eval_batches(cfg), dist.device, cfg.log.eval_batches))
    while step < cfg.run.steps:
        tick = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.deepspeed.grad_accum)]
        metrics = train_step(engine, micro, cfg, step + 1, dist.device)
        step += 1
        book.step(step, step_metrics(**metrics, seconds=time.perf_counter() - tick), loader.skipped)
        book.mix(step, loader.mixed)
        preempted = stop.agreed()
        every = cfg.checkpoint.every   # 0: only at the end (and on preemption), as fine-tuning
        if step < cfg.run.steps and not preempted and every > 0 and step % every == 0:
            checkpoint.save(engine, checkpoint_dir(cfg), step, loader.state_dict(), cfg, cfg.checkpoint.keep, owner)
        if cfg.log.eval_shards and ((cfg.log.eval_every and step % cfg.log.eval_every == 0) or step == cfg.run.steps):
            book.evaluation(step, evaluate(engine, eval_batches(cfg), dist.device, cfg.log.eval_batches))
        if preempted:
            return step, True
    return step, False


def train_step(engine: Any, micro_batches: list[dict], cfg: PretrainConfig, step: int, device: str) -> dict[str, float]:
    """One optimizer step: SSDU forward/backward per micro-batch, then DeepSpeed's (accumulating) step.

    Returns the step's metrics: loss (mean over every rank's samples), lr, grad_norm, samples (global).
    Raises NonFiniteLossError (on every rank) before any backward of a non-finite loss.
    """
    totals = torch.zeros(2, dtype=torch.float64)            # (sum of loss x samples, samples) on this rank
    lr = current_lr(engine)                                   # the lr this step's update uses
    for batch in micro_batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = ssdu_step_loss(engine, batch, cfg.objective, cfg.run.seed, step)
        check_finite(loss, step, batch["meta"])
        engine.backward(loss)
        engine.step()                                         # updates only at the accumulation boundary
        n = len(batch["meta"])
        totals += torch.tensor([float(loss.detach()) * n, n], dtype=torch.float64)
    if tdist.get_world_size() > 1:
        totals = totals.to(device)
        tdist.all_reduce(totals)
        totals = totals.cpu()
    return {"loss": float(totals[0] / totals[1]), "lr": lr, "grad_norm": grad_norm(engine), "samples": int(totals[1])}


def eval_batches(cfg: PretrainConfig) -> Iterator[dict]:
    """One pass over the held-out shards; every rank reads all of them (ZeRO-3 forwards are collective)."""
    eval_cfg = dataclasses.replace(cfg.data, shards=cfg.log.eval_shards, split=cfg.log.eval_split, mode="eval", workers=0)
    return iter(make_loader(eval_cfg, 0, 1))


def prepare_run_dir(cfg: PretrainConfig, dist: DistEnv, config: dict) -> Path:
    """Create the run directory; rank 0 takes the checkpoint folder's lock, records the resolved config and
    ds_config.json, and drops only provably incomplete checkpoint writes (pretrain.checkpoint)."""
    run_dir = Path(cfg.run.dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.lock_dir(checkpoint_dir(cfg))   # before anything is written: a second run stops here
        dump_config(cfg, run_dir / "config.toml")
        write_ds_config(config, run_dir)
        checkpoint.discard_incomplete(checkpoint_dir(cfg), log=lambda msg: print(msg, flush=True))
    tdist.barrier()
    return run_dir


class StopFlag:
    """SIGTERM/SIGUSR1 -> a flag; `agreed()` is True on every rank once any rank got a signal."""

    def __init__(self) -> None:
        self.signalled = False

    @classmethod
    def install(cls) -> "StopFlag":
        flag = cls()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = True   # only a flag: the loop saves at a step boundary, never inside a collective

    def agreed(self) -> bool:
        """Collective: the max of every rank's flag (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.signalled else 0.0],
                            device="cuda" if tdist.get_backend() == "nccl" else "cpu")
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())


if __name__ == "__main__":
    sys.exit(main())
