#!/usr/bin/env python
"""STAR's prefill speedup at LLaVA-1.5-7B scale on one CUDA GPU, measured (issue #16).

    python tools/gpu_bench.py --device cuda --out gpu_bench_out        # on the GPU host
    python tools/gpu_bench.py --device cpu --tiny --out /tmp/gb        # the same script, tiny, on CPU

Needs only PyTorch and transformers (plus numpy; matplotlib for the plot): no TensorRT, no
onnxruntime, no checkpoint. The model is LLaVA-1.5-7B's real widths (CLIP ViT-L/14-336 vision
tower, hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32064; the config of
``tools/measure_export_memory.py``) with random fp16 weights created directly on the device
(``torch.device("cuda")`` + transformers' ``_from_config(dtype=fp16)``: no fp32 copy, nothing on disk).
``--tiny`` uses the ``llava-tiny`` recipe's widths at 112 px (N = 64 visual tokens) instead.

Measured in one run, every variant interleaved round-robin (the order rotated by one each round, so
drift hits all alike), after ``--warmup`` untimed rounds; median and p10/p90 of ``--repeats`` rounds:

* prefill latency through the PyTorch rewrite (the LLaVA family's ``LlavaPrefill``): unpruned
  (keep1 = keep2 = N = 576) and STAR keep 64/128/192 (keep1 = 2 * keep, K = ``--layer``), batch 1
  and 8, in eager PyTorch and in one faster mode: CUDA graphs (the prefill captured once per shape
  and replayed), else ``torch.compile`` when capturing fails, else eager only. The mode is decided
  by the first variant that sets it up; each failure is recorded with its reason (``modes``);
* decode tokens/s: ``StarDecode`` steps on the per-layer caches (L1 slots before K, L2 from K on)
  of the variant's first prefill. Eager: ``--decode-steps`` greedy steps, the caches growing. Graphs
  / compile: the first step captured (compiled) once and replayed ``--decode-steps`` times (the
  same past length each time: one step's cost, not a growing cache);
* KV-cache bytes, read from the caches and from the cost model (``cost.prefill_cost``);
* the STAR scoring's share: ``star.stage1_scores`` + ``topk_sorted`` + ``stage2_scores`` + the stage-2
  top-k alone (``bench.StarScoring``, exactly the prefill's calls; the stage-2 top-k is
  ``stage2_select`` for LLaVA, which has no structural tokens) on tensors of the prefill's shapes,
  5 back-to-back calls per sample, divided by the pruned prefill in the same mode and batch;
* achieved TFLOP/s (``cost.prefill_cost`` FLOPs of what runs, all 24 vision layers, over the
  median) against the device's fp16 matmul peak measured here (a ``--peak-size``-cubed
  ``torch.matmul``), and the cost model's speedup ceiling (``cost.ceiling``) at each keep;
* parity on the device: the rewrite in fp16 vs the same weights in fp32 (the first
  ``--parity-layers`` decoder layers of the benchmarked model, shared, and an fp32 copy; TF32
  off), by ``star_export.selection``/``validate``'s rules: selection overlap with the dtype's
  margins (``precision_noise``: its rounding emulated on the fp32 run), then logits and caches
  directly or, where selections differ, with the fp16 side's selection forced into the fp32 run
  (``validate.check_side``).

Writes ``--out``/gpu_bench.json (rewritten after every phase and every timing round, so a run cut
short keeps what it measured; ``status`` says how far it got) and ``gpu_bench.png``; prints
progress lines and, last, one table. Exit 0 when the run finished and parity passed, 1 when a
parity row failed, 2 for a bad flag (one line), 3 when the device is missing (one line).

Time on an H200 (estimate, not yet measured: no device was lent when this was written), defaults:
imports ~15 s; creating 7.06 B fp16 parameters on the device ~10-20 s (14 GB of init kernels at
>1 TB/s plus Python module construction); the matmul and copy peaks <2 s; parity ~10-20 s (a
4-layer fp32 copy, 4.8 GB, and ~5 runs of a 4-layer model per keep); set-up ~15 s (8 cases: one
eager prefill + decode each, and two warm-up calls + one capture per CUDA graph, the largest
prefill, batch 8 unpruned, ~66 TFLOP at ~0.5 PFLOP/s ~0.13 s); timing: a round is ~3 s (16 prefills,
~0.6 s together; 64 eager decode steps at ~25-30 ms, launch-bound, ~2 s; 64 replayed steps at
~5 ms, weight-bound: 13.5 GB / ~4 TB/s ~3.4 ms, ~0.3 s), 3 + 20 rounds ~70 s. Total ~2.5-3 min.
``--budget-s`` (default 420) bounds it: no new accelerated variant is set up after 60 % of the
budget, and no new timing round starts once the next would end past it (at least one runs).
torch.compile, the fallback, is the unbounded part: inductor on a 32-layer model takes minutes
per shape, so under it the set-up budget leaves some shapes eager only (each says why).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # star_export and tools/ from this tree

import numpy as np  # noqa: E402
import torch  # noqa: E402

from star_export import cost as cost_mod  # noqa: E402
from star_export.bench import (  # noqa: E402
    DEFAULT_IMAGE_POSITION,
    DEFAULT_KEEPS,
    DEFAULT_TEXT_LEN,
    SCORING_CALLS,
    StarScoring,
    Stats,
    bench_inputs,
    scoring_inputs,
)
from star_export.errors import MissingComponent, UsageError  # noqa: E402
from star_export.families.llava import FAMILY, llava_geometry  # noqa: E402
from star_export.geometry import Geometry  # noqa: E402
from star_export.outputs import check_out_dir, write_json  # noqa: E402
from star_export.parity import ParityReport  # noqa: E402
from star_export.star import StarConfig  # noqa: E402

PROG = "gpu_bench.py"
MODES = ("auto", "eager", "graphs", "compile")
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
DEFAULT_BATCHES = (1, 8)
# (full run, --tiny) defaults of the flags whose value depends on the model's size
SIZED_DEFAULTS = {
    "keep": (list(DEFAULT_KEEPS), [8, 16, 24]),
    "batch": (list(DEFAULT_BATCHES), [1, 2]),
    "repeats": (20, 3),
    "warmup": (3, 1),
    "decode_steps": (8, 2),
    "parity_layers": (4, 3),
    "peak_size": (8192, 256),
    "budget_s": (420.0, 120.0),
}
COPY_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}  # the copy-bandwidth probe's buffer
TINY_IMAGE = 112  # --tiny: a 8 x 8 patch grid, N = 64 (fp16 on a small CPU is slow)
SETUP_SHARE = 0.6  # no new accelerated variant is set up after this share of --budget-s
_KEEP: list[Any] = []  # captured CUDA graphs and their static outputs, alive for the whole run


# ------------------------------------------------------------------------------------------ flags


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(
        prog=PROG,
        description="Prefill latency, decode tokens/s, KV bytes, the STAR scoring's share, achieved "
        "TFLOP/s and fp16-vs-fp32 parity of the PyTorch STAR rewrite at LLaVA-1.5-7B widths (random "
        "weights made on the device), unpruned vs STAR keeps, eager and CUDA graphs (or torch.compile).",
        epilog="Writes OUT/gpu_bench.json (incrementally) and OUT/gpu_bench.png. Exit 0 ok, 1 a parity "
        "row failed, 2 bad flags, 3 no such device.",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    p.add_argument(
        "--tiny", action="store_true", help="llava-tiny's widths at 112 px (N = 64): the CPU test's model"
    )
    p.add_argument("--out", type=Path, default=Path("gpu_bench_out"), help="output directory")
    p.add_argument("--keep", type=int, nargs="+", help="stage-2 keeps (default 64 128 192; tiny 8 16 24)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 8; tiny 1 2)")
    p.add_argument("--layer", type=int, default=2, help="K: the first layer on the stage-2 sequence")
    p.add_argument("--layers", type=int, help="decoder layers of the benchmarked model (default: 32; tiny 4)")
    p.add_argument("--text-len", type=int, default=DEFAULT_TEXT_LEN, help="prompt tokens incl. <image>")
    p.add_argument("--image-position", type=int, default=DEFAULT_IMAGE_POSITION, help="<image> index")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="weights and activations")
    p.add_argument("--mode", choices=MODES, default="auto", help="besides eager: graphs, compile, or auto")
    p.add_argument("--repeats", type=int, help="timed rounds (default 20; tiny 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 3; tiny 1)")
    p.add_argument("--decode-steps", type=int, help="decode steps per sample (default 8; tiny 2)")
    p.add_argument(
        "--parity-layers", type=int, help="decoder layers in the parity check, 0: none (4; tiny 3)"
    )
    p.add_argument("--peak-size", type=int, help="n of the n x n x n peak matmul (default 8192; tiny 256)")
    p.add_argument("--budget-s", type=float, help="seconds the whole run should take (default 420; tiny 120)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: PyTorch's)")
    args = p.parse_args(argv)
    for name, (full, tiny) in SIZED_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def model_config(tiny: bool, layers: int | None) -> Any:
    """The LlavaConfig benchmarked: LLaVA-1.5-7B's widths, or llava-tiny's at ``TINY_IMAGE`` px."""
    if tiny:
        from transformers import LlavaConfig

        from star_export.recipes import load_recipe

        config = LlavaConfig(**load_recipe("llava-tiny").config)
        config.vision_config.image_size = TINY_IMAGE
        config.image_seq_length = (TINY_IMAGE // config.vision_config.patch_size) ** 2
        if layers is not None:
            config.text_config.num_hidden_layers = layers
        return config
    from measure_export_memory import llava_7b_config

    return llava_7b_config(32 if layers is None else layers)


def check_args(args: argparse.Namespace, geo: Geometry) -> dict[str, StarConfig]:
    """Every flag checked before any weight exists (UsageError, exit 2). -> the STAR configs timed,
    "unpruned" (keep1 = keep2 = N) first, then "keep64", ..."""
    positive = ("batch", "repeats", "decode_steps", "peak_size", "budget_s", "threads")
    for name in positive:
        values = getattr(args, name)
        if values is None:
            continue
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {values}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if not 1 <= args.image_position <= args.text_len - 2:
        raise UsageError(
            f"--image-position {args.image_position} must leave a token before and after it in "
            f"--text-len {args.text_len}"
        )
    if args.mode == "graphs" and args.device != "cuda":
        raise UsageError("--mode graphs needs --device cuda (CUDA graphs)")
    n, layers = geo.n_visual, geo.num_layers
    cfgs = {"unpruned": StarConfig.resolve(keep=n, keep1=n, layer=args.layer, n_visual=n, num_layers=layers)}
    for keep in args.keep:
        cfgs[f"keep{keep}"] = StarConfig.resolve(
            keep=keep, keep1=None, layer=args.layer, n_visual=n, num_layers=layers
        )
    if args.parity_layers and not args.layer + 1 <= args.parity_layers <= layers:
        raise UsageError(
            f"--parity-layers must be 0 or in {args.layer + 1}..{layers} (stage 2 needs layer K = "
            f"{args.layer}), got {args.parity_layers}"
        )
    check_out_dir(args.out)
    return cfgs


def resolve_device(name: str) -> torch.device:
    """The torch device, or MissingComponent (exit 3) naming what is missing."""
    if name == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only build)"
        raise MissingComponent(
            f"--device cuda: PyTorch sees no CUDA device (torch {torch.__version__}, CUDA build {build}); "
            "run on a CUDA host or pass --device cpu"
        )
    return torch.device(name)


# ------------------------------------------------------------------------------------------ the run


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


def build_model(config: Any, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """LlavaForConditionalGeneration with random weights created on ``device`` in ``dtype``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def truncated(model: Any, layers: int) -> Any:
    """The same model with its first ``layers`` decoder layers: every tensor shared, none copied."""
    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = layers
    with torch.device("meta"):
        small = LlavaForConditionalGeneration(config)
    state = model.state_dict()
    small.load_state_dict({k: state[k] for k in small.state_dict()}, assign=True, strict=True)
    buffers = dict(model.named_buffers())
    for name, buf in list(small.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary inv_freq, CLIP position ids) are not in the state
            parent, _, leaf = name.rpartition(".")
            small.get_submodule(parent)._buffers[leaf] = buffers[name]
    return small.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ parity


