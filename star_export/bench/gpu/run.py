"""One run of ``tools/gpu_bench.py`` in order: checks, peaks, model, parity, set-up, timing,
report (phases [1/6]..[6/6]); ``main`` is the script's entry point."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from star_export import cost as cost_mod
from star_export.bench.gpu.accel import Accel
from star_export.bench.gpu.device import (
    Clock,
    Run,
    device_info,
    first_line,
    memory_peak,
    peak_copy,
    peak_matmul,
)
from star_export.bench.gpu.flags import DTYPES, PROG, check_args, parse_args, resolve_device, settings
from star_export.bench.gpu.model import build_model, model_config
from star_export.bench.gpu.parity import run_parity
from star_export.bench.gpu.report import annotate, format_table, plot
from star_export.bench.gpu.variants import Variant, interleave, make_cases, scoring_variants, set_up_case
from star_export.errors import MissingComponent, UsageError
from star_export.families.llava import llava_geometry
from star_export.geometry import Geometry
from star_export.star import StarConfig


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
