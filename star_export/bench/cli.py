"""The command line of the bench: ``python -m star_export bench`` (flags, help text)."""

from __future__ import annotations

import argparse
from pathlib import Path

from star_export.bench.argtypes import int_list, str_list
from star_export.bench.run import DEFAULT_BATCHES, DEFAULT_KEEPS, DEFAULT_RECIPE, RUNTIMES, run_bench

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

  python -m star_export bench serve --export star_out --keep 64,576 --concurrency 1,2,4,8,16 --requests 32
      the export served by a real tritonserver under a concurrency sweep per keep level (and a mix):
      TTFT, TPOT, end-to-end p50/p90/p99, requests/s, tokens/s, rejections (bench serve --help)

graphs are exported into --out/graphs/ and reused by the next run while the model and the export
code are unchanged. Run on a quiet machine: the load average before and after is recorded.
"""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m star_export bench``."""
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
        type=int_list,
        default=list(DEFAULT_KEEPS),
        metavar="K,K,...",
        help="keep2 values of the pruned graphs (default 64,128,192); the unpruned graph is always measured",
    )
    parser.add_argument(
        "--layer", type=int, default=None, metavar="K", help="STAR layer K (default: the recipe's, 2)"
    )
    parser.add_argument(
        "--batch",
        type=int_list,
        default=list(DEFAULT_BATCHES),
        metavar="B,B,...",
        help="batch sizes (default 1,4)",
    )
    parser.add_argument(
        "--runtime",
        type=str_list,
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
    from star_export.bench.serve import DESCRIPTION as SERVE_DESCRIPTION
    from star_export.bench.serve import add_serve_arguments

    modes = parser.add_subparsers(dest="bench_mode", metavar="serve", parser_class=type(parser))
    serve = modes.add_parser(
        "serve",
        help="serve an export with tritonserver and sweep concurrency (TTFT, TPOT, p50/p90/p99, req/s)",
        description=SERVE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(serve)


def run_bench_cli(args: argparse.Namespace) -> int:
    """Entry point for ``python -m star_export bench``: returns the exit code (0 once the report is written)."""
    import logging

    if getattr(args, "bench_mode", None) == "serve":
        from star_export.bench.serve import run_serve_bench

        run_serve_bench(args)
        return 0

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