def run_parity(
    model: Any, geo: Geometry, cfgs: dict[str, StarConfig], layers: int, dtype: str, seed: int, log: Any
) -> ParityReport:
    """The rewrite in ``dtype`` on the device vs the same weights in fp32 there, every config: the
    selection-with-margin rule, then logits and caches (forced selections where they differ)."""
    from star_export import precision_noise, selection
    from star_export.validate import Rewrite, check_side, make_inputs

    device = next(model.parameters()).device
    small = truncated(model, layers)
    small32 = copy.deepcopy(small).float()
    pgeo = dataclasses.replace(geo, num_layers=layers)
    feeds = make_inputs(pgeo, batch=2, text_len=24, seed=seed)
    report = ParityReport()
    report.inputs = {"layers": layers, "batch": 2, "text_len": 24, "seed": seed, "score_noise": {}}
    tolerance = selection.logits_tolerance(dtype, 0.0)
    short = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
    for tag, cfg in cfgs.items():
        low = Rewrite(FAMILY.prefill_module(small, pgeo, cfg).eval(), dtype, device)
        full = Rewrite(FAMILY.prefill_module(small32, pgeo, cfg).eval(), "float32", device)
        noise = precision_noise.measure(low, full, feeds, (cfg.keep1, cfg.keep2))
        rlow = noise.pop("runs")["low"]
        report.inputs["score_noise"][tag] = noise
        check = f"torch {short} vs fp32, {device.type}, {tag}"
        check_side(report, check, rlow, full, feeds, tuple(noise["margins"]), tolerance)
        precision_noise.add_rows(report, noise, check)
        log(f"      parity {tag}: {'ok' if all(r.passed for r in report.rows) else 'FAIL'}")
    del small32
    gc.collect()
    return report


