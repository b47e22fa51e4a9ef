"""Training throughput per model size: FLOPs per sample, samples/s, peak memory, MFU; ZeRO stages.

    python bench/throughput.py                                     # this CPU (fp32): FLOPs of every size,
                                                                   # steps of tiny and small
    python bench/throughput.py --set device=cuda --set sizes=tiny,small,base,1b --set compile=true
    deepspeed --num_gpus 8 bench/throughput.py --set device=cuda --set sizes=1b --set zero_stages=1,2,3

1. FLOPs per sample (every size, forward + backward, one real slice: 10 coils x 162 x 448, 3 frames),
   counted by torch.utils.flop_counter (matmuls, convolutions, attention; FFTs and elementwise ops
   are not counted, as in every MFU convention; the FFTs are ~0.1% here). The transformer is
   counted on the meta device (no memory, so 1b is countable on a laptop) and multiplied by the
   cascades; the coil-sensitivity CNN is counted on real tensors. For the sizes in `check_sizes`
   the whole model is also counted on real tensors at a small slice, and the ratio to the
   decomposition is printed (1.000 when the decomposition misses nothing).
2. For each size in `sizes`, each variant of {activation checkpointing off/on} x {torch.compile
   off/on (with `compile`)}: a plain PyTorch training step (SSDU loss, backward, AdamW) on
   `micro_batch` samples, timed over `steps` after `warmup` steps, in a fresh subprocess so peak
   memory is that variant's alone (CUDA: max_memory_allocated; CPU: growth of the peak RSS, VmHWM,
   over its value before the first step). Precision: bf16 parameters on CUDA (DeepSpeed's bf16 mode), fp32
   on CPU. MFU = FLOPs/sample x samples/s / peak FLOP/s; peak = `peak_tflops`, or the datasheet dense
   bf16 figure of the GPU (H100/H200 989, A100 312 TFLOP/s), or on CPU a measured fp32 matmul rate
   (so CPU MFU says how close the model runs to this CPU's own best matmul, not to a datasheet).
3. With `zero_stages` (under the deepspeed launcher, CUDA): step time and peak memory per stage
   through pretrain.engine, the code pretraining runs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from launch.cli import parse_args  # noqa: E402
from models.conditioning import FIELDS  # noqa: E402
from models.sizes import SIZES, ModelConfig, build_model, parameter_count, resolve_config  # noqa: E402

#: dense bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets (SXM parts).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass
class ThroughputConfig:
    """Training throughput benchmark."""

    frames: int = 3
    coils: int = 10
    ny: int = 162
    nx: int = 448
    sizes: list[str] = field(default_factory=lambda: ["tiny", "small"])
    """sizes whose training step is timed (FLOPs are counted for every size)"""
    check_sizes: list[str] = field(default_factory=lambda: ["tiny", "small"])
    """sizes whose FLOP decomposition is checked against the whole model at a small slice"""
    micro_batch: int = 1
    steps: int = 2
    warmup: int = 1
    checkpointing: list[bool] = field(default_factory=lambda: [False, True])
    compile: bool = False
    """also time each variant under torch.compile"""
    device: str = "cpu"
    threads: int = 0
    """CPU threads (0: all cores)"""
    peak_tflops: float = 0.0
    """denominator of MFU (0: the GPU's datasheet bf16 figure, or a measured CPU matmul rate)"""
    zero_stages: list[int] = field(default_factory=list)
    """ZeRO stages to time with DeepSpeed (run under the deepspeed launcher)"""
    one: str = ""
    """internal: time one variant "size/checkpointing/compile" and print JSON"""


# ---------------------------------------------------------------------------------------------- FLOPs


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def backbone_flops(size: str, frames: int, ny: int, nx: int, batch: int = 1) -> int:
    """Forward + backward FLOPs of one cascade's transformer, counted on the meta device."""
    model = build_model(size, device="meta")
    backbone = model.cascades[0].backbone
    image = torch.randn(batch, frames, ny, nx, dtype=torch.complex64, device="meta")
    cond = torch.randn(batch, len(FIELDS), backbone.dim, device="meta")
    return _count(lambda: backbone(image, cond).abs().sum().backward())


def _inputs(batch: int, frames: int, coils: int, ny: int, nx: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(batch, frames, ny, nx, generator=g) < 0.15).float()
    mask[:, :, ny // 2 - 10: ny // 2 + 10] = 1                  # 20-line ACS
    kspace = torch.randn(batch, frames, coils, ny, nx, dtype=torch.complex64, generator=g) * mask[:, :, None]
    meta = [{"modality": "Cine", "view": "sax", "pattern": "Uniform", "R": 8, "vendor": "Siemens",
             "field_T": 3.0, "__key__": f"s{i}"} for i in range(batch)]
    return kspace.to(device), mask.to(device), meta


def sensitivity_flops(size: str, frames: int, coils: int, ny: int, nx: int) -> int:
    """Forward + backward FLOPs of the coil-sensitivity CNN (real tensors: it runs numpy inside)."""
    model = build_model(size)
    kspace, mask, _ = _inputs(1, frames, coils, ny, nx)
    return _count(lambda: torch.view_as_real(model.sensitivities(kspace, mask)).abs().sum().backward())


def model_flops(size: str, frames: int, coils: int, ny: int, nx: int) -> int:
    """FLOPs per sample of one training forward + backward: cascades x transformer + sensitivities."""
    cfg = resolve_config(size)
    return cfg.cascades * backbone_flops(size, frames, ny, nx) + sensitivity_flops(size, frames, coils, ny, nx)


def whole_model_flops(size: str, frames: int, coils: int, ny: int, nx: int) -> int:
    """The same, counted on the whole model with real tensors (the check of the decomposition).

    Attention runs through SDPA's math backend here: the flop counter has no formula for the CPU
    flash-attention kernel and would silently count attention as zero (it does count the CUDA ones)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model(size)
    kspace, mask, meta = _inputs(1, frames, coils, ny, nx)
    with sdpa_kernel(SDPBackend.MATH):
        return _count(lambda: torch.view_as_real(model(kspace, mask, meta)["kspace"]).abs().sum().backward())


# ---------------------------------------------------------------------------------------------- steps


def peak_flops(cfg: ThroughputConfig) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12, "given"
    if cfg.device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} datasheet bf16 dense"
        raise SystemExit(f"unknown GPU {name!r}: pass --set peak_tflops=<dense bf16 TFLOP/s>")
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t, reps = time.perf_counter(), 8
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t), f"measured fp32 {n}x{n} matmul, {torch.get_num_threads()} threads"


def peak_rss_kib() -> int:
    """Peak resident memory of this process image (VmHWM). Not ru_maxrss: a child started by fork +
    exec inherits its parent's high-water mark there, which hid every step's growth."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def time_variant(cfg: ThroughputConfig, size: str, checkpointing: bool, compiled: bool) -> dict:
    """One training-step variant in this (fresh) process -> seconds per step and peak memory."""
    from pretrain.objective import ObjectiveConfig, ssdu_step_loss

    cuda = cfg.device == "cuda"
    torch.manual_seed(0)
    model = build_model(ModelConfig(size=size, activation_checkpointing=checkpointing), device=cfg.device)
    if cuda:
        model = model.to(torch.bfloat16)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kspace, mask, meta = _inputs(cfg.micro_batch, cfg.frames, cfg.coils, cfg.ny, cfg.nx, cfg.device)
    batch = {"kspace": kspace, "mask": mask, "meta": meta}
    objective = ObjectiveConfig()

    def step(i: int) -> None:
        loss = ssdu_step_loss(step_model, batch, objective, 0, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss0 = peak_rss_kib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(cfg.warmup):
        step(i)
    sync()
    t = time.perf_counter()
    for i in range(cfg.steps):
        step(cfg.warmup + i)
    sync()
    seconds = (time.perf_counter() - t) / cfg.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else (peak_rss_kib() - rss0) / 2**20
    return {"seconds": seconds, "peak_gib": peak, "params": parameter_count(model)}


def zero_stage_times(cfg: ThroughputConfig, size: str) -> list[dict]:
    """Step time and peak memory per ZeRO stage through pretrain.engine (every rank runs this)."""
    from pretrain import engine as E
    from pretrain.dist_env import read_dist_env
    from pretrain.objective import ssdu_step_loss
    from pretrain.settings import PretrainConfig

    dist = read_dist_env(cfg.device)
    E.init_distributed(dist)
    kspace, mask, meta = _inputs(cfg.micro_batch, cfg.frames, cfg.coils, cfg.ny, cfg.nx, dist.device)
    batch = {"kspace": kspace, "mask": mask, "meta": meta}
    rows = []
    for stage in cfg.zero_stages:
        for ckpt in cfg.checkpointing:
            pc = PretrainConfig()
            pc.run.device, pc.model.size, pc.model.activation_checkpointing = cfg.device, size, ckpt
            pc.data.micro_batch, pc.deepspeed.zero_stage = cfg.micro_batch, stage
            pc.optim.warmup_steps, pc.run.steps = 0, cfg.warmup + cfg.steps + 1
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            engine = E.build_engine(pc, dist, E.ds_config(pc, dist.world_size))
            times = []
            for i in range(cfg.warmup + cfg.steps):
                if cfg.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss = ssdu_step_loss(engine, batch, pc.objective, 0, i)
                engine.backward(loss)
                engine.step()
                if cfg.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cfg.device == "cuda" else float("nan")
            rows.append({"stage": stage, "checkpointing": ckpt, "seconds": sum(times[cfg.warmup:]) / cfg.steps,
                         "peak_gib": peak, "world": dist.world_size})
            engine.destroy()
            del engine
    return rows


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    cfg = parse_args(ThroughputConfig, description=__doc__.splitlines()[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.one:
        size, ckpt, comp = cfg.one.split("/")
        print(json.dumps(time_variant(cfg, size, ckpt == "1", comp == "1")))
        return
    shape = (cfg.frames, cfg.coils, cfg.ny, cfg.nx)
    if cfg.zero_stages:
        rows = zero_stage_times(cfg, cfg.sizes[0])
        if int(os.environ.get("RANK", "0")) == 0:
            flops = model_flops(cfg.sizes[0], *shape)
            peak, where = peak_flops(cfg)
            print(f"ZeRO stages, {cfg.sizes[0]}, micro-batch {cfg.micro_batch}/GPU, {rows[0]['world']} rank(s); MFU vs {where}")
            print("| stage | checkpointing | s/step | samples/s/GPU | peak GiB | MFU |\n|---|---|---|---|---|---|")
            for r in rows:
                sps = cfg.micro_batch / r["seconds"]
                print(f"| ZeRO-{r['stage']} | {r['checkpointing']} | {r['seconds']:.3f} | {sps:.2f} | "
                      f"{r['peak_gib']:.1f} | {flops * sps / peak:.1%} |")
        return

    print(f"slice: {cfg.coils} coils x {cfg.ny} x {cfg.nx}, {cfg.frames} frames; torch {torch.__version__}; "
          f"device {cfg.device}; {torch.get_num_threads()} threads", flush=True)
    flops = {}
    print("\n| size | params | FLOPs/sample (fwd+bwd) | transformer share | 6 x params x tokens |\n|---|---|---|---|---|")
    for size in SIZES:
        c = resolve_config(size)
        bb = c.cascades * backbone_flops(size, cfg.frames, cfg.ny, cfg.nx)
        flops[size] = bb + sensitivity_flops(size, *shape)
        params = parameter_count(build_model(size, device="meta"))
        tokens = cfg.frames * -(-cfg.ny // c.patch) * -(-cfg.nx // c.patch) + len(FIELDS)
        print(f"| {size} | {params / 1e6:,.1f}M | {flops[size] / 1e12:,.3f} T | {bb / flops[size]:.3f} | "
              f"{6 * params * tokens / 1e12:,.3f} T |", flush=True)
    small = (cfg.frames, 4, 48, 64)
    for size in cfg.check_sizes:
        ratio = whole_model_flops(size, *small) / model_flops(size, *small)
        print(f"check {size} at {small}: whole model / (cascades x transformer + sensitivities) = {ratio:.4f}")

    peak, where = peak_flops(cfg)
    print(f"\nMFU denominator: {peak / 1e12:.3f} TFLOP/s ({where})")
    print(f"\n| size | checkpointing | compile | s/step (micro-batch {cfg.micro_batch}) | samples/s | "
          f"peak {'GiB (allocated)' if cfg.device == 'cuda' else 'RSS growth GiB'} | MFU |\n|---|---|---|---|---|---|---|")
    for size in cfg.sizes:
        for ckpt in cfg.checkpointing:
            for comp in ([False, True] if cfg.compile else [False]):
                args = [f"--set={k}={getattr(cfg, k)}" for k in ("frames", "coils", "ny", "nx", "micro_batch",
                                                                  "steps", "warmup", "device", "threads")]
                run = subprocess.run([sys.executable, __file__, *args, f"--set=one={size}/{int(ckpt)}/{int(comp)}"],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    tail = (run.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"| {size} | {ckpt} | {comp} | failed: {tail[:120]} | | | |", flush=True)
                    continue
                r = json.loads(run.stdout.strip().splitlines()[-1])
                sps = cfg.micro_batch / r["seconds"]
                print(f"| {size} | {ckpt} | {comp} | {r['seconds']:.2f} | {sps:.3f} | {r['peak_gib']:.2f} | "
                      f"{flops[size] * sps / peak:.1%} |", flush=True)


if __name__ == "__main__":
    main()
