"""The ``triton`` command: its flags (:func:`add_triton_arguments`) and :func:`run_triton`."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from star_export.deploy.cpp_header import write_cpp_header
from star_export.deploy.settings import BACKENDS, WEIGHT_MODES
from star_export.errors import UsageError

EPILOG = """\
examples:
  python -m star_export llava --keep 64 --out star_out
  python -m star_export triton --from star_out --repo model_repository
      Python-backend repository (onnxruntime inside Triton; runs on the nvidia-pytriton CPU server)
  python -m star_export llava --keep 32,64,128 --out star_levels
  python -m star_export triton --from star_levels --repo model_repository
      models prefill_k32, prefill_k64, prefill_k128, decode, pipeline (input 'keep' picks the level)
  python -m star_export triton --from star_out --repo model_repository --backend tensorrt
      after `python -m star_export build --from star_out` on a GPU host (engines in the manifest)
  python -m star_export triton --from star_out --cpp-header examples/cpp/star_model.h
"""


def add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m star_export triton``."""
    parser.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="an output directory of `llava` (manifest.json, a prefill graph per keep level, decode.onnx, "
        "weights.onnx.data, processor/)",
    )
    parser.add_argument(
        "--repo", type=Path, default=None, metavar="DIR", help="model repository to write (replaced whole)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="python",
        help="prefill (one per keep level) and decode models: python (onnxruntime in the Python backend, default), "
        "onnxruntime (onnxruntime_onnx), tensorrt (tensorrt_plan; needs engines from `build`)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="pipeline's default limit (default 32)"
    )
    parser.add_argument("--instances", type=int, default=1, metavar="N", help="instances of prefill/decode")
    parser.add_argument(
        "--pipeline-instances",
        type=int,
        default=2,
        metavar="N",
        help="concurrent pipeline requests (default 2)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default=None,
        help="instance kind (default gpu for tensorrt, else cpu)",
    )
    parser.add_argument(
        "--prefix", default="", help="model name prefix, e.g. llava_ -> llava_prefill, ... (default none)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="onnxruntime intra-op threads per prefill/decode session (default: cores // sessions running "
        "at once, written in the config)",
    )
    parser.add_argument(
        "--cores", type=int, default=0, metavar="N", help="cores of the serving machine (default: this one's)"
    )
    parser.add_argument(
        "--batch-delay-us",
        type=int,
        default=2000,
        metavar="US",
        help="pipeline's dynamic batching: the longest a request waits for others to join its batch "
        "(default 2000)",
    )
    parser.add_argument(
        "--pipeline-max-batch",
        type=int,
        default=0,
        metavar="N",
        help="rows the pipeline runs per execution (default 0: the profile's max batch); 1 turns "
        "batching across requests off",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHT_MODES,
        default="decode-packed",
        help="python backend: how the graph models hold the weights. decode-packed (default): the prefill "
        "models map the one weights file, the decode model pre-packs its own copy (2 copies for any "
        "number of levels; a decode step of several rows costs about one row's); shared: every model "
        "maps it (once in memory, but without pre-packing a decode step of 2+ rows costs 3.5-4x one row, "
        "so batching gains little); packed: a pre-packed copy per model (levels + 1 copies)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests queued per pipeline model; more are rejected at once (default 64)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="a request queued longer is rejected; 0 = no timeout (default 60)",
    )
    parser.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="leave out pipeline_stream, the decoupled (one response per token) variant",
    )
    parser.add_argument(
        "--cpp-header",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the C++ example's star_model.h",
    )
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")


def run_triton(args: argparse.Namespace) -> int:
    """``python -m star_export triton``: 0 on success; UsageError (exit 2) for bad input."""
    if args.repo is None and args.cpp_header is None:
        raise UsageError("give --repo DIR (a Triton model repository) and/or --cpp-header FILE")
    from star_export.atomic import check_target, disk_guard
    from star_export.deploy import write_repository  # the package's entry point (no import cycle)

    for path, flag in ((args.repo, "--repo"), (args.cpp_header, "--cpp-header")):
        if path is not None:
            check_target(path, flag)  # a file where a parent folder must be: one line, nothing written
    out: dict[str, Any] = {}
    if args.repo is not None:
        with disk_guard(args.repo, "--repo", needed=lambda: repository_bytes(args.from_dir, args.backend)):
            result = write_repository(
                args.from_dir,
                args.repo,
                args.backend,
                args.max_new_tokens,
                instances=args.instances,
                pipeline_instances=args.pipeline_instances,
                device=args.device,
                prefix=args.prefix,
                intra_op_threads=args.threads,
                cores=args.cores,
                batch_delay_us=args.batch_delay_us,
                pipeline_max_batch=args.pipeline_max_batch,
                weights=args.weights,
                max_queue=args.max_queue,
                queue_timeout_s=args.queue_timeout,
                stream=args.stream,
            )
        out["repository"] = result.to_dict()
    if args.cpp_header is not None:
        with disk_guard(args.cpp_header, "--cpp-header"):
            out["cpp_header"] = str(write_cpp_header(args.from_dir, args.cpp_header))
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2))
        return 0
    if "repository" in out:
        r = out["repository"]
        print(f"wrote {r['path']}/ ({r['backend']} backend): models {', '.join(r['models'].values())}")
        limits = r["limits"]
        print(
            f"  limits: batch <= {limits['batch']}, prompt <= {limits['text_len']} tokens, past lengths <= "
            f"{limits['past_len_l1']} (layers < K) / {limits['past_len_l2']} (layers >= K)"
        )
        levels = r["levels"]
        if len(levels) > 1:
            print(
                f"  keep levels: {', '.join(str(lv['keep2']) for lv in levels)} (request input 'keep', default "
                f"{levels[0]['keep2']})"
            )
        if r["linked"]:
            print(f"  weights: {len(r['linked'])} files hard-linked to the export's (one copy on disk)")
        print(
            f"  serve:  tritonserver --model-repository={shlex.quote(str(Path(r['path']).resolve()))}   (see {r['path']}/README.md)"
        )
    if "cpp_header" in out:
        print(f"wrote {out['cpp_header']}")
    return 0


def repository_bytes(from_dir: Path, backend: str) -> int | None:
    """The most a repository of ``from_dir`` writes (every graph's model and weights copied, where
    hard links fail), from the sizes the manifest records; None where it records none."""
    from star_export.deploy.source import graph_names

    try:
        manifest = json.loads((Path(from_dir) / "manifest.json").read_text())
        files = {f["file"]: int(f["bytes"]) for f in manifest.get("files", [])}
        graphs = graph_names(manifest)
        if backend == "tensorrt":
            return sum(int(e["bytes"]) for e in (manifest.get("engines") or {}).values())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    data = sum(n for f, n in files.items() if f.endswith(".onnx.data"))
    return sum(n for f, n in files.items() if f.endswith(".onnx")) + len(graphs) * data or None