# ------------------------------------------------------------------------------------------ variants


@dataclass
class Case:
    """One (STAR config, batch): its inputs on the device, its modules, its first eager prefill."""

    tag: str
    cfg: StarConfig
    batch: int
    feeds: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    prefill: torch.nn.Module
    decode: torch.nn.Module
    first: tuple[torch.Tensor, ...] = ()  # the first eager prefill's outputs (logits, ..., presents)

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.first[5:])

    def prefill_call(self) -> Any:
        return self.prefill(*self.feeds)

    def step_inputs(self, geo: Geometry) -> tuple[torch.Tensor, ...]:
        """The first decode step's inputs after ``first``: greedy token, its position, masks, caches."""
        ids = self.feeds[1]
        b, t = ids.shape
        one = torch.ones(b, 1, dtype=torch.int64, device=ids.device)
        token = self.first[0].argmax(-1, keepdim=True)
        position = torch.full((b, 1), t - 1 + geo.n_positions, dtype=torch.int64, device=ids.device)
        m1 = torch.ones(b, t - 1 + geo.span(self.cfg.keep1), dtype=torch.int64, device=ids.device)
        m2 = torch.ones(b, t - 1 + geo.span(self.cfg.keep2), dtype=torch.int64, device=ids.device)
        return (token, position, torch.cat([m1, one], 1), torch.cat([m2, one], 1), *self.first[5:])

    def decode_loop(self, geo: Geometry, steps: int) -> int:
        """``steps`` greedy decode steps from ``first``, the caches and masks growing. -> tokens."""
        token, position, m1, m2, *pasts = self.step_inputs(geo)
        one = m1[:, -1:]
        for step in range(steps):
            out = self.decode(token, position + step, m1, m2, *pasts)
            token, pasts = out[0].argmax(-1, keepdim=True), out[1:]
            m1, m2 = torch.cat([m1, one], 1), torch.cat([m2, one], 1)
        return self.batch * steps


