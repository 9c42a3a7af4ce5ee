"""Helpers shared by the benchmarks: threads, interleaved timing, peak memory, FLOPs, matmul peak, JSON, markdown.

Benchmarks are scripts (`python benchmarks/bench_x.py`), so this module is imported as `common` from their folder.

Timing on a shared machine: every measured function runs in the same process, interleaved repeat by repeat (the
order rotates each repeat), so load from other processes hits all of them alike; ratios are taken per repeat and
summarised by their median and range. Each measurement records wall-clock time and this process's CPU time
(`time.process_time`); with one thread the CPU time is what the work costs, whatever else the machine runs.

On a GPU (`--device cuda`), a call returns once its kernels are queued, so `time_interleaved` waits for the device
before starting and stopping each clock (`device_synchronizer`); the wall-clock time is then the GPU's time, and the
CPU time only the host's share. Peak memory there is the CUDA allocator's (`measure_peak_cuda_memory`).
"""

import gc
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def set_threads(threads: int) -> None:
    """Intra-op threads of torch (and its OpenMP pool). On a machine shared with other jobs, OpenMP threads wait
    on each other and wall-clock times turn into noise: one thread gives repeatable ratios."""
    torch.set_num_threads(threads)


@dataclass
class Timing:
    """Seconds per call of one measured function: wall-clock and process CPU time, one entry per repeat."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def summary(self, items: float = 1.0) -> dict:
        """Median, min and max seconds, and `items` per second at the median (e.g. images per call)."""
        out = {}
        for name, values in (("wall", self.wall), ("cpu", self.cpu)):
            median = statistics.median(values)
            out[name] = {
                "seconds": values,
                "median_s": median,
                "min_s": min(values),
                "max_s": max(values),
                "per_s": items / median,
            }
        return out


def device_synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits until `device` has run everything queued on it (nothing to wait for on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    log: Callable[[str], None] = print,
    synchronize: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Time every function of `runs` `repeats` times, interleaved, after `warmup` untimed calls of each;
    `synchronize` (see `device_synchronizer`) runs before each clock starts and before it stops."""
    for name, run in runs.items():
        for _ in range(warmup):
            run()
    synchronize()
    timings = {name: Timing() for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        # Rotating the order spreads any slow drift of the machine's load over all functions.
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            gc.collect()
            synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            synchronize()
            timings[name].wall.append(time.perf_counter() - wall)
            timings[name].cpu.append(time.process_time() - cpu)
        log(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {timings[n].wall[-1]:.2f}s" for n in names))
    return timings


def paired_ratios(numerator: Timing, denominator: Timing) -> dict:
    """Ratios `numerator / denominator` of times (e.g. baseline time / our time = our speed-up), wall and CPU: per
    repeat (median and range) and of the fastest runs (`best`), the estimate least affected by other processes,
    which only ever add time."""
    out = {}
    for name in ("wall", "cpu"):
        times, others = getattr(numerator, name), getattr(denominator, name)
        ratios = [a / b for a, b in zip(times, others)]
        out[name] = {
            "best": min(times) / min(others),
            "ratios": ratios,
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
    return out


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set size (`getrusage`; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_peak_memory(prepare: Callable[[], Callable[[], object]], calls: int = 2) -> dict:
    """Peak RSS growth while `calls` calls of the function returned by `prepare()` run, in this process.

    Meant for a fresh process (see `in_subprocess`): `prepare` builds the model and inputs, then the baseline is the
    RSS before the first call and the result is the process's RSS high-water mark after the calls minus that
    baseline. It therefore counts what the calls add (gradients, optimiser states, activations, allocator caches),
    not the weights. `above_earlier_peak` is False if building reached a higher peak than the calls did, in which
    case the figure is only an upper bound.
    """
    run = prepare()
    gc.collect()
    before, peak_before = rss_bytes(), peak_rss_bytes()
    for _ in range(calls):
        run()
    peak = peak_rss_bytes()
    return {
        "rss_before_mib": before / 2**20,
        "peak_delta_mib": (peak - before) / 2**20,
        "above_earlier_peak": peak > peak_before,
    }


def measure_peak_cuda_memory(prepare: Callable[[], Callable[[], object]], calls: int = 2) -> dict:
    """`measure_peak_memory` on a GPU: the CUDA allocator's peak while the calls run, minus what was allocated
    before them (weights and inputs), in this process (the allocator counts per process, no subprocess needed)."""
    run = prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(calls):
        run()
    torch.cuda.synchronize()
    return {"allocated_before_mib": before / 2**20, "peak_delta_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}


def in_subprocess(function: Callable, *args, preload: tuple[str, ...] = ("torch", "transformers")):
    """`function(*args)` in a new process with its own memory high-water mark.

    The process is forked from a fork server that imported `preload` once (a forked child's `ru_maxrss` starts
    from its own pages, not its parent's), so each call costs a fork rather than a fresh interpreter's imports.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def count_flops(run: Callable[[], object]) -> int:
    """Floating-point operations of one call of `run` (matrix products, convolutions, attention), by
    `torch.utils.flop_counter.FlopCounterMode`; elementwise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def matmul_probe(
    size: int = 2048, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], object], int]:
    """One product of two `size` x `size` matrices of `dtype` on `device`, and its FLOPs: the device's matmul peak
    (with the current threads on a CPU). Time it among the measured functions (`time_interleaved`) so that fractions
    of the peak compare times taken under the same load."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def run():
        torch.mm(a, b, out=out)

    return run, 2 * size**3


def peak_probe(device: torch.device | str) -> tuple[str, tuple[Callable[[], object], int]]:
    """The matmul probe a device's fractions of peak are taken against, and its name: an fp32 2048 x 2048 product on
    a CPU; on a GPU, where training runs in bf16 on tensor cores, a bf16 8192 x 8192 product."""
    if torch.device(device).type == "cuda":
        return "bf16 matmul", matmul_probe(8192, device, torch.bfloat16)
    return "fp32 matmul", matmul_probe(2048, device)


def fraction_of_peak(flops: int, timing: Timing, peak_flops: int, peak_timing: Timing) -> dict:
    """Per-repeat achieved FLOP/s of `timing` over the matmul probe's FLOP/s in the same repeat, wall and CPU time."""
    out = {}
    for name in ("wall", "cpu"):
        fractions = [
            (flops / seconds) / (peak_flops / peak_seconds)
            for seconds, peak_seconds in zip(getattr(timing, name), getattr(peak_timing, name))
        ]
        out[name] = {"median": statistics.median(fractions), "min": min(fractions), "max": max(fractions)}
        out[name]["peak_flops_per_s"] = peak_flops / statistics.median(getattr(peak_timing, name))
    return out


def random_tokenizer(name: str):
    """The tokenizer family `name`'s default-size model in eval mode, with random weights that tokenize like trained
    ones would (VQ-KD's codebook filled with random unit codes, k-means centroids with random [0, 1] pixels): speed
    does not depend on the values."""
    from hf_mim.families import TOKENIZERS

    family = TOKENIZERS[name]
    model = family.model_class(family.config_class()).eval()
    with torch.no_grad():
        if hasattr(model, "codebook") and hasattr(model.codebook, "initted"):
            model.codebook.weight.copy_(torch.nn.functional.normalize(torch.randn_like(model.codebook.weight), dim=-1))
            model.codebook.initted.fill_(1)
        if hasattr(model, "set_centroids"):
            model.set_centroids(torch.rand_like(model.centroids))
    return model


def environment() -> dict:
    """What the numbers depend on: versions, threads, processor, and how busy the machine was."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, results: dict) -> None:
    with open(path, "w") as file:
        json.dump(results, file, indent=2)
    print(f"Wrote {path}")


__all__ = [
    "Timing",
    "count_flops",
    "device_synchronizer",
    "environment",
    "in_subprocess",
    "markdown_table",
    "fraction_of_peak",
    "matmul_probe",
    "measure_peak_cuda_memory",
    "peak_probe",
    "measure_peak_memory",
    "paired_ratios",
    "peak_rss_bytes",
    "random_tokenizer",
    "rss_bytes",
    "set_threads",
    "time_interleaved",
    "write_json",
]
