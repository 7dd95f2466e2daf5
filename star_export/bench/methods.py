"""What STAR's choice is worth: STAR against the selections a user would otherwise try, on one
question set, at several keeps (``python -m star_export compare``).

Every method is exported the same static way (the same graphs, a TopK with a literal K and a
Gather), so their latencies compare; each export is then run by ``eval`` on the same questions:

============== ================================================================================
method         what it keeps (keep = keep2 visual tokens)
============== ================================================================================
star           STAR: stage 1 keeps keep1 = min(N, 2 keep), stage 2 keeps keep at layer K
stage1-only    STAR's stage 1 alone, keep1 = keep (stage 2 keeps everything: VisionZip-like)
stage2-only    STAR's stage 2 alone, keep1 = N (stage 1 keeps everything: FastV-like at layer K)
random         ``keep`` tokens drawn once (seeded), the same for every image, at stage 1
stride         every (N / keep)-th token in raster order, at stage 1
inverted       STAR with the LOWEST scores kept at both stages (a deliberately wrong selection)
============== ================================================================================

The table: per method and keep, exact match (or VQA accuracy) with a 95 % Wilson interval, answer
agreement with the unpruned reference, the first token's KL(reference || method), median prefill
latency; ``methods.json`` and ``methods.png`` (accuracy vs prefill latency, one line per method).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from star_export.atomic import atomic_path, atomic_write
from star_export.errors import UsageError
from star_export.progress import Log, quiet

# method -> (selection, keep1 rule): "double" = min(N, 2 keep), "same" = keep, "all" = N
METHODS: dict[str, tuple[str, str]] = {
    "star": ("star", "double"),
    "stage1-only": ("star", "same"),
    "stage2-only": ("star", "all"),
    "random": ("random", "same"),
    "stride": ("stride", "same"),
    "inverted": ("inverted", "double"),
}
DEFAULT_METHODS = ("star", "stage1-only", "stage2-only", "random", "stride")


@dataclass
class MethodRow:
    method: str
    keep1: int
    keep2: int
    examples: int
    accuracy: float | None
    low: float | None  # the 95 % Wilson interval of the accuracy (exact match: a proportion)
    high: float | None
    agreement: float | None  # answers equal to the unpruned reference's
    kl_mean: float | None  # first token, KL(reference || method), nats
    prefill_ms: float | None  # median over requests


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` measured on ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def keep1_of(rule: str, keep: int, n: int) -> int:
    return {"double": min(n, 2 * keep), "same": keep, "all": n}[rule]


def compare(
    model: str | Path,
    data: str | Path,
    *,
    keeps: Sequence[int],
    methods: Sequence[str] = DEFAULT_METHODS,
    out: str | Path = "compare_out",
    limit: int | None = None,
    layer: int | None = None,
    log: Log = quiet,
) -> dict[str, Any]:
    """Export ``model`` once per method (every keep a level of that export, validate off: a baseline
    is not STAR) into ``out/exports/<method>``, evaluate each on ``data`` into ``out/eval/<method>``,
    and write ``out/methods.json`` and ``out/methods.png``. Returns the JSON's content."""
    from star_export import api
    from star_export.evaluate import run as evaluate

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if not keeps:
        raise UsageError("--keep: give at least one keep")
    out = Path(out)
    n = n_visual(model)
    bad = [k for k in keeps if not 1 <= k <= n]
    if bad:
        raise UsageError(f"--keep {bad[0]}: the model has N = {n} visual tokens")
    rows: list[MethodRow] = []
    unpruned: dict[str, Any] | None = None
    for method in methods:
        selection, rule = METHODS[method]
        where = out / "exports" / method
        log(f"[{method}] export keeps {', '.join(map(str, keeps))} (and N = {n}) -> {where}")
        levels = [*keeps, *([n] if n not in keeps else [])]  # keep = N: eval's unpruned row, same runtime
        api.export(
            model,
            keep=levels,
            keep1=[keep1_of(rule, k, n) for k in levels],
            layer=layer,
            out=where,
            validate=False,
            selection=selection,
        )
        log(f"[{method}] eval on {data}")
        report = evaluate(where, data, out=out / "eval" / method, limit=limit, max_new_tokens=8)
        for level in report.levels[1:]:  # levels[0]: the unpruned row
            acc, count = level.accuracy, level.examples
            low, high = wilson(acc, count) if acc is not None else (None, None)
            rows.append(
                MethodRow(method, level.keep1, level.keep2, count, acc, low, high, level.agreement,
                          level.kl_mean, level.prefill_ms)
            )  # fmt: skip
        if unpruned is None:
            ref = report.reference_accuracy
            unpruned = {
                "accuracy": ref,
                "interval": wilson(ref, report.examples) if ref is not None else None,
                "examples": report.examples,
                "prefill_ms": report.unpruned.prefill_ms,
                "source": report.unpruned_source,
            }
    result = {
        "schema": "star_export/methods/1",
        "machine": f"{platform.machine()}, {_cpus()} CPUs, {platform.system()}",
        "model": str(model),
        "data": str(data),
        "n_visual": n,
        "unpruned": unpruned,
        "rows": [asdict(r) for r in rows],
    }
    atomic_write(out / "methods.json", json.dumps(result, indent=2) + "\n")
    plot(result, out / "methods.png")
    return result


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def n_visual(model: str | Path) -> int:
    """N of a checkpoint (directory or hub id), from its config alone."""
    from star_export.load import auto_config, geometry_of, read_config, resolve_model

    model_dir, _ = resolve_model(model)
    _, family = read_config(model_dir)
    return geometry_of(family, auto_config(model_dir), model_dir=model_dir).n_visual


def format_table(result: dict[str, Any]) -> str:
    """The table as Markdown (the README's)."""
    u = result["unpruned"]
    lines = [
        f"unpruned (keep {result['n_visual']}): accuracy {_pct(u['accuracy'])} "
        f"[{_pct(u['interval'][0])}, {_pct(u['interval'][1])}] on {u['examples']} questions",
        "",
        "| method | keep | accuracy [95 % CI] | agreement with unpruned | first-token KL | prefill ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['keep2']} | {_pct(r['accuracy'])} [{_pct(r['low'])}, {_pct(r['high'])}] "
            f"| {_pct(r['agreement'])} | {_num(r['kl_mean'], '.3f')} | {_num(r['prefill_ms'], '.1f')} |"
        )
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accuracy vs median prefill latency, one line per method (its keeps as points)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        pts = sorted(
            (r["prefill_ms"], r["accuracy"], r["low"], r["high"], r["keep2"])
            for r in result["rows"]
            if r["method"] == method and r["prefill_ms"] is not None and r["accuracy"] is not None
        )
        if not pts:
            continue
        x = [p[0] for p in pts]
        y = [100 * p[1] for p in pts]
        err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        if method == "star":
            for p in pts:
                ax.annotate(f"{p[4]}", (p[0], 100 * p[1]), textcoords="offset points", xytext=(4, 4))
    u = result["unpruned"]
    if u and u["accuracy"] is not None:
        ax.axhline(
            100 * u["accuracy"], color="grey", linestyle="--", label=f"unpruned ({result['n_visual']})"
        )
    ax.set_xlabel("prefill latency, median (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("STAR vs baseline selections (labels: tokens kept)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
