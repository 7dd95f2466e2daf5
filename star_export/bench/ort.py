"""onnxruntime in the bench: session options, the backend, the profiler, and the settings comparison.

``ort_ablation`` times the prefill under each setting (optimisation levels, threads, spinning,
the transformer optimizer, int8 weights) and compares every setting's outputs with the default's.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from star_export import cost as cost_mod
from star_export.bench.timing import Log, Stats
from star_export.bench.variants import CallRunner, Variant, interleave
from star_export.encoding import cast_inputs, declared_dtypes

SCORING_SOURCES = ("topk_sorted(", "stage1_scores(", "stage2_scores(")
ORT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtOptions:
    """onnxruntime session settings one variant runs with."""

    level: str = "all"  # disable | basic | extended | all
    threads: int = 0  # intra-op threads; 0 = onnxruntime's default (physical cores)
    spinning: bool = True
    profile_prefix: str | None = None

    def session_options(self):
        import onnxruntime as ort

        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[self.level]
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = self.profile_prefix
        return opts


def ort_session(path: str | Path, options: OrtOptions):
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), sess_options=options.session_options(), providers=["CPUExecutionProvider"]
    )


class OrtBackend:
    """prefill.onnx (+ decode.onnx) sessions with explicit options; numpy in, numpy out."""

    name = "onnxruntime"

    def __init__(self, prefill_path: str | Path, decode_path: str | Path | None, options: OrtOptions):
        self.options = options
        self._prefill = ort_session(prefill_path, options)
        self._decode = ort_session(decode_path, options) if decode_path else None
        self._pout = [o.name for o in self._prefill.get_outputs()]
        self._dout = [o.name for o in self._decode.get_outputs()] if self._decode else []
        self._pin = declared_dtypes(self._prefill.get_inputs())  # float32 pixels -> an fp16 graph's fp16
        self._din = declared_dtypes(self._decode.get_inputs()) if self._decode else {}

    def prefill(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fed = cast_inputs(feeds, self._pin)
        return dict(zip(self._pout, self._prefill.run(self._pout, fed), strict=True))

    def decode(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._decode is not None
        return dict(zip(self._dout, self._decode.run(self._dout, cast_inputs(feeds, self._din)), strict=True))

    def end_profiling(self) -> str:
        return self._prefill.end_profiling()


def transformer_optimize(src: Path, dst: Path, dims: cost_mod.ModelDims) -> dict[str, int]:
    """onnxruntime's transformer optimizer with the CLIP fusions (vision attention, QuickGelu,
    LayerNorm / SkipLayerNorm) and the RMSNorm / residual fusions of its BERT pipeline (which the
    CLIP model type inherits). The decoder attention is written out explicitly (it must expose
    layer K-1's probabilities) and is not fused. Returns the fused-op counts."""
    import logging

    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(
            str(src),
            model_type="clip",
            num_heads=dims.vision_heads,
            hidden_size=dims.vision_hidden,
            opt_level=0,
            use_gpu=False,
        )
        model.save_model_to_file(str(dst), use_external_data_format=True)
    graph = onnx.load(str(dst), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.domain == "com.microsoft" or node.op_type in ("LayerNormalization",):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def ort_profile(
    path: Path, feeds: dict[str, np.ndarray], options: OrtOptions, prefix: Path, runs: int = 2
) -> dict[str, Any]:
    """onnxruntime's profiler over ``runs`` prefills (after one warm-up): kernel time per op type
    and the STAR scoring's share, attributing each kernel to its exported node's source line."""
    import onnx

    meta: dict[str, str] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        meta[node.name] = props.get("pkg.torch.onnx.stack_trace", "")
    sess = ort_session(path, OrtOptions(options.level, options.threads, options.spinning, str(prefix)))
    outs = [o.name for o in sess.get_outputs()]
    sess.run(outs, feeds)
    for _ in range(runs):
        sess.run(outs, feeds)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    by_op: dict[str, float] = {}
    by_source = {"scoring": 0.0, "other": 0.0, "unattributed": 0.0}
    model_runs = []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            model_runs.append(e["dur"])
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op, dur = e["args"].get("op_name", "?"), float(e["dur"])
        by_op[op] = by_op.get(op, 0.0) + dur
        # fused nodes are named "<first original node>/<FusionName>/": attribute by that name
        src = meta.get(node.split("/")[0])
        if src is None:
            by_source["unattributed"] += dur
        elif any(s in src for s in SCORING_SOURCES):
            by_source["scoring"] += dur
        else:
            by_source["other"] += dur
    total = sum(by_op.values()) or 1.0
    timed_runs = model_runs[1:] if len(model_runs) > 1 else model_runs
    trace.unlink(missing_ok=True)
    matmul_ops = ("MatMul", "FusedMatMul", "Gemm", "Conv", "Attention", "MatMulNBits")
    return {
        "graph": str(path),
        "runs": runs,
        "run_ms": [d / 1000 for d in timed_runs],
        "kernel_ms_per_run": total / 1000 / (runs + 1),
        "op_share": {k: v / total for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "matmul_class_share": sum(v for k, v in by_op.items() if k in matmul_ops) / total,
        "source_share": {k: v / total for k, v in by_source.items()},
        "scoring_share": by_source["scoring"] / total,
    }


def quantize_int8(src: Path, dst: Path) -> Path:
    """onnxruntime's dynamic int8 quantization of the weight MatMuls / Gemms (activations
    quantized per call). Not parity-preserving: measured only to show what it would buy."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
    return dst


def ort_ablation(
    path: Path,
    feeds: dict[str, np.ndarray],
    dims: cost_mod.ModelDims,
    threads: int,
    rounds: int,
    tag: str,
    out: Path,
    log: Log,
) -> dict[str, Any]:
    """Prefill under each onnxruntime setting, interleaved; speedups vs ORT_ENABLE_ALL.

    Every setting is checked against ``ORT_ENABLE_ALL``'s outputs: logits max relative
    difference and the share of identical kept indices. Settings that keep the model exact
    (``parity``) are candidates; int8 quantization is reported for what it would buy only.
    """
    configs: list[tuple[str, Path, OrtOptions]] = [
        ("ORT_DISABLE_ALL", path, OrtOptions("disable", threads, spinning=False)),
        ("ORT_ENABLE_BASIC", path, OrtOptions("basic", threads, spinning=False)),
        ("ORT_ENABLE_EXTENDED", path, OrtOptions("extended", threads, spinning=False)),
        ("ORT_ENABLE_ALL", path, OrtOptions("all", threads, spinning=False)),
        ("ALL, 1 thread", path, OrtOptions("all", 1, spinning=False)),
        ("ALL, spinning threads (onnxruntime's default)", path, OrtOptions("all", threads, spinning=True)),
    ]
    notes: list[str] = []
    fused: dict[str, int] | None = None
    for name, make in (
        ("ALL + transformer optimizer", lambda d: transformer_optimize(path, d, dims)),
        ("ALL + int8 weights (dynamic quantization)", lambda d: quantize_int8(path, d)),
    ):
        dst = out / "graphs" / tag / ("prefill.ortopt.onnx" if "optimizer" in name else "prefill.int8.onnx")
        t0 = time.perf_counter()
        try:
            result = make(dst)
        except Exception as e:  # a tool that cannot handle a graph is a finding, not a crash
            first = str(e).splitlines()[0] if str(e) else ""
            notes.append(f"{name}: failed, {type(e).__name__}: {first}")
            log(f"      {notes[-1]}")
            continue
        if isinstance(result, dict):
            fused = result
        configs.append((name, dst, OrtOptions("all", threads, spinning=False)))
        log(
            f"      {name} on {tag}: {fused if isinstance(result, dict) else dst.name} ({time.perf_counter() - t0:.0f}s)"
        )
    variants = []
    outputs: dict[str, list[np.ndarray]] = {}
    names = ["logits", "stage1_keep_idx", "stage2_keep_idx"]
    for name, p, opts in configs:
        sess = ort_session(p, opts)
        outs = [o.name for o in sess.get_outputs()]
        outputs[name] = sess.run(names, feeds)
        v = Variant(name, "onnxruntime", feeds["input_ids"].shape[0], 0, 0, 0, True, rounds)
        v.runner = CallRunner(lambda sess=sess, outs=outs: lambda: sess.run(outs, feeds))
        v.runner.load()
        variants.append(v)
    interleave(variants, 0, 1, timed=False, log=lambda s: None, label="ablation warm-up")
    interleave(variants, 0, rounds, timed=True, log=log, label=f"settings {tag}")
    base = Stats.of(next(v for v in variants if v.name == "ORT_ENABLE_ALL").prefill_s)
    ref = outputs["ORT_ENABLE_ALL"]
    rows = []
    for v in variants:
        stats = Stats.of(v.prefill_s)
        logits, idx1, idx2 = outputs[v.name]
        rel = float(np.abs(logits - ref[0]).max() / max(float(np.abs(ref[0]).max()), 1e-30))
        same = float(np.mean(idx1 == ref[1])), float(np.mean(idx2 == ref[2]))
        rows.append(
            {
                "config": v.name,
                "median_s": stats.median,
                "p10_s": stats.p10,
                "p90_s": stats.p90,
                "n": stats.n,
                "speedup_vs_default": base.median / stats.median,
                "logits_max_rel_diff": rel,
                "stage1_idx_identical": same[0],
                "stage2_idx_identical": same[1],
                "parity": rel <= 1e-4 and same == (1.0, 1.0),
            }
        )
        v.runner = None
    gc.collect()
    return {
        "graph": f"prefill {tag}",
        "batch": feeds["input_ids"].shape[0],
        "configs": rows,
        "fused_ops": fused,
        "notes": notes,
    }
