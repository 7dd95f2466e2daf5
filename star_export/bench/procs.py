"""Memory of a process tree from ``/proc``: a server and its backend stubs, an exporter and its workers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return out


def status_kib(pid: int, keys: Sequence[str] = ("VmRSS", "RssAnon", "RssFile")) -> dict[str, int]:
    """``keys`` of ``/proc/PID/status`` in KiB (0 where the process is gone): VmRSS and its anonymous
    and file-backed parts (memory-mapped files count as RssFile)."""
    out = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def pss(pid: int) -> int:
    """Proportional set size in bytes (``/proc/PID/smaps_rollup``): a page shared by k processes
    counts 1/k in each, so the sum over processes is the memory they use together."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def tree_rss(pid: int) -> dict[str, Any]:
    """Memory in bytes of ``pid`` and every descendant (tritonserver and its Python-backend stubs):
    ``rss`` (VmRSS summed: a page several processes map counts in each), ``anon`` / ``file`` its
    parts, ``pss`` (summed proportional set sizes: shared pages once), ``processes`` and
    ``per_process`` ({pid: rss})."""
    pids = [pid, *descendants(pid)]
    per = {p: status_kib(p) for p in pids}
    return {
        "rss": sum(v["VmRSS"] for v in per.values()) * 1024,
        "anon": sum(v["RssAnon"] for v in per.values()) * 1024,
        "file": sum(v["RssFile"] for v in per.values()) * 1024,
        "pss": sum(pss(p) for p in pids),
        "processes": len(pids),
        "per_process": {str(p): v["VmRSS"] * 1024 for p, v in per.items()},
    }
