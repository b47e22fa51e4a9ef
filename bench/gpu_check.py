"""One prepared GPU check, under 9 minutes on one GPU, that prints one table: `bash launch/gpu_check.sh`.

    python bench/gpu_check.py                          # one CUDA GPU: the plan below, budget_s = 480
    python bench/gpu_check.py --set dry_run=true       # this CPU, tiny model, small slice: the same code
                                                       # paths in ~30 s (tests/test_gpu_check.py runs it)

What it measures, most important first (a job that would not finish inside the budget is skipped and
said so; a job that fails, runs out of memory or hangs is one row saying why, never the end of the run):

    peak      a bf16 8192^3 matmul (what this GPU really delivers; MFU is also given against it)
    flops     FLOPs per sample of every size (bench/throughput.py's count, CPU, alongside the GPU jobs)
    step      a plain PyTorch bf16 training step (SSDU loss, backward, AdamW) per size: 1b first at the
              shipped config (micro-batch 2, no activation checkpointing), then base, small, tiny,
              then with checkpointing, then under torch.compile: s/step, samples/s, peak GiB, MFU
    zero      DeepSpeed ZeRO-1, -3, -2 steps of 1b through pretrain.engine (the code pretraining
              runs) on one rank: s/step and peak GiB (on one GPU nothing is partitioned: the memory
              differences need 8 GPUs; the step times show each stage's own overhead)

Every job runs in a fresh subprocess (`--set job=...`, one JSON line back) with its own timeout, so
peak memory is that job's alone and a crash or hang costs only that job. The rows print as they
finish and once more as one table at the end; with `out`, also as JSON (results.json).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.cli import parse_args  # noqa: E402


@dataclass
class GpuCheckConfig:
    """The plan of one GPU check (dry_run: the same plan, scaled down to run on this CPU)."""

    budget_s: float = 480.0
    """wall-clock budget for every job together (the script must end inside 9 minutes)"""
    dry_run: bool = False
    """run on the CPU at a tiny scale (tiny model, small slice, 1 step): checks the code paths, not speed"""
    sizes: list[str] = field(default_factory=lambda: ["1b", "base", "small", "tiny"])
    micro_batch: int = 2
    """per GPU; 2 is configs/pretrain_1b.toml's"""
    frames: int = 3
    coils: int = 10
    ny: int = 162
    nx: int = 448
    steps: int = 5
    warmup: int = 2
    zero_stages: list[int] = field(default_factory=lambda: [1, 3, 2])
    compile_sizes: list[str] = field(default_factory=lambda: ["small", "base", "1b"])
    """sizes timed once more under torch.compile (last: compiling takes minutes)"""
    out: str = ""
    """folder for results.json ('' = print only)"""
    job: str = ""
    """internal: run one job ("peak", "flops", "step/<size>/<ckpt>/<compile>", "zero/<size>/<stage>")"""


DRY = {"sizes": ["tiny"], "micro_batch": 1, "coils": 4, "ny": 32, "nx": 48, "steps": 1, "warmup": 1,
       "zero_stages": [1], "compile_sizes": []}


def dry(cfg: GpuCheckConfig) -> GpuCheckConfig:
    """The CPU dry run: every job kind once, at a size that takes seconds (a field set on the command
    line, i.e. not at its GPU default, is kept)."""
    if not cfg.dry_run:
        return cfg
    gpu = asdict(GpuCheckConfig())
    return GpuCheckConfig(**{**asdict(cfg), **{k: v for k, v in DRY.items() if getattr(cfg, k) == gpu[k]}})


def device(cfg: GpuCheckConfig) -> str:
    return "cpu" if cfg.dry_run else "cuda"


# ---------------------------------------------------------------------------------------------- jobs


def job_peak(cfg: GpuCheckConfig) -> dict:
    import torch

    if cfg.dry_run:
        n, dtype = 512, torch.float32
    else:
        n, dtype = 8192, torch.bfloat16
    a = torch.randn(n, n, device=device(cfg), dtype=dtype)
    b = torch.randn(n, n, device=device(cfg), dtype=dtype)
    sync = torch.cuda.synchronize if device(cfg) == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync()
    name = torch.cuda.get_device_name() if device(cfg) == "cuda" else "cpu"
    return {"tflops": 2 * n**3 * reps / (time.perf_counter() - t) / 1e12, "device": name, "torch": torch.__version__}


