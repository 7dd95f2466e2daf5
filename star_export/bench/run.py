"""One bench run, in order: check the settings, load, export, set up the variants, time them,
compare onnxruntime's settings, report (``run_bench``)."""

from __future__ import annotations

import contextlib
import gc
import os
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from star_export import cost as cost_mod
from star_export.bench.exports import ExportJob, StarScoring, export_graphs
from star_export.bench.ort import OrtBackend, OrtOptions, ort_ablation, ort_profile, ort_session
from star_export.bench.report import BenchReport, write_report
from star_export.bench.timing import SCORING_CALLS, Log, repeats_for, rss_bytes
from star_export.bench.variants import (
    CallRunner,
    HFEagerRunner,
    NumpyBackendRunner,
    Runner,
    Shared,
    Variant,
    bench_inputs,
    interleave,
    scoring_inputs,
)
from star_export.errors import UsageError
from star_export.geometry import Geometry
from star_export.star import StarConfig

DEFAULT_RECIPE = "llava-bench"
DEFAULT_KEEPS = (64, 128, 192)
DEFAULT_BATCHES = (1, 4)
RUNTIMES = ("onnxruntime", "torch", "tensorrt")
DEFAULT_TEXT_LEN = 48
DEFAULT_IMAGE_POSITION = 5


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
        return write_report(
            st, variants, skipped, export_records, ablation_rows, profiles, loadavg_start, t_start
        )
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
    from star_export.contract import decode_contract, prefill_contract
    from star_export.engines import trt_status
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
