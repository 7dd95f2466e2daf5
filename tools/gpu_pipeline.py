#!/usr/bin/env python
"""The full GPU path in one command, for a host with TensorRT 10.x/11.x and a CUDA GPU.

Steps (each a ``python -m star_export`` subprocess, output streamed):

1. export   ``llava --keep K --out OUT [--dtype D]``: ONNX graphs in the requested precision,
            manifest, CPU parity report. No ``--engine``: the engines are built once, in step 2;
2. build    ``build --from OUT --engine ENGINE [--dtype D] --timing-cache TC``: the prefill and
            decode engines (the export's dtype when ``--dtype`` is not given), reusing/updating
            the timing cache. On TensorRT 11 the engine's precision is the ONNX's (strong
            typing), which is why step 1 exports in ``D``;
3. validate ``validate --from OUT --trt``: the engines against the PyTorch rewrite (prefill by the
            selection-with-margin rule and forced-selection parity, then greedy decoding), next to
            the CPU checks, into OUT/report.json;
4. bench    ``bench --keep K --out OUT/bench [--model M | --recipe R]``: bench exports and times its
            own graphs (it has no ``--from``).

Then a summary table (step, exit code, seconds, result) and the engines recorded in the manifest.
Exits non-zero when a step failed. :func:`plan` returns the commands without running anything;
``--dry-run`` prints them (works anywhere).

    python tools/gpu_pipeline.py --keep 64 --dtype fp16 --out gpu_run/
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Step:
    name: str
    command: list[str] | None  # None: run in-process or skipped
    rc: int | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def result(self) -> str:
        if self.rc is None:
            return "skipped"
        return "ok" if self.rc == 0 else f"FAIL (exit {self.rc})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/gpu_pipeline.py",
        description="Export, build TensorRT engines, validate them against onnxruntime and benchmark, "
        "then print a summary table. Needs TensorRT 10.x/11.x and a CUDA GPU (except --dry-run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("gpu_run"), help="output directory")
    p.add_argument(
        "--engine", type=Path, default=None, help="prefill engine path (default: OUT/prefill.plan)"
    )
    p.add_argument("--keep", type=int, default=64, help="visual tokens kept by stage 2")
    p.add_argument(
        "--model", type=Path, default=None, help="LLaVA checkpoint directory (default: llava-tiny)"
    )
    p.add_argument("--recipe", default=None, help="recipe name or .toml")
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default=None,
        help="precision of the exported ONNX and of the engines (default: the checkpoint's)",
    )
    p.add_argument(
        "--timing-cache", type=Path, default=None, help="timing cache file (default: OUT/timing.cache)"
    )
    p.add_argument("--max-batch", type=int, default=None, help="profile max batch")
    p.add_argument("--max-text-len", type=int, default=None, help="profile max prompt length")
    p.add_argument("--python", default=sys.executable, help="interpreter that has star_export installed")
    p.add_argument("--skip-bench", action="store_true", help="do not run the benchmark step")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps and their command lines, in order; runs nothing. Exactly one step builds engines
    (``build``)."""
    py, out = args.python, args.out
    engine = args.engine or out / "prefill.plan"
    cache = args.timing_cache or out / "timing.cache"
    base = [py, "-m", "star_export"]
    dtype = ["--dtype", args.dtype] if args.dtype else []
    source = ["--model", str(args.model)] if args.model is not None else []
    if args.recipe is not None:
        source += ["--recipe", args.recipe]
    export = [*base, "llava", "--keep", str(args.keep), "--out", str(out), *dtype, *source]
    build = [*base, "build", "--from", str(out), "--engine", str(engine), *dtype]
    build += ["--timing-cache", str(cache)]
    if args.max_batch is not None:
        build += ["--max-batch", str(args.max_batch)]
    if args.max_text_len is not None:
        build += ["--max-text-len", str(args.max_text_len)]
    steps = [Step("export", export), Step("build", build)]
    steps.append(Step("validate", [*base, "validate", "--from", str(out), "--trt"]))
    if args.skip_bench:
        steps.append(Step("bench", None, note="--skip-bench"))
    else:
        bench = [*base, "bench", "--keep", str(args.keep), "--out", str(out / "bench"), *source]
        steps.append(Step("bench", bench))
    return steps


def summary(steps: list[Step], out: Path) -> str:
    lines = [f"{'step':<10} {'exit':>5} {'seconds':>9}  {'result':<16} note", "-" * 72]
    for s in steps:
        rc = "-" if s.rc is None else str(s.rc)
        lines.append(f"{s.name:<10} {rc:>5} {s.seconds:>9.1f}  {s.result:<16} {s.note}")
    manifest = out / "manifest.json"
    if manifest.is_file():
        engines = (json.loads(manifest.read_text()).get("engines")) or {}
        for graph, e in engines.items():
            lines.append(
                f"engine {graph}: {e.get('path')} {e.get('bytes', 0) / 2**20:.1f} MiB, TensorRT "
                f"{e.get('tensorrt')}, {e.get('dtype')}, built in {e.get('build_seconds')}s"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for s in plan(args):
            print(f"[{s.name}] {shlex.join(s.command) if s.command else s.note}")
        return 0

    from star_export.engines import trt_status

    ok, why = trt_status()
    print(f"[env] {why}")
    if not ok:
        print(
            "gpu_pipeline: this host cannot build TensorRT engines; the build step will exit 3",
            file=sys.stderr,
        )
    steps = plan(args)
    for s in steps:
        if s.command is None:
            print(f"[{s.name}] {s.note}")
            continue
        print(f"[{s.name}] {shlex.join(s.command)}", flush=True)
        t0 = time.perf_counter()
        s.rc = subprocess.run(s.command).returncode
        s.seconds = time.perf_counter() - t0
        if s.rc != 0 and s.name in ("export", "build"):
            missing = "TensorRT or a CUDA GPU is missing (see above); " if s.rc == 3 else ""
            s.note = s.note or f"{missing}later steps need this one; stopping"
            break
    print()
    print(summary(steps, args.out))
    return 0 if all(s.rc in (0, None) for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
