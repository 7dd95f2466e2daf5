"""The command line of ``tools/gpu_bench.py``: flags, their size-dependent defaults, every check
made before a weight exists (``UsageError``, exit 2; ``MissingComponent``, exit 3), the run's settings."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from star_export.bench.run import DEFAULT_IMAGE_POSITION, DEFAULT_KEEPS, DEFAULT_TEXT_LEN
from star_export.bench.timing import SCORING_CALLS
from star_export.errors import MissingComponent, UsageError
from star_export.geometry import Geometry
from star_export.outputs import check_out_dir
from star_export.star import StarConfig

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
