"""The results: bench.json's content, the printed table, issue #5's targets and the plot.

``write_report`` assembles the data from a finished run; ``format_table``, ``evaluate_targets``
and ``plot`` read only that data (a bench.json can be re-rendered).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from star_export import cost as cost_mod
from star_export.bench.timing import SCORING_CALLS, machine_info, max_rss_bytes, repeats_for

TARGET_KEEP = 64


@dataclass
class BenchReport:
    data: dict[str, Any]
    table: str
    json_path: Path
    plot_path: Path | None

    def to_dict(self) -> dict[str, Any]:
        return self.data


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.0f}" if s >= 0.1 else f"{s * 1000:.1f}"


def _find(
    rows: list[dict[str, Any]], runtime: str, batch: int, keep2: int | None = None, pruned: bool | None = None
):
    for r in rows:
        if r["runtime"] == runtime and r["batch"] == batch and not r["skipped"]:
            if (keep2 is None or r["keep2"] == keep2) and (pruned is None or r["pruned"] == pruned):
                return r
    return None


def _median(row: dict[str, Any] | None) -> float | None:
    return row["prefill_s"]["median"] if row and row.get("prefill_s") else None


def _tps(row: dict[str, Any] | None) -> float | None:
    return row["decode_tokens_per_s"]["median"] if row and row.get("decode_tokens_per_s") else None


def format_table(data: dict[str, Any]) -> str:
    rows, n = data["variants"], data["settings"]["n_visual"]
    ceilings = {(c["batch"], c["keep2"]): c["speedup_ceiling"] for c in data["cost"]["ceilings"]}
    out = []
    head = (
        f"{'runtime':<15}{'keep':>5}{'L1/L2':>9}  {'prefill ms':>8} {'[p10..p90]':<13}{'n':>3}"
        f"{'speedup':>9}{'ceiling':>9}{'of ceil':>8}{'vs HF':>7}{'ORT/torch':>10}"
        f"{'decode tok/s':>13}{'KV MiB':>8}{'peak dRSS':>10}"
    )
    for batch in data["settings"]["batches"]:
        t = data["settings"]["text_len"]
        out.append(
            f"batch {batch}  (T={t} text tokens, N={n}, K={data['settings']['layer']}; medians of interleaved runs)"
        )
        out.append(head)
        out.append("-" * len(head))
        hf = _median(_find(rows, "hf-eager", batch))
        for r in rows:
            if r["batch"] != batch or r["kind"] != "prefill":
                continue
            if r["skipped"]:
                line = f"{r['runtime']:<15} skipped: {r['skipped']}"
                if line not in out[-3:]:
                    out.append(line)
                continue
            pre = r["prefill_s"]
            keep = "N" if not r["pruned"] else str(r["keep2"])
            lengths = f"{t - 1 + r['keep1']}/{t - 1 + r['keep2']}"
            base = _median(_find(rows, r["runtime"], batch, pruned=False))
            speed = base / pre["median"] if base else None
            ceil = ceilings.get((batch, r["keep2"])) if r["pruned"] else 1.0
            if r["runtime"] == "hf-eager":
                ceil = None
            of_ceil = f"{speed / ceil * 100:.0f}%" if speed and ceil and r["pruned"] else "-"
            vs_hf = f"{hf / pre['median']:.2f}x" if hf else "-"
            ratio = "-"
            if r["runtime"] == "onnxruntime":
                torch_row = _find(rows, "torch-rewrite", batch, r["keep2"], r["pruned"])
                if torch_row:
                    ratio = f"{_median(torch_row) / pre['median']:.2f}x"
            tps = _tps(r)
            kv = r["kv_bytes"] if r["kv_bytes"] is not None else r["kv_bytes_model"]
            out.append(
                f"{r['runtime']:<15}{keep:>5}{lengths:>9}  {_ms(pre['median']):>8} "
                f"{'[' + _ms(pre['p10']) + '..' + _ms(pre['p90']) + ']':<13}{pre['n']:>3}"
                f"{(f'{speed:.2f}x' if speed else '-'):>9}{(f'{ceil:.2f}x' if ceil else '-'):>9}{of_ceil:>8}"
                f"{vs_hf:>7}{ratio:>10}{(f'{tps:.1f}' if tps else '-'):>13}"
                f"{(kv or 0) / 2**20:>8.1f}{r['peak_rss_delta_bytes'] / 2**20:>10.0f}"
            )
        for s in data["scoring"]:
            if s["batch"] == batch:
                out.append(
                    f"  STAR scoring alone, keep {s['keep2']}: {s['runtime']} {_ms(s['scoring_s'])} ms = "
                    f"{s['share'] * 100:.2f}% of its pruned prefill"
                )
        out.append("")
    for p in data.get("profile", []):
        out.append(
            f"onnxruntime profile, {p['label']}: STAR scoring nodes {p['scoring_share'] * 100:.2f}% of kernel time, "
            f"matrix products {p['matmul_class_share'] * 100:.0f}%, unattributed (fused) "
            f"{p['source_share']['unattributed'] * 100:.1f}%"
        )
    if data.get("ablation"):
        out.append("")
        out.append(
            "onnxruntime settings, batch 1 (median; speedup vs ORT_ENABLE_ALL, all threads = what the table uses):"
        )
        for g in data["ablation"]:
            out.append(f"  {g['graph']}:")
            for c in g["configs"]:
                exact = (
                    "same outputs"
                    if c["parity"]
                    else f"CHANGES OUTPUTS: logits rel diff {c['logits_max_rel_diff']:.1e}, "
                    f"stage-2 indices {c['stage2_idx_identical'] * 100:.0f}% identical"
                )
                out.append(
                    f"    {c['config']:<42}{_ms(c['median_s']):>7} ms  {c['speedup_vs_default']:.2f}x  {exact}"
                )
    if data.get("targets"):
        out.append("")
        t0 = data["targets"][0]
        out.append(f"targets (issue #5; onnxruntime, batch {t0['batch']}, keep {t0['keep2']}):")
        for t in data["targets"]:
            out.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['detail']}")
    m = data["machine"]
    out.append("")
    out.append(
        f"machine: {m['cpu']}, {m['physical_cores']} cores, {m['threads_used']} threads; load average "
        f"{m['loadavg_start']} -> {m.get('loadavg_end')}; torch {m['versions']['torch']}, "
        f"onnxruntime {m['versions']['onnxruntime']}"
    )
    return "\n".join(out)


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #5's targets at batch 1 and keep 64 (or the smallest keep) on onnxruntime."""
    rows = data["variants"]
    batch = 1 if 1 in data["settings"]["batches"] else min(data["settings"]["batches"])
    keep = TARGET_KEEP if TARGET_KEEP in data["settings"]["keeps"] else min(data["settings"]["keeps"])
    ort_p = _find(rows, "onnxruntime", batch, keep, True)
    ort_u = _find(rows, "onnxruntime", batch, pruned=False)
    out = []
    ceil = next(
        (
            c["speedup_ceiling"]
            for c in data["cost"]["ceilings"]
            if c["batch"] == batch and c["keep2"] == keep
        ),
        None,
    )
    if ort_p and ort_u and ceil:
        s = _median(ort_u) / _median(ort_p)
        out.append(
            {
                "target": "pruned vs unpruned onnxruntime prefill >= 85% of the cost-model ceiling",
                "value": s / ceil,
                "threshold": 0.85,
                "met": s / ceil >= 0.85,
                "detail": f"{s:.2f}x of a {ceil:.2f}x ceiling = {s / ceil * 100:.0f}%",
            }
        )
    tr_p = _find(rows, "torch-rewrite", batch, keep, True)
    if ort_p and tr_p:
        s = _median(tr_p) / _median(ort_p)
        out.append(
            {
                "target": "onnxruntime pruned prefill >= 2x faster than the PyTorch rewrite, same pruning",
                "value": s,
                "threshold": 2.0,
                "met": s >= 2.0,
                "detail": f"{_ms(_median(tr_p))} ms / {_ms(_median(ort_p))} ms = {s:.2f}x",
            }
        )
    hf = _find(rows, "hf-eager", batch)
    if ort_u and hf:
        s = _median(hf) / _median(ort_u)
        out.append(
            {
                "target": "unpruned onnxruntime prefill faster than unpruned HF eager",
                "value": s,
                "threshold": 1.0,
                "met": s > 1.0,
                "detail": f"{_ms(_median(hf))} ms / {_ms(_median(ort_u))} ms = {s:.2f}x",
            }
        )
    sc = next(
        (
            s
            for s in data["scoring"]
            if s["runtime"] == "onnxruntime" and s["batch"] == batch and s["keep2"] == keep
        ),
        None,
    )
    if sc:
        prof = next((p for p in data.get("profile", []) if p.get("keep2") == keep), None)
        share = max(sc["share"], prof["scoring_share"] if prof else 0.0)  # the larger of the two estimates
        extra = f", onnxruntime profiler attribution {prof['scoring_share'] * 100:.2f}%" if prof else ""
        out.append(
            {
                "target": "STAR scoring (stage 1 + stage 2) < 3% of pruned prefill",
                "value": share,
                "threshold": 0.03,
                "met": share < 0.03,
                "detail": f"scoring subgraph alone {_ms(sc['scoring_s'])} ms = {sc['share'] * 100:.2f}%{extra}",
            }
        )
    if ort_p and ort_u and _tps(ort_p) and _tps(ort_u):
        s = _tps(ort_p) / _tps(ort_u)
        out.append(
            {
                "target": "decode tokens/s pruned >= unpruned (onnxruntime)",
                "value": s,
                "threshold": 1.0,
                "met": s >= 1.0,
                "detail": f"{_tps(ort_p):.1f} vs {_tps(ort_u):.1f} tok/s = {s:.3f}x",
            }
        )
    for t in out:
        t.update(batch=batch, keep2=keep)
    return out


