"""Stage 6: speed, measured. Prefill latency and decode tokens/s of every runtime, side by side.

One process, one run: the graphs are exported (``keep1 = keep2 = N`` = unpruned, and each
``--keep``), every variant is set up, then the variants are timed *interleaved*: each round runs
every variant once (prefill, then ``decode_steps`` decode steps from the prefill's cache), in an
order rotated by one each round, so drift (thermal, other load) hits all variants alike.

Variants, per batch:
  * ``hf-eager``: the unmodified ``LlavaForConditionalGeneration`` (eager attention) on the
    expanded prompt (N placeholder copies), ``use_cache=True``; decode with its own cache.
  * ``torch-rewrite``: the exported modules themselves, ``StarPrefill`` / ``StarDecode``, in
    eager PyTorch (unpruned and each keep).
  * ``onnxruntime``: ``prefill.onnx`` + ``decode.onnx`` on the CPU execution provider,
    ``ORT_ENABLE_ALL``, intra-op threads = the benchmark's threads, thread spinning off
    (unpruned and each keep). Spinning is onnxruntime's default, but its idle threads keep a
    core busy for 10-100 ms after a run, which in an interleaved benchmark slows whatever runs
    next (measured: a 3 ms call right after an onnxruntime prefill took 7-8 ms with spinning,
    3 ms without); the settings comparison measures spinning on vs off.
  * ``*-scoring``: STAR's stage 1 + stage 2 scoring and selection alone (``StarScoring``:
    the same ``star.py`` calls as ``StarPrefill``, on inputs of the same shapes), exported to
    ONNX and timed like the rest, to give the scoring's share of the pruned prefill. A second
    estimate comes from onnxruntime's profiler: the kernel time of the nodes whose source line
    (the exporter's ``pkg.torch.onnx.stack_trace``) calls ``stage1_scores``, ``stage2_scores`` or
    ``topk_sorted``, over the whole pruned prefill.
  * ``tensorrt``: where TensorRT and a CUDA GPU are present; skipped with the reason otherwise.

Statistics: median and p10/p90 over the timed rounds. Each variant's set-up ends with one
untimed prefill + decode (the warm-up; ``warmup`` adds untimed interleaved rounds). Batch 1 runs
``repeats`` rounds; a batch B > 1 runs ``max(3, ceil(repeats / B))`` (its runs are B times longer
and relatively less noisy). Memory: resident set size sampled every 2 ms from
``/proc/self/statm`` during the untimed calls only (never while timing): the peak over the
process and the peak growth over the RSS at the start of a call (the call's working memory,
including onnxruntime's arena growth on its first call); KV-cache bytes are read from the cache
tensors and compared with the cost model.

onnxruntime's own means are measured on batch 1 (unpruned and the first keep), interleaved the
same way: graph optimisation levels, one intra-op thread vs all, thread spinning on, and
onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``, CLIP attention /
QuickGelu / SkipLayerNorm and RMSNorm + residual fusions) on top of ``ORT_ENABLE_ALL``, and, for
what it would buy only, dynamic int8 quantization of the weight MatMuls (it changes the outputs
and, on the pruned graph, the kept tokens; every setting's outputs are compared with the default's).

Writes ``bench.json`` (machine, versions, settings, every sample), ``bench.png`` (prefill
latency vs kept tokens with the cost-model ceiling) and prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import io
import json
import math
import os
import platform
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from star_export import cost as cost_mod
from star_export import star
from star_export.errors import UsageError
from star_export.load import Geometry
from star_export.star import StarConfig

DEFAULT_RECIPE = "llava-bench"
DEFAULT_KEEPS = (64, 128, 192)
DEFAULT_BATCHES = (1, 4)
RUNTIMES = ("onnxruntime", "torch", "tensorrt")
DEFAULT_TEXT_LEN = 48
DEFAULT_IMAGE_POSITION = 5
SCORING_SOURCES = ("topk_sorted(", "stage1_scores(", "stage2_scores(")
TARGET_KEEP = 64
SCORING_CALLS = 5  # back-to-back calls of the scoring subgraph per timed sample
ORT_LEVELS = ("disable", "basic", "extended", "all")

Log = Callable[[str], None]

DESCRIPTION = (
    "Export the unpruned (keep1 = keep2 = N) and the STAR-pruned graphs, then time every variant "
    "interleaved in one process: prefill latency (median, p10/p90) and decode tokens/s of the unmodified "
    "HF model (eager), the PyTorch rewrite and onnxruntime (TensorRT where present), with peak memory, "
    "KV-cache bytes, the STAR scoring's share and onnxruntime's settings compared. Prints one table with "
    "each speedup next to the cost model's ceiling; writes bench.json and bench.png into --out."
)
EPILOG = """\
examples:
  python -m star_export bench
      llava-bench (N=576, 48 text tokens, 12-layer GQA decoder), keeps 64,128,192, batches 1 and 4:
      about 10 minutes on 2 CPU cores
  python -m star_export bench --recipe llava-tiny --keep 64 --batch 1 --repeats 3 --no-ablation
      a quick look (about a minute)
  python -m star_export bench --runtime onnxruntime --keep 64 --batch 1 --repeats 30

