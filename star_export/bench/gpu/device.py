"""The run's record and the device: ``Run`` (gpu_bench.json rewritten as it grows, progress
lines), ``Clock`` (CUDA events or perf_counter), the device's description, its matmul and copy peaks,
peak-memory readings."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from star_export.bench.timing import Stats
from star_export.outputs import write_json

COPY_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}  # the copy-bandwidth probe's buffer


class Run:
    """gpu_bench.json as it grows: ``save`` rewrites it atomically; ``log`` prints a progress line."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s = out, budget_s
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {"schema": 1, "tool": "tools/gpu_bench.py", "status": "started"}
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu_bench.json"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
        self.data["elapsed_s"] = self.elapsed()
        write_json(self.path, self.data)


class Clock:
    """Seconds per call: CUDA events around the calls after a synchronize (cuda), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any], calls: int = 1) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t0) / calls
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


def device_info(device: torch.device) -> dict[str, Any]:
    import importlib.metadata

    info: dict[str, Any] = {"type": device.type, "host": platform.node(), "cpus": os.cpu_count()}
    for lib in ("torch", "transformers", "numpy", "matplotlib"):
        try:
            info[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            info[lib] = "absent"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            fp16_reduced_precision_reduction=torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        )
    else:
        from star_export.bench import machine_info

        info["name"] = machine_info(torch.get_num_threads())["cpu"]
    return info


def peak_matmul(
    clock: Clock, device: torch.device, dtype: torch.dtype, n: int, repeats: int
) -> dict[str, Any]:
    """The device's matmul rate on random (n, n) @ (n, n) in ``dtype``: the TFLOP/s ceiling."""
    g = torch.Generator(device=device).manual_seed(1)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    stats = Stats.of([clock.time(lambda: torch.matmul(a, b, out=c)) for _ in range(repeats)])
    assert stats is not None
    return {"n": n, "dtype": str(dtype), "s": stats.to_dict(), "tflops": 2 * n**3 / stats.median / 1e12}


def peak_copy(clock: Clock, device: torch.device, repeats: int) -> dict[str, Any]:
    """Device-to-device copy bandwidth (bytes read + written): the decode step's ceiling."""
    nbytes = COPY_BYTES[device.type]
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    stats = Stats.of([clock.time(lambda: dst.copy_(src)) for _ in range(repeats)])
    assert stats is not None
    return {"bytes": nbytes, "s": stats.to_dict(), "gbps": 2 * nbytes / stats.median / 1e9}


def memory_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
