"""gpu_bench.json's derived numbers (FLOPs, TFLOP/s, ratios against the cost model's ceiling),
the printed table and the plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from star_export import cost as cost_mod
from star_export.bench.gpu.flags import DTYPES
from star_export.star import StarConfig


def _median(rows: dict[tuple, dict], key: tuple) -> float | None:
    row = rows.get(key)
    return row["prefill_s"]["median"] if row and row.get("prefill_s") else None


def annotate(
    data: dict[str, Any], dims: cost_mod.ModelDims, cfgs: dict[str, StarConfig], args: argparse.Namespace
) -> None:
    """Per variant: FLOPs, TFLOP/s, share of the matmul peak, KV bytes (model), decode bytes/s;
    then ``ratios``: pruned vs unpruned per batch and mode, with the cost model's ceiling."""
    dtype = DTYPES[args.dtype]
    peak = data.get("peak", {}).get("matmul", {}).get("tflops")
    copy_gbps = data.get("peak", {}).get("copy", {}).get("gbps")
    rows = {(v["kind"], v["mode"], v["batch"], v["tag"]): v for v in data.get("variants", [])}
    for (kind, _, batch, tag), v in rows.items():
        med = v["prefill_s"]["median"] if v.get("prefill_s") else None
        if kind != "prefill":
            continue
        cost = cost_mod.prefill_cost(dims, cfgs[tag], args.text_len, batch, dtype, all_vision_layers=True)
        step = cost_mod.decode_step_cost(dims, cfgs[tag], args.text_len, batch, dtype=dtype)
        v.update(
            flops=cost.flops,
            matmul_flops=cost.matmul_flops,
            l1=cost.l1,
            l2=cost.l2,
            kv_bytes_model=cost.kv_bytes,
            tflops=cost.flops / med / 1e12 if med else None,
            of_matmul_peak=cost.matmul_flops / med / 1e12 / peak if med and peak else None,
            decode_step_bytes_model=step.bytes_read,
        )
        tps = v.get("decode_tokens_per_s")
        if tps and copy_gbps:
            v["decode_gbps"] = step.bytes_read * tps["median"] / batch / 1e9
            v["decode_of_copy_bandwidth"] = v["decode_gbps"] / copy_gbps
    ratios = []
    for (kind, mode, batch, tag), v in rows.items():
        if kind != "prefill" or tag == "unpruned":
            continue
        base, med = (
            _median(rows, ("prefill", mode, batch, "unpruned")),
            _median(rows, (kind, mode, batch, tag)),
        )
        ceil = cost_mod.ceiling(dims, cfgs[tag], args.text_len, batch, dtype)
        scoring = _median(rows, ("scoring", mode, batch, tag))
        un_tps = (rows.get(("prefill", mode, batch, "unpruned")) or {}).get("decode_tokens_per_s")
        tps = v.get("decode_tokens_per_s")
        ratios.append(
            {
                "batch": batch,
                "mode": mode,
                "tag": tag,
                "keep1": cfgs[tag].keep1,
                "keep2": cfgs[tag].keep2,
                "speedup": base / med if base and med else None,
                "ceiling": ceil.speedup_ceiling,
                "of_ceiling": base / med / ceil.speedup_ceiling if base and med else None,
                "scoring_share_model": ceil.scoring_share,
                "scoring_s": scoring,
                "scoring_share": scoring / med if scoring and med else None,
                "decode_speedup": tps["median"] / un_tps["median"] if tps and un_tps else None,
                "kv_bytes_unpruned": ceil.kv_bytes_unpruned,
                "kv_bytes_pruned": ceil.kv_bytes_pruned,
                "kv_ratio": ceil.kv_bytes_pruned / ceil.kv_bytes_unpruned,
            }
        )
    data["ratios"] = ratios