graphs are exported into --out/graphs/ and reused by the next run while the model and the export
code are unchanged. Run on a quiet machine: the load average before and after is recorded.
"""


# ---------------------------------------------------------------------------------- statistics


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


# ---------------------------------------------------------------------------------- memory


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


# ---------------------------------------------------------------------------------- inputs


def bench_inputs(
    geo: Geometry, batch: int, text_len: int, image_position: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded random images and prompts: every row ``text_len`` tokens, BOS first, the ONE image
    placeholder at ``image_position``, no padding (all rows cost the same)."""
    if not 1 <= image_position <= text_len - 2:
        raise UsageError(f"image position {image_position} must leave a token before and after it")
    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((batch, 3, geo.image_size, geo.image_size), dtype=np.float32)
    ids = rng.integers(3, geo.vocab_size, (batch, text_len), dtype=np.int64)
    ids[ids == geo.image_token_id] = 3
    ids[:, 0] = 1
    ids[:, image_position] = geo.image_token_id
    mask = np.ones((batch, text_len), dtype=np.int64)
    return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------- scoring graph


class StarScoring(torch.nn.Module):
    """STAR's scoring and selection alone: exactly the ``star.py`` calls of ``StarPrefill``.

    features (B, N, dv) from the vision tower, probs (B, H, L1, L1) of layer K-1, input_ids (B, T)
    -> stage1_keep_idx (B, keep1), stage2_keep_idx (B, keep2).
    """

    def __init__(self, cfg: StarConfig, image_token_id: int):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id

    def forward(self, features: torch.Tensor, probs: torch.Tensor, input_ids: torch.Tensor):
        cfg = self.cfg
        p = star.image_position(input_ids, self.image_token_id)  # (B,)
        keep1_idx = star.topk_sorted(star.stage1_scores(features), cfg.keep1)  # (B, keep1)
        selected = star.topk_sorted(star.stage2_scores(probs, p, cfg.keep1), cfg.keep2)  # (B, keep2)
        return keep1_idx, torch.gather(keep1_idx, 1, selected)


def scoring_inputs(
    geo: Geometry, dims: cost_mod.ModelDims, cfg: StarConfig, feeds: dict[str, np.ndarray], seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs of the shapes the scoring sees inside the pruned prefill (values: seeded random)."""
    batch, text_len = feeds["input_ids"].shape
    l1 = text_len - 1 + cfg.keep1
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, geo.n_visual, dims.vision_hidden, generator=g)
    probs = torch.softmax(torch.randn(batch, geo.num_heads, l1, l1, generator=g), dim=-1)
    return {"features": features.numpy(), "probs": probs.numpy(), "input_ids": feeds["input_ids"]}


def export_scoring(cfg: StarConfig, geo: Geometry, example: dict[str, np.ndarray], path: Path) -> Path:
    """``StarScoring`` -> ONNX (dynamic batch, everything else static), like the prefill export."""
    module = StarScoring(cfg, geo.image_token_id).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    args = tuple(
        torch.from_numpy(np.repeat(example[k][:1], 2, axis=0)) for k in ("features", "probs", "input_ids")
    )
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=["features", "probs", "input_ids"],
            output_names=["stage1_keep_idx", "stage2_keep_idx"],
            dynamic_shapes={"features": {0: batch}, "probs": {0: batch}, "input_ids": {0: batch}},
            opset_version=18,
            optimize=True,
        )
        program.save(str(path), external_data=False)
    return path


# ---------------------------------------------------------------------------------- exports


def _source_digest() -> str:
    """Hash of the sources that shape the exported graphs (a changed rewrite re-exports)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in ("rewrite.py", "star.py", "export.py", "contract.py"):
        h.update((here / name).read_bytes())
    import onnxscript

    h.update(f"{torch.__version__} {onnxscript.__version__}".encode())
    return h.hexdigest()[:16]


@dataclass
class ExportJob:
    """One graph to export: ``prefill`` / ``decode`` (the product's graphs, through
    ``export.export_onnx`` and the contract) or ``scoring`` (``StarScoring``)."""

    graph: str  # prefill | decode | scoring
    tag: str  # unpruned | keep64 ...
    model_dir: str
    cfg: dict[str, int]
    batch: tuple[int, int, int]
    text_len: tuple[int, int, int]
    max_new_tokens: int
    prompt: tuple[int, int]  # the bench prompt: text tokens, placeholder index
    path: str

    def key(self) -> str:
        """Everything the graph depends on: job, sources and library versions, the weights' files."""
        weights = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in Path(self.model_dir).glob("*.safetensors")
        )
        return json.dumps(
            {**asdict(self), "path": None, "source": _source_digest(), "weights": weights}, sort_keys=True
        )


_WORKER_MODELS: dict[str, Any] = {}


def _export_job(job: ExportJob, loaded: Any = None) -> float:
    """Export one graph (in a worker process, or inline with the caller's model); returns seconds."""
    import logging

    from star_export.contract import decode_contract, prefill_contract
    from star_export.export import example_decode_inputs, export_onnx
    from star_export.load import load
    from star_export.rewrite import decode_module, prefill_module

    for name in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    start = time.perf_counter()
    if loaded is None:
        if job.model_dir not in _WORKER_MODELS:
            _WORKER_MODELS[job.model_dir] = load(job.model_dir)
        loaded = _WORKER_MODELS[job.model_dir]
    geo, cfg = loaded.geometry, StarConfig(**job.cfg)
    path = Path(job.path)
    key_file = path.with_name(path.name + ".key")
    key_file.unlink(missing_ok=True)  # a failed export never leaves a graph that looks up to date
    path.parent.mkdir(parents=True, exist_ok=True)
    if job.graph == "prefill":
        contract = prefill_contract(geo, cfg, job.batch, job.text_len)
        module = prefill_module(loaded.model, geo, cfg).eval()
        export_onnx(module, contract, path, geo.image_token_id, external_data=True)
    elif job.graph == "decode":
        contract = decode_contract(geo, cfg, job.batch, job.text_len, job.max_new_tokens)
        module = decode_module(loaded.model, geo, cfg).eval()
        export_onnx(module, contract, path, example_args=example_decode_inputs(contract), external_data=True)
    else:
        dims = cost_mod.ModelDims.from_config(loaded.model.config)
        feeds = bench_inputs(geo, 1, *job.prompt)
        export_scoring(cfg, geo, scoring_inputs(geo, dims, cfg, feeds), path)
    key_file.write_text(job.key())
    return time.perf_counter() - start