@dataclass
class Variant:
    """One timed thing: a prefill (with its decode) or the scoring alone, in one mode and batch."""

    kind: str  # prefill | scoring
    mode: str  # eager | graphs | compile
    tag: str  # unpruned | keep64 ...
    cfg: StarConfig
    batch: int
    call: Callable[[], Any] | None = None
    decode: Callable[[], int] | None = None
    decode_method: str = ""
    calls: int = 1
    skipped: str | None = None
    setup_s: float = 0.0
    peak_mem_bytes: int | None = None
    kv_bytes: int | None = None  # read from the first prefill's caches
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    decode_tokens: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.mode}/b{self.batch}/{self.tag}"

    def sample(self, clock: Clock, timed: bool) -> None:
        assert self.call is not None
        t = clock.time(self.call, self.calls)
        d = clock.time(self.decode) if self.decode is not None else None
        if timed:
            self.prefill_s.append(t)
            if d is not None:
                self.decode_s.append(d)

    def summary(self) -> dict[str, Any]:
        pre = Stats.of(self.prefill_s)
        tps = Stats.of([self.decode_tokens / d for d in self.decode_s if d > 0])
        return {
            "name": self.name,
            "kind": self.kind,
            "mode": self.mode,
            "tag": self.tag,
            "batch": self.batch,
            **self.cfg.to_dict(),
            "skipped": self.skipped,
            "setup_s": self.setup_s,
            "peak_mem_bytes": self.peak_mem_bytes,
            "kv_bytes": self.kv_bytes,
            "calls_per_sample": self.calls,
            "prefill_s": pre.to_dict() if pre else None,
            "prefill_samples_s": self.prefill_s,
            "decode_method": self.decode_method,
            "decode_tokens_per_sample": self.decode_tokens,
            "decode_tokens_per_s": tps.to_dict() if tps else None,
            "decode_samples_s": self.decode_s,
        }


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def capture_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured into a CUDA graph (two warm-up calls on a side stream first); -> replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    _KEEP.append((graph, outputs, fn))  # fn holds the static inputs: freed, their memory would be reused
    return graph.replay


