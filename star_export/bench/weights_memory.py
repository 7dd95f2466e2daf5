"""Weights in memory: the resident set of ``load_export`` (and of a tritonserver) for 1 and for every
keep level of an export, with the weights shared between sessions and without.

    python -m star_export.bench.weights_memory EXPORT_DIR [--keep 64,192,576] [--json FILE]

Each case runs in a fresh Python process (``load_export(dir, share_weights=...)``, then one greedy
``generate`` per keep level asked, the first level first): RSS (``VmRSS``, with its anonymous and
file-backed parts, ``/proc/self/status``) after the first level's request and after the last one's,
and the wall time of each request (pre-packing is off where the weights are shared: the price, if
any, shows there). ``--server`` adds tritonserver on the export's ``--backend python`` repository in
model-control explicit mode: the server and its backend stubs' RSS (the process tree) with the
pipeline, the decode model and the first level's prefill model loaded, then with every level's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from star_export.bench.procs import tree_rss

MIB = 1 << 20
CASE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from PIL import Image

def rss():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out

from star_export.session import load_export
directory, share, keeps = sys.argv[1], sys.argv[2] == "1", [int(k) for k in sys.argv[3].split(",")]
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
before = rss()
pipe = load_export(directory, share_weights=share)
rows = []
for keep in keeps:
    start = time.perf_counter()
    out = pipe.generate([image], ["What is in the image?"], max_new_tokens=8, keep=keep)
    rows.append({"keep": keep, "wall_s": time.perf_counter() - start, "tokens": out.result.tokens[0],
                 "prefill_s": out.result.prefill_s, "decode_s": out.result.decode_s,
                 "decode_steps": out.result.decode_steps, **rss()})
print(json.dumps({"before": before, "levels": rows}))
"""


