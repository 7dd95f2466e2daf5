"""What a keep range costs (issue #24), on ``llava-bench`` in onnxruntime's CPU provider, in one run:

1. prefill latency of the range graph (``--keep 16:128``, fed ``keep_slots [1, 64]``) vs the constant-K
   graph of keep 64 (``--keep 16,64,128``'s ``prefill_k64.onnx``), same inputs, runs interleaved so
   both see the same machine load; median and minimum of ``--runs``;
2. resident memory of serving keeps 16, 64 and 128 (one greedy request each, ``load_export``) from the
   range export (one prefill session) vs the three-level export (three prefill sessions), each in a
   fresh process: peak RSS (``ru_maxrss``) and RSS after the three requests.

    python tools/keep_range_cost.py [--work DIR] [--runs 20] [--threads 2] [--json bench/results/keep_range.json]

The two exports are made into ``--work`` (kept, reused when their manifest exists). No timed asserts:
the figures are printed and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

KEEPS = (16, 64, 128)
RECIPE = "llava-bench"

_SERVE = """
import json, resource, sys
import numpy as np
from PIL import Image
from star_export.session import load_export
pipe = load_export(sys.argv[1])
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8))
after_load = int(open('/proc/self/statm').read().split()[1]) * 4096
for keep in json.loads(sys.argv[2]):
    pipe.generate([image], ["What is in the image?"], max_new_tokens=4, keep=keep)
rss = int(open('/proc/self/statm').read().split()[1]) * 4096
print(json.dumps({"rss_after_load": after_load, "rss_after": rss,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _export(out: Path, keep: str, log) -> float:
    import star_export

    if (out / "manifest.json").is_file():
        log(f"reusing {out}")
        return 0.0
    t0 = time.perf_counter()
    star_export.export(recipe=RECIPE, keep=keep, out=out, validate=False)
    seconds = time.perf_counter() - t0
    log(f"exported {RECIPE} --keep {keep} into {out} in {seconds:.0f} s")
    return seconds


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def prefill_latency(range_dir: Path, levels_dir: Path, keep: int, runs: int, threads: int) -> dict[str, Any]:
    """Median / min seconds of one prefill (batch 1, the recipe's 48-token prompt) of both graphs."""
    from star_export.comparison import make_inputs
    from star_export.geometry import Geometry

    manifest = json.loads((range_dir / "manifest.json").read_text())
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    feeds = make_inputs(geo, batch=1, text_len=48, seed=0, keep=keep)
    sessions = {
        "range": _session(range_dir / "prefill.onnx", threads),
        "constant": _session(levels_dir / f"prefill_k{keep}.onnx", threads),
    }
    inputs = {k: {i.name: feeds[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    outs: dict[str, Any] = {}
    for it in range(runs + 2):  # 2 warm-up runs each
        for name, s in sessions.items():
            t0 = time.perf_counter()
            outs[name] = s.run(["logits", "stage2_keep_idx"], inputs[name])
            if it >= 2:
                times[name].append(time.perf_counter() - t0)
    same = bool((outs["range"][1] == outs["constant"][1]).all())
    return {
        "keep": keep,
        "runs": runs,
        "threads": threads,
        "same_stage2_indices": same,
        **{f"{k}_median_ms": statistics.median(v) * 1e3 for k, v in times.items()},
        **{f"{k}_min_ms": min(v) * 1e3 for k, v in times.items()},
    }


def serving_rss(directory: Path, keeps: tuple[int, ...]) -> dict[str, int]:
    """RSS of a fresh process that loads ``directory`` and answers one request at each keep."""
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE, str(directory), json.dumps(list(keeps))],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("keep_range_work"), help="where the two exports go")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("bench/results/keep_range.json"))
    args = p.parse_args(argv)
    log = print
    range_dir, levels_dir = args.work / "range_16_128", args.work / "levels_16_64_128"
    seconds = {
        "range": _export(range_dir, f"{KEEPS[0]}:{KEEPS[1]}:{KEEPS[-1]}", log),
        "levels": _export(levels_dir, ",".join(map(str, KEEPS)), log),
    }
    lat = prefill_latency(range_dir, levels_dir, 64, args.runs, args.threads)
    log(
        f"prefill at keep 64 (batch 1, 48 tokens, {args.threads} threads, median of {args.runs}): range graph "
        f"{lat['range_median_ms']:.1f} ms, constant-K graph {lat['constant_median_ms']:.1f} ms "
        f"(min {lat['range_min_ms']:.1f} / {lat['constant_min_ms']:.1f}); same indices: {lat['same_stage2_indices']}"
    )
    rss = {"range": serving_rss(range_dir, KEEPS), "levels": serving_rss(levels_dir, KEEPS)}
    for name, r in rss.items():
        log(
            f"serving keeps {KEEPS} from the {name} export: peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
            f"after the requests {r['rss_after'] / 2**20:.0f} MiB (after loading {r['rss_after_load'] / 2**20:.0f} MiB)"
        )
    files = {
        name: sum(f.stat().st_size for f in d.iterdir() if f.name.endswith((".onnx", ".data")))
        for name, d in (("range", range_dir), ("levels", levels_dir))
    }
    result = {"recipe": RECIPE, "keeps": list(KEEPS), "export_s": seconds, "latency": lat, "rss": rss}
    result["export_bytes"] = files
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