def _export_worker_init() -> None:
    torch.set_num_threads(1)


def export_graphs(
    jobs: Sequence[ExportJob], workers: int, log: Log, loaded: Any = None
) -> list[dict[str, Any]]:
    """Run the export jobs whose graph is not already on disk with the same key.

    ``workers > 1`` runs them in spawned processes, longest first (the exporter is
    single-threaded Python: two workers on two cores halve the time); inline otherwise, with
    ``loaded`` (the caller's model) when given.
    """
    records: list[dict[str, Any]] = []
    todo = []
    for job in jobs:
        key_file = Path(job.path + ".key")
        if Path(job.path).is_file() and key_file.is_file() and key_file.read_text() == job.key():
            records.append(
                {"graph": job.graph, "tag": job.tag, "path": job.path, "seconds": 0.0, "cached": True}
            )
            log(f"      {job.tag}/{Path(job.path).name}: up to date, reused")
        else:
            todo.append(job)
    order = {"prefill": 0, "decode": 1, "scoring": 2}
    todo.sort(key=lambda j: order.get(j.graph, 3))
    start = time.perf_counter()

    def done(job: ExportJob, secs: float) -> None:
        records.append(
            {"graph": job.graph, "tag": job.tag, "path": job.path, "seconds": secs, "cached": False}
        )
        log(
            f"      {job.tag}/{Path(job.path).name} ({secs:.1f}s; {time.perf_counter() - start:.0f}s elapsed)"
        )

    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            done(job, _export_job(job, loaded))
        return records
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(
        min(workers, len(todo)), mp_context=ctx, initializer=_export_worker_init
    ) as pool:
        futures = {pool.submit(_export_job, job): job for job in todo}
        for fut in cf.as_completed(futures):
            done(futures[fut], fut.result())
    return records