def plot(data: dict[str, Any], path: Path) -> Path:
    """Prefill latency vs kept visual tokens per runtime (p10..p90 bars) and the cost-model
    ceiling (the unpruned latency divided by the predicted speedup)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in data["variants"] if r["kind"] == "prefill" and not r["skipped"]]
    batches = data["settings"]["batches"]
    n = data["settings"]["n_visual"]
    ceilings = {(c["batch"], c["keep2"]): c["speedup_ceiling"] for c in data["cost"]["ceilings"]}
    fig, axes = plt.subplots(1, len(batches), figsize=(6.2 * len(batches), 4.6), squeeze=False)
    colors = {
        "hf-eager": "tab:gray",
        "torch-rewrite": "tab:orange",
        "onnxruntime": "tab:blue",
        "tensorrt": "tab:green",
    }
    for ax, batch in zip(axes[0], batches, strict=True):
        for runtime in ("hf-eager", "torch-rewrite", "onnxruntime", "tensorrt"):
            pts = sorted(
                (r for r in rows if r["runtime"] == runtime and r["batch"] == batch), key=lambda r: r["keep2"]
            )
            if not pts:
                continue
            x = [r["keep2"] for r in pts]
            y = [r["prefill_s"]["median"] * 1000 for r in pts]
            lo = [max(0.0, yy - r["prefill_s"]["p10"] * 1000) for yy, r in zip(y, pts, strict=True)]
            hi = [max(0.0, r["prefill_s"]["p90"] * 1000 - yy) for yy, r in zip(y, pts, strict=True)]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, color=colors[runtime], label=runtime)
            base = next((r for r in pts if not r["pruned"]), None)
            if base is not None and runtime != "hf-eager" and len(pts) > 1:
                xs = [r["keep2"] for r in pts]
                ys = [
                    base["prefill_s"]["median"] * 1000 / (ceilings.get((batch, k), 1.0) if k != n else 1.0)
                    for k in xs
                ]
                ax.plot(
                    xs,
                    ys,
                    linestyle="--",
                    color=colors[runtime],
                    alpha=0.6,
                    label=f"{runtime} ceiling (cost model)",
                )
        ax.set_xlabel(f"visual tokens kept by stage 2 (keep2; N = {n} unpruned)")
        ax.set_ylabel("prefill latency, ms (median, p10..p90)")
        ax.set_title(f"batch {batch}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = data["machine"]
    fig.suptitle(
        f"STAR prefill, {data['settings']['model']}: {m['cpu']}, {m['threads_used']} threads", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    st, variants, skipped, export_records, ablation_rows, profiles, loadavg_start, t_start
) -> BenchReport:
    """bench.json, bench.png and the printed table of a finished run (``st``: the run's ``_Setup``)."""
    from star_export.outputs import write_json

    st.log("[bench 6/6] report")
    rows = [v.summary() for v in variants]
    full = st.cfgs["unpruned"]
    ceilings = [
        cost_mod.ceiling(st.dims, cfg, st.text_len, b).to_dict()
        for b in st.batches
        for tag, cfg in st.cfgs.items()
        if tag != "unpruned"
    ]
    scoring = []
    for v in rows:
        if v["kind"] != "scoring" or not v["prefill_s"]:
            continue
        runtime = v["runtime"].removesuffix("-scoring")
        pre = _find(rows, runtime, v["batch"], v["keep2"], True)
        if pre and pre["prefill_s"]:
            scoring.append(
                {
                    "runtime": runtime,
                    "batch": v["batch"],
                    "keep2": v["keep2"],
                    "scoring_s": v["prefill_s"]["median"],
                    "prefill_s": pre["prefill_s"]["median"],
                    "share": v["prefill_s"]["median"] / pre["prefill_s"]["median"],
                    "method": f"the scoring subgraph (StarScoring) timed alone, interleaved with the prefills; "
                    f"a sample is the mean of {SCORING_CALLS} back-to-back calls",
                }
            )
    machine = machine_info(st.threads)
    machine["loadavg_start"] = loadavg_start
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["max_rss_bytes"] = max_rss_bytes()
    data: dict[str, Any] = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "model": st.source,
            "model_dir": str(st.model_dir),
            "keeps": st.keeps,
            "batches": st.batches,
            "runtimes": st.runtimes,
            "repeats": st.repeats,
            "rounds_per_batch": {str(b): repeats_for(b, st.repeats) for b in st.batches},
            "warmup": st.warmup,
            "decode_steps": st.decode_steps,
            "layer": st.layer,
            "text_len": st.text_len,
            "image_position": st.image_position,
            "n_visual": st.geo.n_visual,
            "threads": st.threads,
            "seed": st.seed,
            "onnxruntime_options": asdict(st.ort_options),
            "profile_ranges": {
                "batch": list(st.batch_range),
                "text_len": list(st.text_range),
                "max_new_tokens": st.max_new_tokens,
            },
        },
        "model": {
            "dims": st.dims.to_dict(),
            "parameters": sum(p.numel() for p in st.loaded.model.parameters()),
            "geometry": st.geo.to_dict(),
        },
        "cost": {
            "conventions": "star_export.cost: multiply-add = 2 FLOPs; see the module docstring",
            "ceilings": ceilings,
            "prefill": {
                tag: cost_mod.prefill_cost(st.dims, cfg, st.text_len, 1).to_dict()
                for tag, cfg in st.cfgs.items()
            },
            "hf_eager": cost_mod.prefill_cost(
                st.dims, full, st.text_len, 1, scoring=False, all_vision_layers=True
            ).to_dict(),
            "decode_step": {
                tag: cost_mod.decode_step_cost(st.dims, cfg, st.text_len, 1).to_dict()
                for tag, cfg in st.cfgs.items()
            },
        },
        "exports": export_records,
        "variants": rows,
        "scoring": scoring,
        "profile": profiles,
        "ablation": ablation_rows,
        "skipped": skipped,
    }
    data["targets"] = evaluate_targets(data)
    plot_path: Path | None = st.out / "bench.png"
    try:
        plot(data, plot_path)
    except ImportError as e:
        st.log(f"      no plot: {e} (pip install matplotlib)")
        plot_path = None
    json_path = st.out / "bench.json"
    data["files"] = {"json": str(json_path), "plot": str(plot_path) if plot_path else None}
    data["elapsed_s"] = time.perf_counter() - t_start
    table = format_table(data)
    data["table"] = table
    write_json(json_path, data)
    st.log(table)
    st.log(
        f"wrote {json_path}{' and ' + str(plot_path) if plot_path else ''} ({data['elapsed_s'] / 60:.1f} min)"
    )
    return BenchReport(data, table, json_path, plot_path)