def _fmt(x: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if x is None else format(x * scale, spec) + unit


TABLE_HEAD = (
    f"{'mode':<8}{'keep':>5} {'L1/L2':>9}  {'prefill ms [p10..p90]':<27}{'n':>3} {'speedup':>8} {'ceiling':>8} "
    f"{'of ceil':>8} {'TFLOP/s':>8} {'%peak':>6} {'decode tok/s':>13} {'KV MiB':>8} {'model MiB':>9}"
)


def table_row(v: dict[str, Any], ratio: dict[str, Any]) -> str:
    """One prefill variant's line of the table (``ratio``: its row of ``ratios``, {} when unpruned)."""
    keep = "N" if v["tag"] == "unpruned" else str(v["keep2"])
    if v["skipped"] or not v.get("prefill_s"):
        return f"{v['mode']:<8}{keep:>5}  skipped: {v['skipped'] or 'not timed'}"
    p = v["prefill_s"]
    spread = f"{p['median'] * 1e3:.2f} [{p['p10'] * 1e3:.2f}..{p['p90'] * 1e3:.2f}]"
    unpruned = v["tag"] == "unpruned"
    tps = v.get("decode_tokens_per_s")
    return (
        f"{v['mode']:<8}{keep:>5} {v.get('l1', 0):>4}/{v.get('l2', 0):<4}  {spread:<27}{p['n']:>3} "
        f"{_fmt(1.0 if unpruned else ratio.get('speedup'), '.2f', unit='x'):>8} "
        f"{_fmt(1.0 if unpruned else ratio.get('ceiling'), '.2f', unit='x'):>8} "
        f"{_fmt(None if unpruned else ratio.get('of_ceiling'), '.0f', 100, '%'):>8} "
        f"{_fmt(v.get('tflops'), '.3g'):>8} {_fmt(v.get('of_matmul_peak'), '.0f', 100, '%'):>6} "
        f"{_fmt(tps and tps['median'], '.1f'):>13} {_fmt(v.get('kv_bytes'), '.1f', 2**-20):>8} "
        f"{_fmt(v.get('kv_bytes_model'), '.1f', 2**-20):>9}"
    )


def format_table(data: dict[str, Any]) -> str:
    """One table: a block per batch, a row per (mode, config); then the scoring lines and parity."""
    s = data["settings"]
    dev = data["device"].get("name", "?")
    peak = data.get("peak", {}).get("matmul", {}).get("tflops")
    ratio = {(r["batch"], r["mode"], r["tag"]): r for r in data.get("ratios", [])}
    lines = []
    for batch in s["batches"]:
        lines.append(
            f"batch {batch}  (T={s['text_len']} text tokens, N={s['n_visual']}, K={s['layer']}, {s['dtype']} "
            f"on {dev}; matmul peak {_fmt(peak, '.1f')} TFLOP/s; medians of interleaved rounds)"
        )
        lines += [TABLE_HEAD, "-" * len(TABLE_HEAD)]
        for v in data.get("variants", []):
            if v["kind"] == "prefill" and v["batch"] == batch:
                lines.append(table_row(v, ratio.get((batch, v["mode"], v["tag"]), {})))
        for r in data.get("ratios", []):
            if r["batch"] == batch and r["scoring_share"] is not None:
                lines.append(
                    f"  STAR scoring alone, {r['mode']}, keep {r['keep2']}: {r['scoring_s'] * 1e3:.3f} ms = "
                    f"{r['scoring_share'] * 100:.2f}% of its pruned prefill (cost model: "
                    f"{r['scoring_share_model'] * 100:.2f}% of its FLOPs)"
                )
        lines.append("")
    lines.append("modes: " + "; ".join(f"{k}: {v}" for k, v in data.get("modes", {}).items()))
    if data.get("parity_table"):
        lines += ["", f"parity ({s['dtype']} vs fp32 on the device, {s['parity_layers']} layers):"]
        lines.append(data["parity_table"])
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    """Prefill median (p10..p90 bars) vs kept tokens, one panel per batch, a line per mode, and the
    cost model's ceiling (the unpruned median over the predicted speedup) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["settings"]
    batches = s["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    ratio = {(r["batch"], r["mode"], r["tag"]): r for r in data.get("ratios", [])}
    for ax, batch in zip(axes[0], batches, strict=True):
        modes = sorted({v["mode"] for v in data["variants"] if v["kind"] == "prefill"})
        for mode in modes:
            rows = [
                v
                for v in data["variants"]
                if v["kind"] == "prefill" and v["batch"] == batch and v["mode"] == mode and v.get("prefill_s")
            ]
            rows.sort(key=lambda v: v["keep2"])
            if not rows:
                continue
            x = [v["keep2"] for v in rows]
            y = np.array([v["prefill_s"]["median"] * 1e3 for v in rows])
            lo = y - [v["prefill_s"]["p10"] * 1e3 for v in rows]
            hi = np.array([v["prefill_s"]["p90"] * 1e3 for v in rows]) - y
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=f"{mode} measured")
            base = next((v for v in rows if v["tag"] == "unpruned"), None)
            if base:
                ceil = [
                    base["prefill_s"]["median"]
                    * 1e3
                    / (ratio.get((batch, mode, v["tag"]), {}).get("ceiling") or 1.0)
                    for v in rows
                ]
                ax.plot(x, ceil, linestyle="--", alpha=0.6, label=f"{mode} cost-model ceiling")
        ax.set_title(f"batch {batch}, {s['dtype']}, {data['device'].get('name', '?')}", fontsize=9)
        ax.set_xlabel("visual tokens kept by stage 2 (N = unpruned)")
        ax.set_ylabel("prefill ms (median, p10..p90)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