# ---------------------------------------------------------------------------------- onnxruntime


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

    def prefill(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._pout, self._prefill.run(self._pout, feeds), strict=True))

    def decode(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._decode is not None
        return dict(zip(self._dout, self._decode.run(self._dout, feeds), strict=True))

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


# ---------------------------------------------------------------------------------- runners


def decode_numpy(
    backend: Any,
    first: dict[str, np.ndarray],
    feeds: dict[str, np.ndarray],
    geo: Geometry,
    cfg: StarConfig,
    steps: int,
) -> int:
    """``steps`` greedy decode steps from a prefill's outputs (the loop of ``runtime.generate``).
    Returns the tokens produced (batch x steps)."""
    mask = feeds["attention_mask"]
    batch, text_len = mask.shape
    real = mask.sum(axis=1).astype(np.int64)
    pad = text_len - real
    m1 = (np.arange(text_len - 1 + cfg.keep1)[None] >= pad[:, None]).astype(np.int64)
    m2 = (np.arange(text_len - 1 + cfg.keep2)[None] >= pad[:, None]).astype(np.int64)
    position = real - 1 + geo.n_visual
    names = [f"{i}.{k}" for i in range(geo.num_layers) for k in ("key", "value")]
    pasts = {f"past.{n}": first[f"present.{n}"] for n in names}
    logits = first["logits"]
    one = np.ones((batch, 1), dtype=np.int64)
    for step in range(steps):
        token = np.argmax(logits, axis=-1).astype(np.int64)
        m1 = np.concatenate([m1, one], axis=1)
        m2 = np.concatenate([m2, one], axis=1)
        out = backend.decode(
            {
                "input_ids": token[:, None],
                "position_ids": (position + step)[:, None],
                "attention_mask_l1": m1,
                "attention_mask_l2": m2,
                **pasts,
            }
        )
        logits = out["logits"]
        pasts = {f"past.{n}": out[f"present.{n}"] for n in names}
    return batch * steps


class Runner:
    """One timed variant: ``load`` (sessions, modules; may be shared), ``start`` (the first,
    untimed prefill, whose cache starts every decode), then ``prefill`` / ``decode`` as asked."""

    has_decode = True
    calls_per_sample = 1

    def load(self) -> None: ...

    def start(self) -> None: ...

    def prefill(self) -> None:
        raise NotImplementedError

    def before_decode(self) -> None: ...

    def decode(self, steps: int) -> int:
        raise NotImplementedError

    def kv_bytes(self) -> int | None:
        return None

    def close(self) -> None: ...


class Shared:
    """One backend per graph, shared by the variants of every batch (as a server would)."""

    def __init__(self) -> None:
        self._items: dict[Any, Any] = {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._items:
            self._items[key] = make()
        return self._items[key]

    def clear(self) -> None:
        self._items.clear()


class NumpyBackendRunner(Runner):
    """A backend with ``prefill(feeds)`` / ``decode(feeds)`` dicts (onnxruntime, the rewrite)."""

    def __init__(self, get_backend: Callable[[], Any], feeds, geo: Geometry, cfg: StarConfig):
        self._get = get_backend
        self.backend: Any = None
        self.feeds, self.geo, self.cfg = feeds, geo, cfg
        self.first: dict[str, np.ndarray] = {}

    def load(self) -> None:
        self.backend = self._get()

    def start(self) -> None:
        self.first = self.backend.prefill(self.feeds)

    def prefill(self) -> None:
        self.backend.prefill(self.feeds)

    def decode(self, steps: int) -> int:
        return decode_numpy(self.backend, self.first, self.feeds, self.geo, self.cfg, steps)

    def kv_bytes(self) -> int:
        return sum(v.nbytes for k, v in self.first.items() if k.startswith("present."))

    def close(self) -> None:
        self.backend = None
        self.first = {}


class HFEagerRunner(Runner):
    """The unmodified LlavaForConditionalGeneration (eager attention) on the expanded prompt."""

    def __init__(self, model: Any, geo: Geometry, feeds: dict[str, np.ndarray]):
        self.model = model
        ids = feeds["input_ids"]
        p = int(np.argmax(ids[0] == geo.image_token_id))
        if not (ids[:, p] == geo.image_token_id).all():
            raise UsageError("hf-eager needs the image placeholder at the same index in every row")
        fill = np.full((ids.shape[0], geo.n_visual), geo.image_token_id)
        expanded = np.concatenate([ids[:, :p], fill, ids[:, p + 1 :]], 1)
        self.length = expanded.shape[1]
        b = ids.shape[0]
        self.args = {
            "pixel_values": torch.from_numpy(feeds["pixel_values"]),
            "input_ids": torch.from_numpy(expanded),
            "attention_mask": torch.ones(b, self.length, dtype=torch.int64),
            "position_ids": torch.arange(self.length).unsqueeze(0).expand(b, -1),
        }
        self.batch = b
        self.first_cache: Any = None
        self.first_logits: torch.Tensor | None = None
        self.cache: Any = None

    def _prefill(self):
        with torch.no_grad():
            return self.model(**self.args, use_cache=True, logits_to_keep=1)

    def start(self) -> None:
        out = self._prefill()
        self.first_cache, self.first_logits = out.cache, out.logits[:, -1]

    def prefill(self) -> None:
        self._prefill()

    def before_decode(self) -> None:
        self.cache = copy.deepcopy(self.first_cache)

    def decode(self, steps: int) -> int:
        logits = self.first_logits
        with torch.no_grad():
            for step in range(steps):
                token = logits.argmax(-1)
                out = self.model(
                    input_ids=token[:, None],
                    attention_mask=torch.ones(self.batch, self.length + step + 1, dtype=torch.int64),
                    position_ids=torch.full((self.batch, 1), self.length + step, dtype=torch.int64),
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                logits = out.logits[:, -1]
        self.cache = None
        return self.batch * steps

    def kv_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.first_cache.layers)

    def close(self) -> None:
        self.first_cache = self.cache = None


class CallRunner(Runner):
    """A prefill-only call (the scoring subgraph, an ablation session): ``make`` returns it.

    ``calls`` back-to-back calls make one sample (its time is divided by ``calls``): a call of a
    few ms on its own pays thread wake-up and cold caches that the same ops inside a prefill do not.
    """

    has_decode = False

    def __init__(self, make: Callable[[], Callable[[], Any]], calls: int = 1):
        self._make = make
        self._run: Callable[[], Any] | None = None
        self.calls_per_sample = calls

    def load(self) -> None:
        self._run = self._make()

    def start(self) -> None:
        self.prefill()

    def prefill(self) -> None:
        assert self._run is not None
        for _ in range(self.calls_per_sample):
            self._run()

    def close(self) -> None:
        self._run = None


# ---------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    runtime: str  # hf-eager | torch-rewrite | onnxruntime | tensorrt | onnxruntime-scoring | torch-scoring
    batch: int
    keep1: int
    keep2: int
    layer: int
    pruned: bool
    rounds: int
    runner: Runner | None = None
    skipped: str | None = None
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    decode_tokens: int = 0
    load_s: float = 0.0
    first_call_s: float = 0.0
    peak_rss: int = 0
    peak_delta: int = 0
    kv_bytes: int | None = None
    kv_bytes_model: int | None = None
    flops: int | None = None

    @property
    def kind(self) -> str:
        return "scoring" if self.runtime.endswith("-scoring") else "prefill"

    def first_call(self, steps: int) -> None:
        """The untimed first prefill + decode: the warm-up, and the memory it takes."""
        runner = self.runner
        assert runner is not None
        with RssSampler() as s:
            t0 = time.perf_counter()
            runner.start()
            if runner.has_decode and steps > 0:
                runner.before_decode()
                runner.decode(steps)
            self.first_call_s = time.perf_counter() - t0
        self.peak_rss, self.peak_delta = s.peak, s.delta
        self.kv_bytes = runner.kv_bytes()

    def run_once(self, steps: int, timed: bool) -> None:
        runner = self.runner
        assert runner is not None
        sampler = contextlib.nullcontext() if timed else RssSampler()
        with sampler as s:
            t0 = time.perf_counter()
            runner.prefill()
            t1 = time.perf_counter()
            if runner.has_decode and steps > 0:
                runner.before_decode()
                t2 = time.perf_counter()
                tokens = runner.decode(steps)
                t3 = time.perf_counter()
        if timed:
            self.prefill_s.append((t1 - t0) / runner.calls_per_sample)
            if runner.has_decode and steps > 0:
                self.decode_s.append(t3 - t2)
                self.decode_tokens = tokens
        else:
            self.peak_rss = max(self.peak_rss, s.peak)
            self.peak_delta = max(self.peak_delta, s.delta)

    def summary(self) -> dict[str, Any]:
        pre = Stats.of(self.prefill_s)
        tps = Stats.of([self.decode_tokens / d for d in self.decode_s if d > 0])
        return {
            "name": self.name,
            "runtime": self.runtime,
            "kind": self.kind,
            "batch": self.batch,
            "keep1": self.keep1,
            "keep2": self.keep2,
            "layer": self.layer,
            "pruned": self.pruned,
            "skipped": self.skipped,
            "rounds": self.rounds,
            "load_s": self.load_s,
            "first_call_s": self.first_call_s,
            "prefill_s": pre.to_dict() if pre else None,
            "prefill_samples_s": list(self.prefill_s),
            "decode_steps_per_round": self.decode_tokens // self.batch if self.decode_tokens else 0,
            "decode_tokens_per_s": tps.to_dict() if tps else None,
            "decode_samples_s": list(self.decode_s),
            "peak_rss_bytes": self.peak_rss,
            "peak_rss_delta_bytes": self.peak_delta,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_model": self.kv_bytes_model,
            "flops_model": self.flops,
        }


def interleave(
    variants: Sequence[Variant], steps: int, rounds: int, timed: bool, log: Log, label: str
) -> None:
    """Round-robin: every round runs each active variant once, in an order rotated by one per round."""
    start = time.perf_counter()
    for r in range(rounds):
        active = [v for v in variants if v.runner is not None and (not timed or r < v.rounds)]
        if not active:
            break
        k = r % len(active)
        gc.collect()
        gc.disable()
        try:
            for v in active[k:] + active[:k]:
                v.run_once(steps, timed)
                time.sleep(0.01)  # let the previous runtime's spinning threads park
        finally:
            gc.enable()
        log(
            f"      {label} round {r + 1}/{rounds}: {len(active)} variants ({time.perf_counter() - start:.0f}s)"
        )


# ---------------------------------------------------------------------------------- report


@dataclass
class BenchReport:
    data: dict[str, Any]
    table: str
    json_path: Path
    plot_path: Path | None

    def to_dict(self) -> dict[str, Any]:
        return self.data


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


# ---------------------------------------------------------------------------------- the run


@dataclass
class _Settings:
    """run_bench's arguments once defaulted and checked (before any model is loaded)."""

    out: Path
    batches: list[int]
    keeps: list[int]
    runtimes: list[str]
    layer: int | None  # None: the recipe's K
    text_len: int
    image_position: int
    threads: int
    repeats: int
    warmup: int
    decode_steps: int
    seed: int
    log: Log


@dataclass
class _Setup(_Settings):
    """Everything the steps of one run share: the settings and what loading the model gave."""

    layer: int  # resolved
    source: str
    model_dir: Path
    loaded: Any  # load.Loaded
    geo: Geometry
    dims: cost_mod.ModelDims
    cfgs: dict[str, StarConfig]  # "unpruned" first, then "keep64", ...
    feeds: dict[int, dict[str, np.ndarray]]
    batch_range: tuple[int, int, int]
    text_range: tuple[int, int, int]
    max_new_tokens: int
    graphs: dict[str, dict[str, Path]] = field(default_factory=dict)

    @property
    def ort_options(self) -> OrtOptions:
        return OrtOptions("all", self.threads, spinning=False)


def _recipe_bench_table(recipe: Any) -> dict[str, Any]:
    if recipe is None:
        return {}
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
        return tomllib.loads(Path(recipe.path).read_text()).get("bench", {})
    return {}


def run_bench(
    recipe: str | None = DEFAULT_RECIPE,
    keeps: Sequence[int] = DEFAULT_KEEPS,
    batches: Sequence[int] = DEFAULT_BATCHES,
    runtimes: Sequence[str] = RUNTIMES,
    *,
    model_dir: str | Path | None = None,
    out: str | Path = "bench_out",
    repeats: int = 10,
    warmup: int = 0,
    decode_steps: int = 8,
    layer: int | None = None,
    text_len: int | None = None,
    image_position: int | None = None,
    threads: int | None = None,
    ablation: bool = True,
    profile: bool = True,
    export_workers: int | None = None,
    seed: int = 0,
    log: Log = print,
) -> BenchReport:
    """Export, set up and time every variant interleaved; write bench.json + bench.png.

    ``recipe``: an embedded recipe (name or .toml); or ``model_dir``: a LLaVA checkpoint
    directory (``recipe`` then only supplies the profile ranges and the bench prompt, if given).
    ``runtimes``: any of onnxruntime, torch (HF eager + the PyTorch rewrite), tensorrt. Every
    argument is checked (UsageError) before any model is loaded.
    """
    from star_export.outputs import check_out_dir
    from star_export.recipes import load_recipe

    t_start = time.perf_counter()
    loadavg_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    runtimes, batches, keeps = list(runtimes), sorted(set(batches)), sorted(set(keeps))
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise UsageError(f"--runtime: unknown {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    if not runtimes:
        raise UsageError("--runtime: give at least one runtime")
    if not batches or min(batches) < 1:
        raise UsageError("--batch: batch sizes must be >= 1")
    if not keeps or min(keeps) < 1:
        raise UsageError("--keep: keep counts must be >= 1")
    if repeats < 1 or warmup < 0 or decode_steps < 0:
        raise UsageError("--repeats must be >= 1, --warmup and --decode-steps >= 0")
    out = Path(out)
    check_out_dir(out)
    rec = load_recipe(recipe) if recipe else None
    if model_dir is None and rec is None:
        raise UsageError("give a recipe or --model DIR")
    if model_dir is None and not rec.embedded:
        raise UsageError(f"recipe {rec.name!r} needs a checkpoint: pass --model DIR")
    table = _recipe_bench_table(rec)
    text_len = int(text_len or table.get("text_len", DEFAULT_TEXT_LEN))
    if image_position is None:
        image_position = int(table.get("image_position", DEFAULT_IMAGE_POSITION))
    if not 1 <= image_position <= text_len - 2:
        raise UsageError(
            f"--text-len {text_len}: the image placeholder at {image_position} needs a token after it"
        )
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        settings = _Settings(
            out=out,
            batches=batches,
            keeps=keeps,
            runtimes=runtimes,
            layer=layer,
            text_len=text_len,
            image_position=image_position,
            threads=threads,
            repeats=repeats,
            warmup=warmup,
            decode_steps=decode_steps,
            seed=seed,
            log=log,
        )
        st = _prepare(rec, model_dir, settings)
        export_records = _export_all(st, export_workers) if "onnxruntime" in runtimes else []
        variants, skipped = _build_variants(st)
        _time_variants(st, variants)
        ablation_rows, profiles = _ort_means(st, ablation, profile)
        return _report(st, variants, skipped, export_records, ablation_rows, profiles, loadavg_start, t_start)
    finally:
        torch.set_num_threads(old_threads)


def _prepare(rec, model_dir, settings: _Settings) -> _Setup:
    from star_export import load as load_mod

    log, keeps, batches = settings.log, settings.keeps, settings.batches
    text_len, decode_steps = settings.text_len, settings.decode_steps

    log(f"[bench 1/6] loading {'recipe ' + rec.name if model_dir is None else model_dir}")
    if model_dir is None:
        model_dir, source = load_mod.materialise(rec), f"recipe:{rec.name}"
    else:
        source = str(model_dir)
    loaded = load_mod.load(model_dir, source=source)
    geo = loaded.geometry
    n = geo.n_visual
    layer = int(settings.layer if settings.layer is not None else (rec.star.get("layer", 2) if rec else 2))
    cfgs = {
        "unpruned": StarConfig.resolve(keep=n, keep1=n, layer=layer, n_visual=n, num_layers=geo.num_layers)
    }
    for k in keeps:
        if k >= n:
            raise UsageError(f"--keep {k}: must be < N = {n} (the unpruned graph is always measured)")
        cfgs[f"keep{k}"] = StarConfig.resolve(
            keep=k, keep1=None, layer=layer, n_visual=n, num_layers=geo.num_layers
        )
    ranges = dict(rec.profile) if rec and rec.profile else {"batch": [1, 2, 8], "text_len": [2, 64, 512]}
    b_lo, b_opt, b_hi = (int(x) for x in ranges["batch"])
    t_lo, t_opt, t_hi = (int(x) for x in ranges["text_len"])
    st = _Setup(
        **{f.name: getattr(settings, f.name) for f in fields(_Settings)} | {"layer": layer},
        source=source,
        model_dir=Path(loaded.model_dir),
        loaded=loaded,
        geo=geo,
        dims=cost_mod.ModelDims.from_config(loaded.model.config),
        cfgs=cfgs,
        feeds={b: bench_inputs(geo, b, text_len, settings.image_position, settings.seed) for b in batches},
        batch_range=(min(b_lo, batches[0]), max(1, b_opt), max(b_hi, batches[-1])),
        text_range=(max(2, min(t_lo, text_len)), t_opt, max(t_hi, text_len)),
        max_new_tokens=max(int(ranges.get("max_new_tokens", 64)), decode_steps + 2),
    )
    params = sum(p.numel() for p in loaded.model.parameters())
    log(
        f"      {source}: {params / 1e6:.1f} M parameters, N={n}, {geo.num_layers} decoder layers, heads "
        f"{geo.num_heads}/{geo.num_kv_heads} kv; T={text_len}, keeps {keeps}, K={layer}, batches {batches}, "
        f"{settings.threads} threads"
    )
    return st


def _export_all(st: _Setup, workers: int | None) -> list[dict[str, Any]]:
    """prefill.onnx + decode.onnx of every configuration, and the scoring subgraph of each keep."""
    jobs = []
    for tag, cfg in st.cfgs.items():
        d = st.out / "graphs" / tag
        st.graphs[tag] = {
            "prefill": d / "prefill.onnx",
            "decode": d / "decode.onnx",
            "scoring": d / "scoring.onnx",
        }
        for g in ("prefill", "decode", "scoring"):
            if g == "scoring" and tag == "unpruned":
                continue
            jobs.append(
                ExportJob(
                    graph=g,
                    tag=tag,
                    model_dir=str(st.model_dir),
                    cfg=cfg.to_dict(),
                    batch=st.batch_range,
                    text_len=st.text_range,
                    max_new_tokens=st.max_new_tokens,
                    prompt=(st.text_len, st.image_position),
                    path=str(st.graphs[tag][g]),
                )
            )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers if workers is not None else min(2, cpus)
    st.log(f"[bench 2/6] exporting {len(jobs)} graphs (torch.onnx dynamo, {workers} worker process(es))")
    t0 = time.perf_counter()
    records = export_graphs(jobs, workers, st.log, loaded=st.loaded)
    st.log(f"      exports done ({time.perf_counter() - t0:.0f}s)")
    return records


def _build_variants(st: _Setup) -> tuple[list[Variant], list[dict[str, str]]]:
    """Every (runtime, configuration, batch); one backend per graph shared across batches."""
    from star_export.build import trt_status
    from star_export.contract import decode_contract, prefill_contract
    from star_export.runtime import TorchBackend

    shared = Shared()
    variants: list[Variant] = []
    skipped: list[dict[str, str]] = []
    use_ort, use_torch = "onnxruntime" in st.runtimes, "torch" in st.runtimes
    trt_ok, trt_why = trt_status() if "tensorrt" in st.runtimes else (False, "")
    if "tensorrt" in st.runtimes:
        trt_why = (
            trt_why if not trt_ok else "TensorRT is present, but this bench version does not time it yet"
        )
        skipped.append({"runtime": "tensorrt", "reason": trt_why})
    geo, dims, model, opts = st.geo, st.dims, st.loaded.model, st.ort_options

    def torch_backend(tag: str):
        cfg = st.cfgs[tag]
        pc = prefill_contract(geo, cfg, st.batch_range, st.text_range)
        dc = decode_contract(geo, cfg, st.batch_range, st.text_range, st.max_new_tokens)
        return shared.get(("torch", tag), lambda: TorchBackend(model, geo, cfg, pc, dc))

    def ort_backend(tag: str):
        p = st.graphs[tag]
        return shared.get(("ort", tag), lambda: OrtBackend(p["prefill"], p["decode"], opts))

    def ort_scoring(tag: str, sin: dict[str, np.ndarray]):
        sess = shared.get(("ort-scoring", tag), lambda: ort_session(st.graphs[tag]["scoring"], opts))
        return lambda: sess.run(None, sin)

    def torch_scoring(tag: str, sin: dict[str, np.ndarray]):
        module = StarScoring(st.cfgs[tag], geo.image_token_id).eval()
        args = [torch.from_numpy(sin[k]) for k in ("features", "probs", "input_ids")]

        def run():
            with torch.no_grad():
                return module(*args)

        return run

    for b in st.batches:
        f = st.feeds[b]

        def add(
            name: str, runtime: str, tag: str, runner: Runner | None, skip: str | None = None, b: int = b
        ):
            cfg = st.cfgs[tag]
            hf = runtime == "hf-eager"
            c = cost_mod.prefill_cost(dims, cfg, st.text_len, b, scoring=not hf, all_vision_layers=hf)
            variants.append(
                Variant(
                    name,
                    runtime,
                    b,
                    cfg.keep1,
                    cfg.keep2,
                    cfg.layer,
                    tag != "unpruned",
                    repeats_for(b, st.repeats),
                    runner,
                    skip,
                    kv_bytes_model=c.kv_bytes,
                    flops=c.flops,
                )
            )

        if use_torch:
            add(f"hf-eager/b{b}/unpruned", "hf-eager", "unpruned", HFEagerRunner(model, geo, f))
        for tag, cfg in st.cfgs.items():
            if use_torch:
                runner = NumpyBackendRunner(lambda tag=tag: torch_backend(tag), f, geo, cfg)
                add(f"torch-rewrite/b{b}/{tag}", "torch-rewrite", tag, runner)
            if use_ort:
                runner = NumpyBackendRunner(lambda tag=tag: ort_backend(tag), f, geo, cfg)
                add(f"onnxruntime/b{b}/{tag}", "onnxruntime", tag, runner)
            if "tensorrt" in st.runtimes:
                add(f"tensorrt/b{b}/{tag}", "tensorrt", tag, None, skip=trt_why)
            if tag == "unpruned":
                continue
            sin = scoring_inputs(geo, dims, cfg, f, st.seed)
            if use_ort:
                add(
                    f"onnxruntime-scoring/b{b}/{tag}",
                    "onnxruntime-scoring",
                    tag,
                    CallRunner(lambda tag=tag, sin=sin: ort_scoring(tag, sin), SCORING_CALLS),
                )
            if use_torch:
                add(
                    f"torch-scoring/b{b}/{tag}",
                    "torch-scoring",
                    tag,
                    CallRunner(lambda tag=tag, sin=sin: torch_scoring(tag, sin), SCORING_CALLS),
                )
    st.log("[bench 3/6] setting up variants: sessions, then each variant's first (untimed) prefill + decode")
    for s in skipped:
        st.log(f"      {s['runtime']}: skipped ({s['reason']})")
    t0 = time.perf_counter()
    for v in variants:
        if v.runner is not None:
            s0 = time.perf_counter()
            v.runner.load()
            v.load_s = time.perf_counter() - s0
    st.log(
        f"      sessions and modules loaded ({time.perf_counter() - t0:.0f}s, RSS {rss_bytes() / 2**30:.1f} GiB)"
    )
    for v in variants:
        if v.runner is not None:
            v.first_call(st.decode_steps)
            st.log(f"      {v.name}: first call {v.first_call_s:.1f}s, +{v.peak_delta / 2**20:.0f} MiB RSS")
    return variants, skipped  # the runners' closures keep ``shared`` (the sessions) alive


def _time_variants(st: _Setup, variants: list[Variant]) -> None:
    active = [v for v in variants if v.runner is not None]
    total_rounds = max((v.rounds for v in active), default=0)
    per_batch = ", ".join(f"batch {b}: {repeats_for(b, st.repeats)}" for b in st.batches)
    st.log(
        f"[bench 4/6] timing {len(active)} variants interleaved: {st.warmup} extra warm-up + up to "
        f"{total_rounds} timed rounds ({per_batch}), {st.decode_steps} decode steps per round"
    )
    interleave(active, st.decode_steps, st.warmup, timed=False, log=st.log, label="warm-up")
    interleave(active, st.decode_steps, total_rounds, timed=True, log=st.log, label="timed")
    for v in active:
        v.runner.close()
        v.runner = None  # drops the last references to the shared sessions
    gc.collect()


def _ort_means(
    st: _Setup, ablation: bool, profile: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """onnxruntime settings compared, and profiled, on the unpruned and the first pruned graph."""
    rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    if "onnxruntime" not in st.runtimes or not (ablation or profile):
        st.log("[bench 5/6] onnxruntime settings and profile: skipped")
        return rows, profiles
    b1 = st.batches[0]
    st.log(f"[bench 5/6] onnxruntime settings and profile (batch {b1})")
    for tag in ("unpruned", f"keep{st.keeps[0]}"):
        path = st.graphs[tag]["prefill"]
        if ablation:
            rows.append(
                ort_ablation(
                    path,
                    st.feeds[b1],
                    st.dims,
                    st.threads,
                    max(min(3, st.repeats), st.repeats // 2),
                    tag,
                    st.out,
                    st.log,
                )
            )
        if profile:
            prof = ort_profile(path, st.feeds[b1], st.ort_options, st.out / f"ort_profile_{tag}")
            prof.update({"label": f"{tag}, batch {b1}", "keep2": st.cfgs[tag].keep2, "batch": b1})
            profiles.append(prof)
            st.log(
                f"      profile {tag}: scoring {prof['scoring_share'] * 100:.2f}%, matrix products "
                f"{prof['matmul_class_share'] * 100:.0f}% of kernel time"
            )
    return rows, profiles


def _report(
    st, variants, skipped, export_records, ablation_rows, profiles, loadavg_start, t_start
) -> BenchReport:
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


# ---------------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m star_export bench`` (and ``bench/run.py``)."""
    parser.add_argument(
        "--recipe",
        default=None,
        metavar="NAME|FILE",
        help=f"embedded recipe to benchmark (default {DEFAULT_RECIPE})",
    )
    parser.add_argument(
        "--model", type=Path, default=None, metavar="DIR", help="a LLaVA checkpoint directory instead"
    )
    parser.add_argument(
        "--keep",
        type=_int_list,
        default=list(DEFAULT_KEEPS),
        metavar="K,K,...",
        help="keep2 values of the pruned graphs (default 64,128,192); the unpruned graph is always measured",
    )
    parser.add_argument(
        "--layer", type=int, default=None, metavar="K", help="STAR layer K (default: the recipe's, 2)"
    )
    parser.add_argument(
        "--batch",
        type=_int_list,
        default=list(DEFAULT_BATCHES),
        metavar="B,B,...",
        help="batch sizes (default 1,4)",
    )
    parser.add_argument(
        "--runtime",
        type=_str_list,
        default=list(RUNTIMES),
        metavar="R,R,...",
        help="onnxruntime, torch (HF eager + the PyTorch rewrite), tensorrt (default: all three; "
        "TensorRT is skipped with the reason where absent)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench_out"), metavar="DIR", help="output dir (default bench_out/)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        metavar="N",
        help="timed rounds at batch 1 (default 10; batch B runs max(3, ceil(N/B)))",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="N",
        help="extra untimed interleaved rounds (default 0: each variant's set-up already runs one "
        "untimed prefill + decode)",
    )
    parser.add_argument(
        "--decode-steps", type=int, default=8, metavar="N", help="decode steps timed per round (default 8)"
    )
    parser.add_argument(
        "--text-len", type=int, default=None, metavar="T", help="prompt tokens (default: the recipe's, 48)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="threads for torch and onnxruntime (default: all CPUs)",
    )
    parser.add_argument(
        "--export-workers", type=int, default=None, metavar="N", help="parallel export processes (default 2)"
    )
    parser.add_argument("--no-ablation", action="store_true", help="skip the onnxruntime settings comparison")
    parser.add_argument("--no-profile", action="store_true", help="skip the onnxruntime profile")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images and prompts")


def run_bench_cli(args: argparse.Namespace) -> int:
    """Entry point for ``python -m star_export bench``: returns the exit code (0 once the report is written)."""
    import logging

    import transformers

    for name in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    recipe = args.recipe if args.recipe else (DEFAULT_RECIPE if args.model is None else None)
    run_bench(
        recipe,
        args.keep,
        args.batch,
        args.runtime,
        model_dir=args.model,
        out=args.out,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_steps=args.decode_steps,
        layer=args.layer,
        text_len=args.text_len,
        threads=args.threads,
        ablation=not args.no_ablation,
        profile=not args.no_profile,
        export_workers=args.export_workers,
        seed=args.seed,
    )
    return 0