def compile_call(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    """``module(*args)`` through torch.compile (static shapes), compiled by a first call."""
    import torch._dynamo

    config = torch._dynamo.config  # one compiled graph per shape: 8 recompilations would fall back to eager
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, the older one
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    compiled = torch.compile(module, dynamic=False)

    def call() -> Any:
        return compiled(*args)

    call()
    return call


class Accel:
    """The faster mode besides eager: candidates tried in order until one sets a variant up; a
    failure before that is recorded (``notes``) and the next candidate tried; after that, the mode
    is fixed and a failing variant is skipped with its reason."""

    def __init__(self, requested: str, device: torch.device):
        self.notes: dict[str, str] = {"eager": "ok"}
        if requested == "eager":
            self.order: list[str] = []
            self.notes.update(graphs="not asked (--mode eager)", compile="not asked (--mode eager)")
        elif requested in ("graphs", "compile"):
            self.order = [requested]
        elif device.type == "cuda":
            self.order = ["graphs", "compile"]
        else:
            self.order = []
            self.notes["graphs"] = "skipped: CUDA graphs need --device cuda"
            self.notes["compile"] = (
                "skipped: not tried on CPU under --mode auto (inductor compiles C++ for minutes); "
                "--mode compile asks for it"
            )
        self.fixed = False

    @property
    def mode(self) -> str | None:
        return self.order[0] if self.order else None

    def make(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        """A call of ``module(*args)`` in the current mode; raises once the mode is fixed."""
        while self.order:
            mode = self.order[0]
            try:
                call = (
                    capture_graph(lambda: module(*args)) if mode == "graphs" else compile_call(module, args)
                )
            except Exception as e:  # any failure: record it, fall back
                if self.fixed:
                    raise
                self.notes[mode] = f"failed: {first_line(e)}"
                self.order.pop(0)
                for later in self.order:
                    self.notes.setdefault(later, f"tried because {mode} failed")
                continue
            self.fixed = True
            self.notes[mode] = "ok"
            return call
        raise RuntimeError("no accelerated mode left")


def memory_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def set_up_case(case: Case, geo: Geometry, args: argparse.Namespace, accel: Accel, run: Run) -> list[Variant]:
    """The first eager prefill (its caches feed decode), then the eager and the accelerated variant."""
    device = case.feeds[0].device
    steps = args.decode_steps
    reset_peak(device)
    t0 = time.perf_counter()
    case.first = case.prefill_call()
    eager = Variant("prefill", "eager", case.tag, case.cfg, case.batch, call=case.prefill_call)
    eager.decode = lambda: case.decode_loop(geo, steps)
    eager.decode_method = f"{steps} greedy StarDecode steps, caches growing from L1/L2"
    eager.decode_tokens = case.batch * steps
    eager.decode()
    eager.setup_s, eager.peak_mem_bytes = time.perf_counter() - t0, memory_peak(device)
    eager.kv_bytes = case.kv_bytes
    if accel.mode is None:
        return [eager]
    fast = Variant("prefill", accel.mode, case.tag, case.cfg, case.batch, kv_bytes=case.kv_bytes)
    if run.elapsed() > SETUP_SHARE * run.budget_s:
        fast.skipped = f"not set up: {run.elapsed():.0f} s of --budget-s {run.budget_s:.0f} spent"
        return [eager, fast]
    reset_peak(device)
    t0 = time.perf_counter()
    try:
        fast.call = accel.make(case.prefill, case.feeds)
    except Exception as e:  # recorded; the run goes on
        if accel.mode is None:  # every candidate failed: eager only, ``modes`` says why
            return [eager]
        fast.skipped = f"set-up failed: {first_line(e)}"
        return [eager, fast]
    fast.mode = accel.mode or fast.mode
    fast.decode_tokens = case.batch * steps
    try:
        step = accel.make(case.decode, case.step_inputs(geo))

        def replay_steps() -> int:
            for _ in range(steps):
                step()
            return case.batch * steps

        fast.decode = replay_steps
        fast.decode_method = f"the first decode step ({fast.mode}) replayed {steps} times (same past length)"
    except Exception as e:  # recorded in the variant
        fast.decode_method = f"not timed: {first_line(e)}"
    fast.setup_s, fast.peak_mem_bytes = time.perf_counter() - t0, memory_peak(device)
    return [eager, fast]


def scoring_variants(
    case: Case, geo: Geometry, dims: cost_mod.ModelDims, dtype: torch.dtype, accel: Accel, seed: int
) -> list[Variant]:
    """The STAR scoring alone on tensors of the prefill's shapes (features in the model's dtype,
    stage-2 attention probabilities in float32, as inside the prefill), eager and accelerated."""
    device = case.feeds[0].device
    feeds = {"input_ids": case.feeds[1].cpu().numpy()}
    example = scoring_inputs(geo, dims, case.cfg, feeds, seed=seed)
    args = (
        torch.from_numpy(example["features"]).to(device, dtype),
        torch.from_numpy(example["probs"]).to(device),
        case.feeds[1],
    )
    module = StarScoring(case.cfg, geo.image_token_id).eval()
    out = [
        Variant(
            "scoring",
            "eager",
            case.tag,
            case.cfg,
            case.batch,
            call=lambda: module(*args),
            calls=SCORING_CALLS,
        )
    ]
    if accel.mode is not None and accel.fixed:
        fast = Variant("scoring", accel.mode, case.tag, case.cfg, case.batch, calls=SCORING_CALLS)
        try:
            fast.call = accel.make(module, args)
        except Exception as e:  # recorded in the variant
            fast.skipped = f"set-up failed: {first_line(e)}"
        out.append(fast)
    return out


def make_cases(
    model: Any, geo: Geometry, cfgs: dict[str, StarConfig], args: argparse.Namespace, device: torch.device
) -> list[Case]:
    """One case per (batch, config): the bench's seeded prompts (no padding), on the device."""
    dtype = next(model.parameters()).dtype
    cases = []
    for batch in args.batch:
        feeds = bench_inputs(geo, batch, args.text_len, args.image_position, seed=args.seed)
        tensors = (
            torch.from_numpy(feeds["pixel_values"]).to(device, dtype),
            torch.from_numpy(feeds["input_ids"]).to(device),
            torch.from_numpy(feeds["attention_mask"]).to(device),
        )
        for tag, cfg in cfgs.items():
            prefill = FAMILY.prefill_module(model, geo, cfg).eval()
            decode = FAMILY.decode_module(model, geo, cfg).eval()
            cases.append(Case(tag, cfg, batch, tensors, prefill, decode))
    return cases


def interleave(
    variants: list[Variant], clock: Clock, args: argparse.Namespace, run: Run, snapshot: Callable[[], None]
) -> None:
    """Warm-up rounds, then timed rounds, round-robin in an order rotated by one per round; stops
    starting rounds once the next would end past --budget-s (at least one timed round runs).
    ``snapshot`` updates the run's data after every round (then saved)."""
    active = [v for v in variants if v.call is not None and v.skipped is None]
    if not active:
        return
    total = args.warmup + args.repeats
    timing = run.data.setdefault("timing", {})
    last = 0.0
    for r in range(total):
        timed = r >= args.warmup
        if timed and r > args.warmup and run.elapsed() + last > run.budget_s:
            timing["stopped"] = f"--budget-s {run.budget_s:g} reached after {r - args.warmup} timed rounds"
            run.log(f"      {timing['stopped']}")
            run.save()
            break
        k = r % len(active)
        t0 = time.perf_counter()
        gc.collect()
        gc.disable()
        try:
            for v in active[k:] + active[:k]:
                v.sample(clock, timed)
        finally:
            gc.enable()
        last = time.perf_counter() - t0
        timing["rounds_done"] = max(0, r + 1 - args.warmup)
        snapshot()
        run.save(f"timing ({r + 1}/{total} rounds)")
        label = "timed" if timed else "warm-up"
        run.log(f"      round {r + 1}/{total} ({label}, {len(active)} variants, {last:.2f} s)")


# ------------------------------------------------------------------------------------------ report


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


# ------------------------------------------------------------------------------------------ main


def settings(args: argparse.Namespace, geo: Geometry) -> dict[str, Any]:
    return {
        "argv": args.argv,
        "device": args.device,
        "tiny": args.tiny,
        "dtype": DTYPES[args.dtype],
        "keeps": args.keep,
        "batches": args.batch,
        "layer": args.layer,
        "layers": geo.num_layers,
        "text_len": args.text_len,
        "image_position": args.image_position,
        "n_visual": geo.n_visual,
        "mode": args.mode,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "decode_steps": args.decode_steps,
        "parity_layers": args.parity_layers,
        "peak_size": args.peak_size,
        "budget_s": args.budget_s,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "scoring_calls_per_sample": SCORING_CALLS,
        "timer": "CUDA events after torch.cuda.synchronize" if args.device == "cuda" else "time.perf_counter",
    }


def measure_peaks(
    run: Run, clock: Clock, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> None:
    run.log(f"[1/6] {run.data['device'].get('name')}: matmul and copy peaks")
    peak = run.data["peak"] = {
        "matmul": peak_matmul(clock, device, dtype, args.peak_size, args.repeats),
        "copy": peak_copy(clock, device, args.repeats),
    }
    run.log(f"      matmul {peak['matmul']['tflops']:.3g} TFLOP/s, copy {peak['copy']['gbps']:.3g} GB/s")
    run.save("peaks")


def make_model(
    run: Run, config: Any, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> Any:
    run.log(
        f"[2/6] model: {'llava-tiny' if args.tiny else 'LLaVA-1.5-7B'} widths, {config.text_config.num_hidden_layers} layers, {args.dtype}"
    )
    t0 = time.perf_counter()
    model = build_model(config, device, dtype, args.seed)
    Clock(device).sync()
    info = run.data["model"] = {
        "widths": "llava-tiny recipe at 112 px"
        if args.tiny
        else "llava-hf/llava-1.5-7b-hf (tools/measure_export_memory.py)",
        "init": f"random, created on {device.type} in {dtype} (transformers _from_config)",
        "build_s": time.perf_counter() - t0,
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "dims": cost_mod.ModelDims.from_config(model.config).to_dict(),
        "memory_allocated_bytes": memory_peak(device),
    }
    run.log(f"      {info['parameters'] / 1e9:.3g} B parameters in {info['build_s']:.1f} s")
    run.save("model built")
    return model


def check_parity(
    run: Run, model: Any, geo: Geometry, cfgs: dict[str, StarConfig], args: argparse.Namespace
) -> bool:
    if not args.parity_layers:
        run.log("[3/6] parity: skipped (--parity-layers 0)")
        run.data["parity"] = None
        return True
    run.log(f"[3/6] parity: {args.dtype} vs fp32 on {args.device}, first {args.parity_layers} layers")
    report = run_parity(model, geo, cfgs, args.parity_layers, DTYPES[args.dtype], args.seed, run.log)
    run.data["parity"] = report.to_dict()
    run.data["parity_table"] = report.format()
    run.save("parity done" if report.passed else "parity FAILED")
    return report.passed


def set_up(
    run: Run,
    model: Any,
    geo: Geometry,
    cfgs: dict[str, StarConfig],
    args: argparse.Namespace,
    device: torch.device,
) -> list[Variant]:
    """Every case's variants (eager, the accelerated mode, the scoring alone), saved as they come."""
    run.log("[4/6] set-up: first calls, captures")
    dims = cost_mod.ModelDims.from_config(model.config)
    dtype = next(model.parameters()).dtype
    accel = Accel(args.mode, device)
    run.data["modes"] = accel.notes
    variants: list[Variant] = []
    for case in make_cases(model, geo, cfgs, args, device):
        new = set_up_case(case, geo, args, accel, run)
        if case.tag != "unpruned":
            new += scoring_variants(case, geo, dims, dtype, accel, args.seed)
        if case.tag == "unpruned" and case.batch == args.batch[0]:
            run.data["model"]["first_logits_finite"] = bool(torch.isfinite(case.first[0]).all())
        done = ", ".join(f"{v.kind}/{v.mode} {'skipped' if v.skipped else f'{v.setup_s:.1f}s'}" for v in new)
        run.log(f"      b{case.batch} {case.tag}: {done}")
        variants += new
        run.data["variants"] = [v.summary() for v in variants]
        run.save("set-up")
    run.data["memory_peak_bytes"] = memory_peak(device)
    return variants


def report(run: Run, passed: bool) -> None:
    run.log("[6/6] report")
    png = run.out / "gpu_bench.png"
    try:
        plot(run.data, png)
        run.data["plot"] = png.name
    except ImportError as e:
        run.data["plot"] = f"not drawn: {first_line(e)}"
    run.data["table"] = format_table(run.data)
    run.save("done" if passed else "done, parity FAILED")
    print(run.data["table"], flush=True)
    run.log(f"wrote {run.path}{' and ' + str(png) if png.is_file() else ''}")


def bench(args: argparse.Namespace) -> int:
    """The whole run (flags already parsed): checks, peaks, model, parity, set-up, timing, report."""
    config = model_config(args.tiny, args.layers)
    geo = llava_geometry(config)
    cfgs = check_args(args, geo)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 parity reference is fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    run = Run(args.out, args.budget_s)
    run.data.update(settings=settings(args, geo), device=device_info(device), timing={"rounds_done": 0})
    clock = Clock(device)
    try:
        measure_peaks(run, clock, device, dtype, args)
        model = make_model(run, config, device, dtype, args)
        run.data["model"]["geometry"] = geo.to_dict()
        dims = cost_mod.ModelDims.from_config(model.config)
        with torch.no_grad():
            passed = check_parity(run, model, geo, cfgs, args)
            variants = set_up(run, model, geo, cfgs, args, device)

            def snapshot() -> None:
                run.data["variants"] = [v.summary() for v in variants]
                annotate(run.data, dims, cfgs, args)

            run.log(
                f"[5/6] timing: {args.warmup} warm-up + {args.repeats} rounds, {len(variants)} variants interleaved"
            )
            interleave(variants, clock, args, run, snapshot)
        snapshot()
        report(run, passed)
    except Exception as e:
        run.save(f"failed: {first_line(e)}")  # what was measured so far stays in the JSON
        raise
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return bench(args)
    except (UsageError, MissingComponent) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
