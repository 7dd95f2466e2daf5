"""Peak memory and time of `python -m star_export llava` on LLaVA-1.5-7B-wide checkpoints.

Real 7B weights cannot be downloaded here, so this builds sharded fp16 checkpoints with the real
transformers classes (LlavaForConditionalGeneration: CLIP ViT-L/14-336 vision tower, Llama
decoder) at the real llava-1.5-7b widths (hidden 4096, intermediate 11008, 32 heads, vocab
32064) and fewer decoder layers, exports each under ``/usr/bin/time -v`` (peak RSS = "Maximum
resident set size"), samples the exporter's RSS per stage from /proc, and fits

    peak_rss ~= a + b * checkpoint_bytes

by least squares to extrapolate to llava-1.5-7b (7.06B params) and llava-1.5-13b (13.35B).

    python tools/measure_export_memory.py                    # layers 2 4 8 fp16, 2 fp32
    python tools/measure_export_memory.py --layers 2 4 --fp32-layers

Run it from the repository root (the exporter is imported from the working tree). Each size's
checkpoint and output are deleted before the next one is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from star_export.bench.gpu.model import IMAGE_TOKEN_ID, llava_7b_config  # the 7B widths
from star_export.bench.procs import descendants, status_kib

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench/results/ lives there

GIB = 1 << 30

TARGETS = {"llava-1.5-7b": 7.06e9, "llava-1.5-13b": 13.35e9}  # parameters (model cards, rounded)
STAGE_MARKERS = (  # stdout prefix -> name of the stage that starts there
    ("[1/", "load"),
    ("[2/", "export prefill"),
    ("      prefill.onnx:", "export decode"),
    ("      decode.onnx:", "processor files"),
    ("[3/", "scan"),
    ("[4/", "validate"),
    ("wrote ", "done"),
)


def _processor_files(directory: Path, cache: Path) -> None:
    """The processor files the embedded recipe writes (its family's write_tiny_processor), with <image>
    at id 32000.

    Generated once into ``cache`` (the tiny tokenizer fills the ids below the image token with
    reserved tokens).
    """
    if not (cache / "tokenizer.json").is_file():
        from star_export.families.llava import FAMILY as LLAVA
        from star_export.recipes import load_recipe

        tiny = load_recipe("llava-tiny")
        recipe = dataclasses.replace(tiny, config={**tiny.config, "image_token_id": IMAGE_TOKEN_ID})
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        LLAVA.write_tiny_processor(tmp, recipe)
        os.replace(tmp, cache)
    for f in cache.iterdir():
        shutil.copy2(f, directory / f.name)


def build_checkpoint(directory: Path, layers: int, processor_cache: Path) -> dict:
    """Save a random fp16 LLaVA-1.5-7b-wide checkpoint with ``layers`` decoder layers (sharded safetensors)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch_dtype = torch.float16  # as llava-hf ships it
    config = llava_7b_config(layers)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # created directly in the checkpoint dtype: no fp32 copy of the weights
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch_dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    directory.mkdir(parents=True)
    model.save_pretrained(directory, max_shard_size="2GB")
    del model
    _processor_files(directory, processor_cache)
    cfg = json.loads((directory / "config.json").read_text())
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    return {
        "params": n_params,
        "param_bytes": n_bytes,
        "param_dtypes": dtypes,
        "config_dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "shards": len(shards),
        "checkpoint_bytes": sum((directory / s).stat().st_size for s in shards),
        "build_s": round(time.perf_counter() - t0, 1),
    }


def run_export(model_dir: Path, out_dir: Path, dtype: str, timeout: float, keep: str = "64") -> dict:
    """Export under /usr/bin/time -v; RSS of the exporter sampled every 0.2 s and split by stage.
    Export only (--skip-validation): the CPU parity run of a 7B-wide model is another measurement."""
    cmd = [sys.executable, "-m", "star_export", "llava", "--model", str(model_dir), "--keep", keep]
    cmd += ["--dtype", dtype, "--out", str(out_dir), "--skip-validation"]
    time_log = out_dir.parent / f".time-{out_dir.name}.txt"
    # GNU time's "Maximum resident set size" where it exists, else the peak of the sampled VmRSS
    gnu_time = shutil.which("time", path="/usr/bin")
    full = [gnu_time, "-v", "-o", str(time_log), *cmd] if gnu_time else cmd
    print("   $", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        full, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    stage = {"name": "start"}
    stages: dict[str, dict] = {}
    lock = threading.Lock()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            per = [status_kib(p) for p in descendants(proc.pid)]
            rss = {k: sum(r[k] for r in per) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
            with lock:
                s = stages.setdefault(stage["name"], {"start_s": None})
                s["peak_rss_bytes"] = max(s.get("peak_rss_bytes", 0), rss["VmRSS"])
                s["peak_anon_bytes"] = max(s.get("peak_anon_bytes", 0), rss["RssAnon"])
                s["peak_file_bytes"] = max(s.get("peak_file_bytes", 0), rss["RssFile"])
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            print("     |", line, flush=True)
            for prefix, name in STAGE_MARKERS:
                if line.startswith(prefix):
                    with lock:
                        stage["name"] = name
                        stages.setdefault(name, {})["start_s"] = round(time.perf_counter() - t0, 1)
                    break
        rc = proc.wait()
    finally:
        timer.cancel()
        done.set()
        sampler.join()
    wall = time.perf_counter() - t0
    text = time_log.read_text() if time_log.exists() else ""
    time_log.unlink(missing_ok=True)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    sampled = max((s.get("peak_rss_bytes", 0) for s in stages.values()), default=0)
    el = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", text)
    files = {}
    if out_dir.is_dir():
        files = {f.name: f.stat().st_size for f in sorted(out_dir.iterdir()) if f.is_file()}
    return {
        "command": " ".join(cmd),
        "returncode": rc,
        "wall_s": round(wall, 1),
        "time_elapsed": el.group(1) if el else None,
        "peak_rss_bytes": int(m.group(1)) * 1024 if m else (sampled or None),
        "peak_rss_source": "GNU time" if m else "sampled VmRSS (0.2 s)",
        "stages": stages,
        "files": files,
        "onnx_bytes": sum(v for k, v in files.items() if k.endswith((".onnx", ".onnx.data"))),
        "stdout_tail": lines[-40:],
    }


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[3, 6, 12],
        help="decoder layers per size (>= 3: STAR's K is 2)",
    )
    p.add_argument(
        "--fp32-layers",
        type=int,
        nargs="*",
        default=None,
        help="sizes whose fp16 checkpoint is also exported with --dtype fp32 (default: the smallest)",
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/star_export_memory"))
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "export_memory.json")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per export run")
    p.add_argument("--keep", default="64", help="the export's --keep: one level (64) or several (32,64,128)")
    args = p.parse_args(argv)
    fp32_layers = [min(args.layers)] if args.fp32_layers is None else args.fp32_layers

    import torch
    import transformers

    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for layers in args.layers:
        ckpt = args.workdir / f"llava7bw-{layers}L"
        shutil.rmtree(ckpt, ignore_errors=True)
        try:
            print(f"== {layers} decoder layers: building the fp16 checkpoint", flush=True)
            info = build_checkpoint(ckpt, layers, args.workdir / f"processor-{IMAGE_TOKEN_ID}")
            print(
                f"   {info['params'] / 1e9:.3f}B params, {info['checkpoint_bytes'] / GIB:.2f} GiB in "
                f"{info['shards']} shards ({info['build_s']}s); free disk "
                f"{shutil.disk_usage(args.workdir).free / GIB:.0f} GiB",
                flush=True,
            )
            for dtype in ["fp16"] + (["fp32"] if layers in fp32_layers else []):
                out = args.workdir / f"out-{layers}L-{dtype}"
                shutil.rmtree(out, ignore_errors=True)
                try:
                    run = run_export(ckpt, out, dtype, args.timeout, args.keep)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                row = {"layers": layers, "dtype": dtype, **info, **run}
                results.append(row)
                peak = run["peak_rss_bytes"] or 0
                print(
                    f"   {dtype}: rc={run['returncode']} wall {run['wall_s']}s, peak RSS {peak / GIB:.2f} GiB "
                    f"({peak / info['checkpoint_bytes']:.2f}x checkpoint), onnx+data {run['onnx_bytes'] / GIB:.2f} GiB",
                    flush=True,
                )
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)

    ok16 = [r for r in results if r["dtype"] == "fp16" and r["returncode"] == 0 and r["peak_rss_bytes"]]
    extrapolation = {}
    formula = None
    if len(ok16) >= 2:
        a, b = fit([(r["checkpoint_bytes"], r["peak_rss_bytes"]) for r in ok16])
        at, bt = fit([(r["checkpoint_bytes"], r["wall_s"]) for r in ok16])
        formula = {"peak_rss_bytes": {"a": a, "b": b}, "wall_s": {"a": at, "b": bt}}
        for name, n in TARGETS.items():
            ck = 2 * n  # fp16
            extrapolation[name] = {
                "params": n,
                "checkpoint_bytes": ck,
                "peak_rss_bytes": a + b * ck,
                "wall_s": at + bt * ck,
            }

    hdr = (
        f"{'layers':>6} {'dtype':>5} {'params':>8} {'ckpt GiB':>8} {'wall s':>7} {'peak GiB':>8} {'x ckpt':>6} "
        f"{'anon GiB':>8} {'file GiB':>8} {'onnx GiB':>8}"
    )
    print("\n" + hdr)
    for r in results:
        peak = r["peak_rss_bytes"] or 0
        anon = max((s.get("peak_anon_bytes", 0) for s in r["stages"].values()), default=0)
        fil = max((s.get("peak_file_bytes", 0) for s in r["stages"].values()), default=0)
        print(
            f"{r['layers']:>6} {r['dtype']:>5} {r['params'] / 1e9:>7.3f}B {r['checkpoint_bytes'] / GIB:>8.2f} "
            f"{r['wall_s']:>7.1f} {peak / GIB:>8.2f} {peak / r['checkpoint_bytes']:>6.2f} {anon / GIB:>8.2f} "
            f"{fil / GIB:>8.2f} {r['onnx_bytes'] / GIB:>8.2f}"
            + ("" if r["returncode"] == 0 else f"  rc={r['returncode']}")
        )
    print("(anon/file: peak sampled RssAnon / RssFile; mmapped safetensors pages are file-backed)")
    if formula:
        f = formula["peak_rss_bytes"]
        print(f"\npeak_rss ~= {f['a'] / GIB:.2f} GiB + {f['b']:.3f} x checkpoint_bytes (fp16 runs)")
        t = formula["wall_s"]
        print(f"wall     ~= {t['a']:.1f} s + {t['b'] * GIB:.1f} s/GiB x checkpoint_bytes")
        for name, e in extrapolation.items():
            print(
                f"{name}: {e['params'] / 1e9:.2f}B params, fp16 checkpoint {e['checkpoint_bytes'] / GIB:.1f} GiB -> "
                f"peak RSS ~{e['peak_rss_bytes'] / GIB:.1f} GiB, ~{e['wall_s']:.0f} s"
            )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "what": f"peak RSS and wall time of `python -m star_export llava --model DIR --keep {args.keep} "
        "--dtype DTYPE --skip-validation`",
        "host": {
            "cpus": os.cpu_count(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "runs": results,
        "fit": formula,
        "extrapolation": extrapolation,
    }
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1