def job_flops(cfg: GpuCheckConfig) -> dict:
    from bench.throughput import model_flops

    return {"flops": {s: model_flops(s, cfg.frames, cfg.coils, cfg.ny, cfg.nx) for s in cfg.sizes}}


def _throughput_cfg(cfg: GpuCheckConfig, **kw):
    from bench.throughput import ThroughputConfig

    return ThroughputConfig(frames=cfg.frames, coils=cfg.coils, ny=cfg.ny, nx=cfg.nx, micro_batch=cfg.micro_batch,
                            steps=cfg.steps, warmup=cfg.warmup, device=device(cfg), **kw)


def job_step(cfg: GpuCheckConfig, size: str, ckpt: bool, compiled: bool) -> dict:
    from bench.throughput import time_variant

    return time_variant(_throughput_cfg(cfg), size, ckpt, compiled)


def job_zero(cfg: GpuCheckConfig, size: str, stage: int) -> dict:
    from bench.throughput import zero_stage_times

    (row,) = zero_stage_times(_throughput_cfg(cfg, zero_stages=[stage], checkpointing=[False]), size)
    return row


def run_job(cfg: GpuCheckConfig) -> dict:
    kind, *args = cfg.job.split("/")
    if kind == "peak":
        return job_peak(cfg)
    if kind == "flops":
        return job_flops(cfg)
    if kind == "step":
        return job_step(cfg, args[0], args[1] == "1", args[2] == "1")
    if kind == "zero":
        return job_zero(cfg, args[0], int(args[1]))
    raise ValueError(f"unknown job {cfg.job!r}")


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class Job:
    name: str
    cap_s: float
    """at most this long (less when the budget has less left)"""
    what: str = ""


def plan(cfg: GpuCheckConfig) -> list[Job]:
    """Jobs in the order they run (most important first); `flops` runs alongside, on the CPU."""
    big = {"1b": 150.0, "base": 75.0}
    jobs = [Job("peak", 40, "bf16 matmul")]
    first = [s for s in cfg.sizes if s == "1b"]
    rest = [s for s in cfg.sizes if s != "1b"]
    jobs += [Job(f"step/{s}/0/0", big.get(s, 60.0)) for s in first]
    jobs += [Job(f"zero/{s}/{z}", 150.0) for s in (first or cfg.sizes[:1]) for z in cfg.zero_stages]
    jobs += [Job(f"step/{s}/0/0", big.get(s, 60.0)) for s in rest]
    jobs += [Job(f"step/{s}/1/0", big.get(s, 60.0)) for s in cfg.sizes]
    jobs += [Job(f"step/{s}/0/1", 240.0) for s in cfg.compile_sizes if s in cfg.sizes]
    if cfg.dry_run:                      # a loaded CPU runs a job in seconds, or in minutes: no caps but the budget
        jobs = [Job(j.name, max(j.cap_s, cfg.budget_s), j.what) for j in jobs]
    return jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cfg: GpuCheckConfig, job: str) -> subprocess.Popen:
    args = [f"--set={k}={v if not isinstance(v, list) else ','.join(map(str, v))}"
            for k, v in asdict(cfg).items() if k not in ("job", "out")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if cfg.dry_run:
        env["DS_ACCELERATOR"] = "cpu"
    elif job == "flops":                 # CPU counting beside the GPU jobs: leave their launch threads cores
        env["OMP_NUM_THREADS"] = "4"
    return subprocess.Popen([sys.executable, __file__, *args, f"--set=job={job}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)


def _collect(proc: subprocess.Popen, timeout: float) -> dict:
    """The job's JSON, or {"error": why}. A job past its time is killed with its process group."""
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "?")
        return {"error": f"exit {proc.returncode}: {why.strip()[:160]}"}
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"no result: {out.strip()[-160:]!r}"}


def _row(job: str, r: dict, flops: dict, peak: dict, cfg: GpuCheckConfig) -> str:
    kind, *a = job.split("/")
    if kind == "peak":
        what = f"| peak | {r.get('device', '')} | | | | | | | {r['tflops']:.0f} TFLOP/s measured | |" if "tflops" in r else ""
        return what or f"| peak | | | | | | | | | {r.get('error', '')} |"
    if kind == "flops":
        return ""
    size = a[0]
    ckpt, comp, zero = (a[1] == "1", a[2] == "1", "-") if kind == "step" else (False, False, f"ZeRO-{a[1]}")
    head = f"| {kind} | {size} | {'on' if ckpt else 'off'} | {'on' if comp else 'off'} | {zero} | {cfg.micro_batch} |"
    if "error" in r or "seconds" not in r:
        return f"{head} | | | | {r.get('error', r.get('skipped', '?'))} |"
    sps = cfg.micro_batch / r["seconds"]
    f = flops.get(size)
    mfu = ""
    if f and not cfg.dry_run:
        from bench.throughput import GPU_PEAK_TFLOPS

        sheet = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in peak.get("device", "")), None)
        mfu = f"{f * sps / (sheet * 1e12):.1%}" if sheet else "?"
        if "tflops" in peak:
            mfu += f" ({f * sps / (peak['tflops'] * 1e12):.0%} of matmul)"
    elif f:
        mfu = f"{f * sps / (peak.get('tflops', float('nan')) * 1e12):.1%} of matmul"
    return f"{head} {r['seconds']:.3f} | {sps:.2f} | {r['peak_gib']:.2f} | {mfu} | ok |"


