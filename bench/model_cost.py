"""What each model size costs: parameters, tokens, CPU forward+backward time and memory, ZeRO-3 states.

    python -m bench.model_cost                       # the markdown table (about 3 minutes on 2 cores)
    python -m bench.model_cost --set ny=21 --set nx=33 --set repeats=1   # a quick run

For every size: parameters and tokens per sample on a real CMRxRecon slice (10 coils x 162 x 448,
3 frames). For the CPU sizes (tiny, small): forward+backward wall time (median of `repeats` after one
warm-up) and peak memory, each size in a fresh subprocess so the numbers do not mix. Peak memory is
the process's peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), reported in
total and as its growth during forward+backward over the RSS after building the model and the data
(activations, gradients, autograd buffers). tracemalloc would not see PyTorch's allocator.

For every size, built on the meta device: DeepSpeed's ZeRO-3 model-state estimate per GPU (params,
gradients, Adam states; no offload, zero.Init) for 1 node x 8 GPUs and 4 nodes x 8 GPUs
(`estimate_zero3_model_states_mem_needs`, the numbers `..._all_cold` prints, which is also printed
for the 1b size), and an analytic bf16 activation estimate for one sample: 34 * N * D bytes per block
(Korthikanti et al. 2022, without the s^2 term that SDPA's fused kernels avoid), all blocks of all
cascades kept, or with activation checkpointing 2 * N * D per block plus one block's 34 * N * D.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from launch.cli import parse_args
from models.sizes import SIZES, build_model, parameter_count, resolve_config, tokens_per_sample


@dataclass
class BenchConfig:
    """Model cost benchmark."""

    frames: int = 3
    coils: int = 10
    ny: int = 162
    nx: int = 448
    repeats: int = 1
    """Timed forward+backward passes after one warm-up (median reported)."""
    cpu_sizes: list[str] = field(default_factory=lambda: ["tiny", "small"])
    threads: int = 2
    one: str = ""
    """Internal: measure just this size and print JSON (the parent runs each size in a subprocess)."""


def measure_cpu(cfg: BenchConfig, size: str) -> dict:
    """Forward+backward time and peak RSS for one size, in this (fresh) process."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model = build_model(size)
    kspace = torch.randn(1, cfg.frames, cfg.coils, cfg.ny, cfg.nx, dtype=torch.complex64)
    mask = (torch.rand(1, cfg.frames, cfg.ny, cfg.nx) < 0.15).float()
    mask[:, :, cfg.ny // 2 - 10: cfg.ny // 2 + 10] = 1  # 20-line ACS
    kspace = kspace * mask.unsqueeze(2)
    meta = [{"modality": "Cine", "view": "sax", "pattern": "Uniform", "R": 8, "vendor": "Siemens", "field_T": 3.0}]
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(cfg.repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(kspace, mask, meta)
        (out["image"].abs().mean() + out["kspace"].abs().mean()).backward()
        times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times[1:]), "peak_rss_mib": peak_kib / 1024,
            "growth_mib": (peak_kib - before_kib) / 1024}


def zero3_states(params: int, largest_layer: int, nodes: int) -> float:
    """GiB per GPU of ZeRO-3 model states (no offload, zero.Init), 8 GPUs per node."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=8,
                                                           num_nodes=nodes, cpu_offload=False,
                                                           cpu_offload_params=False, zero_init=True)
    return gpu_bytes / 2**30


def activation_gib(size: str, tokens: int) -> tuple[float, float]:
    """Analytic bf16 activations for one sample (GiB): all blocks kept, and with checkpointing."""
    cfg = resolve_config(size)
    blocks = cfg.depth * cfg.cascades
    per_block = 34 * tokens * cfg.dim
    return blocks * per_block / 2**30, (blocks * 2 * tokens * cfg.dim + per_block) / 2**30


def largest_layer_params(model: torch.nn.Module) -> int:
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def main() -> None:
    cfg = parse_args(BenchConfig)
    if cfg.one:
        print(json.dumps(measure_cpu(cfg, cfg.one)))
        return
    shape = f"{cfg.coils} coils x {cfg.ny} x {cfg.nx} x {cfg.frames} frames"
    rows, cpu = [], {}
    for size in cfg.cpu_sizes:
        overrides = [f"--set={k}={getattr(cfg, k)}" for k in ("frames", "coils", "ny", "nx", "repeats", "threads")]
        done = subprocess.run([sys.executable, "-m", "bench.model_cost", f"--set=one={size}", *overrides],
                              capture_output=True, text=True, check=True)
        cpu[size] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"measured {size}: {cpu[size]}", file=sys.stderr)
    for size in SIZES:
        model = build_model(size, device="meta")
        params, largest = parameter_count(model), largest_layer_params(model)
        tokens = tokens_per_sample(size, cfg.frames, cfg.ny, cfg.nx)
        act, act_ckpt = activation_gib(size, tokens)
        m = cpu.get(size)
        rows.append([size, f"{params / 1e6:,.1f}M", f"{tokens:,}",
                     f"{m['seconds']:.2f}" if m else "-", f"{m['peak_rss_mib']:,.0f}" if m else "-",
                     f"{m['growth_mib']:,.0f}" if m else "-",
                     f"{zero3_states(params, largest, 1):.2f}", f"{zero3_states(params, largest, 4):.2f}",
                     f"{act:.2f} / {act_ckpt:.2f}"])
    head = ["size", "params", "tokens/sample", "CPU fwd+bwd s", "CPU peak RSS MiB", "RSS growth fwd+bwd MiB",
            "ZeRO-3 states GiB/GPU 1x8", "ZeRO-3 states GiB/GPU 4x8", "bf16 activations GiB (all / ckpt)"]
    print(f"\nReal slice: {shape}, batch 1, {cfg.threads} CPU threads, torch {torch.__version__}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if len(cpu) >= 2:
        a, b = cfg.cpu_sizes[:2]
        print(f"\n{b} / {a} CPU time ratio: {cpu[b]['seconds'] / cpu[a]['seconds']:.2f}")
    model = build_model("1b", device="meta")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    for nodes in (1, 4):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            estimate_zero3_model_states_mem_needs_all_cold(parameter_count(model), largest_layer_params(model),
                                                           num_gpus_per_node=8, num_nodes=nodes)
        print(f"\n1b, {nodes} node(s) x 8 GPUs, DeepSpeed estimate_zero3_model_states_mem_needs_all_cold:\n```\n"
              f"{buf.getvalue().rstrip()}\n```")


if __name__ == "__main__":
    main()