def measure_load_export(directory: Path, keeps: list[int], share: bool, timeout: float = 1800) -> dict:
    """One fresh process: ``load_export`` then one request per keep level; RSS after each."""
    cmd = [sys.executable, "-c", CASE, str(directory), "1" if share else "0", ",".join(map(str, keeps))]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode_step_ms(
    directory: Path, batches: list[int], steps: int = 8, past: tuple[int, int] = (150, 90)
) -> dict:
    """The decode graph's step time (ms, median of ``steps`` after one warm-up; 1 intra-op thread) per
    batch size, in a session over the shared mapping (pre-packing off, what ``share_weights`` runs)
    and in one that loads and pre-packs its own copy. ``past``: the past lengths (layers < K, >= K).
    Without pre-packing, onnxruntime's CPU MatMul packs every weight matrix again on each call of 2+
    rows; one row takes a path that reads it as it is."""
    import time

    import numpy as np
    import onnxruntime as ort

    from star_export.contract import contract_from_dict
    from star_export.weights import SharedWeights

    manifest = json.loads((directory / "manifest.json").read_text())
    graph = manifest["graphs"]["decode"]
    path = directory / graph.get("file", "decode.onnx")
    contract = contract_from_dict(graph)

    def feeds(batch: int) -> dict:
        sizes = {"batch": batch, "past_len_l1": past[0], "past_len_l2": past[1]}
        rng = np.random.default_rng(0)
        out = {}
        for spec in contract.inputs:
            shape = spec.concrete(sizes)
            if spec.dtype.startswith("int"):
                out[spec.name] = (
                    np.ones(shape, np.int64) if "mask" in spec.name else np.full(shape, 5, np.int64)
                )
            else:
                out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return out

    result: dict = {}
    for name, share in (("pre-packed (own copy)", False), ("shared mapping (pre-packing off)", True)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        weights = None
        if share:
            weights = SharedWeights(directory)
            weights.options(path, opts)  # turns pre-packing off
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        result[name] = {}
        for batch in batches:
            f = feeds(batch)
            session.run(None, f)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                session.run(None, f)
                times.append(time.perf_counter() - start)
            result[name][str(batch)] = round(float(np.median(times)) * 1000, 1)
        del session, weights
    return result


def weights_bytes(directory: Path) -> int:
    """The bytes of the export's external data (``weights.onnx.data`` and any other ``*.data``)."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.data"))


def measure_server(
    directory: Path, keeps: list[int], work: Path, weights: str = "shared", threads: int = 1
) -> dict:
    """tritonserver (explicit model control) on the export's python-backend repository: the process
    tree's RSS and PSS with the first level loaded, then with every level (after one request at each).
    ``weights``: ``triton --weights`` (shared: every graph model maps the weights file, packed: each
    loads and pre-packs its own copy, decode-packed: only the decode model does)."""
    from star_export import deploy
    from star_export.bench.load import Request, run_requests
    from star_export.deploy.server import TritonServer, free_port

    repo = work / "repository"
    written = deploy.write_repository(
        directory,
        repo,
        "python",
        8,
        pipeline_instances=1,
        intra_op_threads=threads,
        weights=weights,
    )
    models = written.models
    level_model = {int(lv["keep2"]): lv["model"] for lv in written.levels}
    first = [models["pipeline"], models["decode"], level_model[keeps[0]]]
    server = TritonServer(
        repo, work, options=["--model-control-mode=explicit", *(f"--load-model={m}" for m in first)]
    )
    server.start({k: free_port() for k in ("http", "grpc", "metrics")}, timeout=600)
    out: dict = {"startup_s": server.startup_s}
    try:
        image = _png()
        run_requests(
            server.ports["grpc"],
            [Request(image, "What is in the image?", 8, keeps[0])],
            1,
            models["pipeline"],
        )
        out["first_level"] = {"keeps": keeps[:1], **tree_rss(server.proc.pid)}
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports['grpc']}")
        for keep in keeps[1:]:
            client.load_model(level_model[keep])
        client.close()
        run_requests(
            server.ports["grpc"],
            [Request(image, "What is in the image?", 8, k) for k in keeps],
            1,
            models["pipeline"],
        )
        out["all_levels"] = {"keeps": keeps, **tree_rss(server.proc.pid)}
    finally:
        server.stop()
    return out


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument(
        "--keep", default=None, help="keep levels, the first measured alone (default: the export's)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--server", action="store_true", help="also tritonserver, 1 level vs all (explicit mode)")
    p.add_argument("--no-load-export", action="store_true", help="skip the load_export cases")
    p.add_argument(
        "--decode-batches",
        default=None,
        metavar="B,B,...",
        help="also time one decode step per batch size, pre-packed vs over the shared mapping",
    )
    args = p.parse_args(argv)
    from star_export.bench.timing import machine_info

    manifest = json.loads((args.export / "manifest.json").read_text())
    keeps = (
        [int(k) for k in args.keep.split(",")]
        if args.keep
        else [int(lv["keep2"]) for lv in manifest["star"]["levels"]]
    )
    doc: dict = {
        "what": "RSS of load_export after one request at the first keep level, then at every level",
        "export": str(args.export),
        "model": manifest["model"].get("source") or manifest["model"].get("directory"),
        "weights_bytes": weights_bytes(args.export),
        "keeps": keeps,
        "machine": machine_info(0),
        "load_export": {},
    }
    w = doc["weights_bytes"]
    print(f"weights on disk: {w / MIB:.1f} MiB; keep levels {keeps}")
    for share in () if args.no_load_export else (False, True):
        r = measure_load_export(args.export, keeps, share)
        one, every = r["levels"][0], r["levels"][-1]
        name = "shared" if share else "per-session"
        doc["load_export"][name] = r
        walls = ", ".join(f"{x['wall_s']:.2f}" for x in r["levels"])
        print(
            f"{name:>11}: RSS {one['VmRSS'] / MIB:7.1f} MiB after keep {keeps[0]}, {every['VmRSS'] / MIB:7.1f} MiB "
            f"after all {len(keeps)} levels (+{(every['VmRSS'] - one['VmRSS']) / w:.2f} x weights); "
            f"request s: {walls}"
        )
    if args.server:
        doc["tritonserver"] = {}
        for mode in ("packed", "shared", "decode-packed"):
            name = {"packed": "per-session", "shared": "shared"}.get(mode, mode)
            with tempfile.TemporaryDirectory(prefix="star-weights-") as tmp:
                doc["tritonserver"][name] = s = measure_server(args.export, keeps, Path(tmp), mode)
            one, every = s["first_level"], s["all_levels"]
            print(
                f"tritonserver {name}: RSS (summed over {every['processes']} processes) "
                f"{one['rss'] / MIB:.0f} MiB with keep {keeps[0]}, {every['rss'] / MIB:.0f} MiB with all "
                f"{len(keeps)} levels; PSS {one['pss'] / MIB:.0f} -> {every['pss'] / MIB:.0f} MiB"
            )
    if args.decode_batches:
        batches = [int(b) for b in args.decode_batches.split(",")]
        doc["decode_step_ms"] = steps = decode_step_ms(args.export, batches)
        for name, row in steps.items():
            print(f"decode step, {name}: " + ", ".join(f"{b} rows {ms:.0f} ms" for b, ms in row.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