HEADER = ("| job | size | act. ckpt | compile | ZeRO | micro-batch | s/step | samples/s | peak GiB | MFU | status |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def orchestrate(cfg: GpuCheckConfig) -> list[tuple[str, dict]]:
    t0 = time.monotonic()
    left = lambda: cfg.budget_s - (time.monotonic() - t0)  # noqa: E731
    print(f"gpu_check: {'CPU dry run' if cfg.dry_run else 'one CUDA GPU'}, budget {cfg.budget_s:.0f} s; slice "
          f"{cfg.coils} coils x {cfg.ny} x {cfg.nx}, {cfg.frames} frames; micro-batch {cfg.micro_batch}; "
          f"{cfg.warmup} warm-up + {cfg.steps} timed steps", flush=True)
    flops_proc = _spawn(cfg, "flops")                            # CPU work, alongside the GPU jobs
    results: list[tuple[str, dict]] = []
    flops: dict = {}
    peak: dict = {}
    print(HEADER, flush=True)
    for job in plan(cfg):
        budget = min(job.cap_s, left() - 5)
        if budget < 10:
            r = {"skipped": f"skipped: {max(left(), 0):.0f} s of the budget left"}
        else:
            r = _collect(_spawn(cfg, job.name), budget)
        if job.name == "peak":
            peak = r
        if not flops and flops_proc.poll() is not None:
            flops = _collect(flops_proc, 1).get("flops", {})
        results.append((job.name, r))
        print(_row(job.name, r, flops, peak, cfg), flush=True)
    if not flops:
        fr = _collect(flops_proc, max(left(), 1))
        flops = fr.get("flops", {})
        if "error" in fr:
            print(f"flops: {fr['error']} (no MFU column)", flush=True)
    results.append(("flops", {"flops": flops}))
    print(f"\nFLOPs per sample (fwd+bwd, counted): " + ", ".join(f"{s} {v / 1e12:.3f} T" for s, v in flops.items()))
    print(f"\nThe table ({time.monotonic() - t0:.0f} s; MFU against the datasheet dense bf16 peak, and in brackets "
          f"against the matmul this GPU delivered):\n{HEADER}")
    for name, r in results:
        if (line := _row(name, r, flops, peak, cfg)):
            print(line)
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = dry(parse_args(GpuCheckConfig, argv, description=__doc__.splitlines()[0]))
    if cfg.job:
        print(json.dumps(run_job(cfg)))
        return
    results = orchestrate(cfg)
    if cfg.out:
        path = Path(cfg.out) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump({"config": asdict(cfg), "results": dict(results)}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
