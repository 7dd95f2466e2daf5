"""How a measurement is taken and summarised: statistics, rounds per batch, RSS sampling, the machine.

Everything here is runtime-agnostic: a timed variant (``variants.Variant``) records its samples
and summarises them with ``Stats``; memory is sampled around untimed calls only.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCORING_CALLS = 5  # back-to-back calls of the scoring subgraph per timed sample

Log = Callable[[str], None]


@dataclass(frozen=True)
class Stats:
    """Summary of a list of samples (seconds, or tokens/s)."""

    n: int
    median: float
    p10: float
    p90: float
    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats | None:
        if not samples:
            return None
        a = np.asarray(samples, dtype=np.float64)
        return cls(
            n=len(a),
            median=float(np.median(a)),
            p10=float(np.percentile(a, 10)),
            p90=float(np.percentile(a, 90)),
            mean=float(a.mean()),
            min=float(a.min()),
            max=float(a.max()),
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def repeats_for(batch: int, repeats: int) -> int:
    """Timed rounds of a batch: ``repeats`` at batch 1, fewer (>= 3) for the B times longer runs."""
    return repeats if batch <= 1 else max(min(3, repeats), math.ceil(repeats / batch))


class RssSampler:
    """Peak resident set size during a ``with`` block, sampled from /proc/self/statm.

    Falls back to ``resource.getrusage`` (process-lifetime peak) where /proc is absent.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval = interval_s
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_rss_bytes() -> int:
    """Peak RSS of the whole process so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info(threads: int) -> dict[str, Any]:
    import importlib.metadata

    cpu = platform.processor() or platform.machine()
    physical = None
    try:
        text = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
        pairs = set()
        phys = core = None
        for ln in [*text.splitlines(), ""]:
            if ln.startswith("physical id"):
                phys = ln.split(":", 1)[1].strip()
            elif ln.startswith("core id"):
                core = ln.split(":", 1)[1].strip()
            elif not ln.strip():
                if core is not None:
                    pairs.add((phys, core))
                phys = core = None
        physical = len(pairs) or None
    except OSError:
        pass
    flags = []
    with contextlib.suppress(OSError):
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        flags = sorted({f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx"))})
    versions = {"python": platform.python_version()}
    for lib in (
        "star_export",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "numpy",
        "matplotlib",
    ):
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = "absent"
    mem = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem = int(line.split()[1]) * 1024
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads_used": threads,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
