"""Helpers shared by the benchmarks: timing (warmup, interleaved repeats, medians of wall and process CPU time),
machine description, load average and JSON output.

On a CPU shared with other jobs wall times drift with the load, so variants that are compared are always measured
interleaved (A, B, A, B, ...) in the same run and reported as ratios of medians; the process CPU time (all threads
of this process) is recorded next to the wall time, and the load average at the start and the end.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

# ----------------------------------------------------------------------------
# Entry point.


def run_script(main: Callable[[], object]) -> None:
    """Run a benchmark's ``main()``: bad input (a ``sid.config.UserError``) prints one line on stderr and exits with
    code 2, without a traceback."""
    from sid.config import UserError

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------
# Machine.


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return name


def machine_info(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return dict(torch=torch.__version__, python=platform.python_version(), device=str(device), device_name=name,
                cpu=cpu_model(), threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                loadavg_start=load_average())


def machine_line(info: dict) -> str:
    return (f"torch {info['torch']} | {info['device_name']} ({info['device']}) | CPU {info['cpu']}, threads "
            f"{info['threads']} of {info['cpu_count']} | load {info['loadavg_start']}")


def pick_threads(device: torch.device, requested: int | None) -> str:
    """Set torch's CPU threads: ``requested``, else torch's default on an idle CPU, else only the cores that other
    processes leave free (at least 1). OpenMP threads that share a core with another busy process wait for each
    other at every parallel region: one SiD step of the small preset took 0.6 s on 1 thread and 15-26 s on 2 threads
    next to a 2-thread training job on 2 cores. Returns the reason, for the record."""
    if requested:
        torch.set_num_threads(requested)
        return "--threads"
    load = load_average()
    if device.type != "cpu" or load is None:
        return "torch default"
    free = (os.cpu_count() or 1) - round(load[0])
    if free >= torch.get_num_threads():
        return "torch default (CPU idle)"
    torch.set_num_threads(max(free, 1))
    return f"cores left free by other processes (1-min load {load[0]}); override with --threads"


def tune_malloc() -> str:
    """Keep freed memory in glibc's heap: no mmap for blocks below 1 GiB, no trimming below 2 GiB. By default glibc
    serves blocks above its (at most 32 MiB) mmap threshold with mmap and unmaps them on free, so every large
    temporary is page-faulted in again on the next step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, (1 << 31) - 1) == 1  # M_MMAP_ / M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return "mallopt(M_MMAP_THRESHOLD=1 GiB, M_TRIM_THRESHOLD=2 GiB)" if ok else "mallopt unavailable (not glibc)"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def write_json(path: str | Path, result: dict) -> Path:
    """Write ``result`` with the command line and the date (UTC) in front; written to a temporary name and renamed,
    so a run killed while writing leaves the previous file whole."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command=command_line(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({**meta, **result}, indent=2) + "\n")
    os.replace(tmp, out)
    return out

# ----------------------------------------------------------------------------
# Timing.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    """bf16 = autocast to bfloat16 (weights stay fp32); fp32 = nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


Variant = Callable[[], object] | tuple[Callable[[], object], Callable[[], object]]


def measure(variants: dict[str, Variant], device: torch.device, *, warmup: int = 1, repeats: int = 5,
            budget_s: float = float("inf"), inner: dict[str, int] | None = None) -> dict[str, dict]:
    """Time every variant interleaved: ``warmup`` untimed rounds, then rounds of A, B, C, ... until ``repeats``
    rounds or ``budget_s`` seconds (at least 2 timed rounds when repeats >= 2).

    A variant is ``fn`` or ``(setup, fn)``; ``setup()`` runs untimed before each timed ``fn()`` (e.g. the forward
    pass before a timed backward). ``inner[name]`` calls of ``fn`` make one sample (for very short variants); the
    sample is the time per call. Returns {name: {"wall", "cpu", "sys": [s, ...], "minflt": [...]}}: raw samples of
    wall, process CPU (user + system, all threads) and system time in seconds, and minor page faults.
    """
    inner = inner or {}
    split = {k: (v if isinstance(v, tuple) else (None, v)) for k, v in variants.items()}
    samples = {k: {"wall": [], "cpu": [], "sys": [], "minflt": []} for k in variants}

    def run(name: str, timed: bool) -> None:
        setup, fn = split[name]
        n = inner.get(name, 1)
        if setup is not None:
            setup()
        sync(device)
        r0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        sync(device)
        if timed:
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            samples[name]["wall"].append((time.perf_counter() - t0) / n)
            samples[name]["cpu"].append((time.process_time() - c0) / n)
            samples[name]["sys"].append((r1.ru_stime - r0.ru_stime) / n)
            samples[name]["minflt"].append((r1.ru_minflt - r0.ru_minflt) / n)

    for _ in range(warmup):
        for name in split:
            run(name, timed=False)
    start = time.perf_counter()
    for i in range(repeats):
        for name in split:
            run(name, timed=True)
        if i >= min(1, repeats - 1) and time.perf_counter() - start > budget_s:
            break
    return samples


def summary(s: dict) -> dict:
    """Medians (ms) and the raw samples (ms) of one variant's ``measure`` entry."""
    ms = lambda xs: [round(1e3 * v, 3) for v in xs]
    return dict(time_ms=1e3 * statistics.median(s["wall"]), cpu_time_ms=1e3 * statistics.median(s["cpu"]),
                sys_time_ms=1e3 * statistics.median(s["sys"]), page_faults=statistics.median(s["minflt"]),
                repeats=len(s["wall"]), wall_ms_samples=ms(s["wall"]), cpu_ms_samples=ms(s["cpu"]),
                sys_ms_samples=ms(s["sys"]), page_fault_samples=s["minflt"])


def time_fn(fn, device: torch.device, warmup: int, repeats: int, budget_s: float) -> tuple[float, float, int]:
    """Median wall and process CPU seconds of fn() after warmup, and the number of repeats; stops early once
    budget_s is spent (at least 2 timed repeats)."""
    s = measure({"fn": fn}, device, warmup=warmup, repeats=repeats, budget_s=budget_s)["fn"]
    return statistics.median(s["wall"]), statistics.median(s["cpu"]), len(s["wall"])

# ----------------------------------------------------------------------------
# Networks.

# Image shape and classes of each preset: (resolution, channels, label_dim).
IMAGES = {"tiny": (32, 1, 10), "small": (32, 1, 10), "cifar10": (32, 3, 10), "imagenet64": (64, 3, 1000)}


def random_denoiser(preset: str, seed: int = 0):
    """A random EDMPrecond(HybridDenoiser) of ``preset`` at its image shape, with weights perturbed so that F != 0
    (adaLN-Zero starts at F = 0). Speed does not depend on what the weights are."""
    from backbones.denoiser import HybridDenoiser
    from sid.precond import EDMPrecond

    torch.manual_seed(seed)
    res, channels, label_dim = IMAGES[preset]
    net = EDMPrecond(HybridDenoiser.from_preset(preset, res, channels, label_dim=label_dim))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def run_train_seconds(run_dir: str | Path) -> float | None:
    """Training time of a run from its stats.jsonl: the sum of sec_per_kimg x kimg over the ticks. A tick's clock
    stops before its evaluation and restarts after it, so metrics are excluded; grids and checkpoints are counted.
    None when the run has no stats file or no tick."""
    path = Path(run_dir) / "stats.jsonl"
    if not path.is_file():
        return None
    total, prev = 0.0, 0.0
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                continue
            if "sec_per_kimg" in rec:
                total += rec["sec_per_kimg"] * (rec["kimg"] - prev)
                prev = rec["kimg"]
    return total if prev > 0 else None
