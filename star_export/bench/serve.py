"""``python -m star_export bench serve``: the export served by a real tritonserver, measured as the field
measures LLM serving (vLLM ``bench serve``, ``trtllm-bench``, AIPerf): a concurrency sweep per keep
level, and a mix of the levels.

The server is :class:`star_export.deploy.server.TritonServer` (the nvidia-pytriton wheel's binary,
loopback only) on the export's ``--backend python`` repository (written into a temporary
directory, or ``--repo``). The load is :mod:`star_export.bench.load`: tritonclient's asyncio gRPC
client, closed loop, ``--requests`` per point after an untimed warm-up of ``concurrency`` requests.
Per point: requests/s and output tokens/s, end-to-end p50/p90/p99, TTFT and TPOT (ITL with a
streaming model), rejected and failed requests, the server's RSS (its process tree). Without a
decoupled (streaming) model in the repository, TTFT is the end-to-end time of 1-token requests sent
at the same concurrency and TPOT is derived from it: the table says so.

Writes ``serve.json`` and ``serve.png`` (requests/s vs p90 latency, one line per level) into ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from star_export.bench.load import Request, run_requests, summarise
from star_export.bench.procs import tree_rss
from star_export.deploy.settings import WEIGHT_MODES
from star_export.errors import UsageError

DESCRIPTION = """\
Serve an export with a real tritonserver (loopback, the python-backend repository) and load it with
tritonclient's asyncio gRPC client, closed loop: for each keep level (and a mix of them) and each
concurrency, --requests timed requests after a warm-up. Reports requests/s, output tokens/s, end-to-end
p50/p90/p99, TTFT and TPOT (ITL with a streaming model; without one TTFT is the end-to-end time of a
1-token request at the same concurrency, and says so), rejected and failed requests, the server's RSS.
Writes serve.json and serve.png (requests/s vs p90 latency per level) into --out.

example:
  python -m star_export bench serve --export star_out --keep 64,576 --concurrency 1,2,4,8,16 --requests 32
"""

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
PROMPTS = ("What is in the image?", "Describe the picture in detail.", "What colours do you see?")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m star_export bench serve``."""
    from star_export.bench.argtypes import int_list

    p.add_argument(
        "--export", type=Path, default=None, metavar="DIR", help="an export directory (`export --out`)"
    )
    p.add_argument(
        "--repo", type=Path, default=None, metavar="DIR", help="serve this python-backend repository instead"
    )
    p.add_argument(
        "--keep",
        type=int_list,
        default=None,
        metavar="K,K,...",
        help="keep levels to sweep (default: all held)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        metavar="PORT",
        help="drive a server already running on 127.0.0.1:PORT (e.g. `serve`) instead of starting one; "
        "--export names the export it serves",
    )
    p.add_argument("--no-mix", action="store_true", help="skip the point set whose requests mix the levels")
    p.add_argument(
        "--concurrency",
        type=int_list,
        default=list(DEFAULT_CONCURRENCY),
        metavar="C,C,...",
        help="requests in flight (default 1,2,4,8,16)",
    )
    p.add_argument(
        "--requests", type=int, default=32, metavar="N", help="timed requests per point (default 32)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=16, metavar="N", help="tokens per answer (default 16)"
    )
    p.add_argument(
        "--pipeline-instances", type=int, default=2, metavar="N", help="pipeline model instances (default 2)"
    )
    p.add_argument(
        "--batching",
        type=_batching_modes,
        default=["on"],
        metavar="on|off|on,off",
        help="batching across requests in the pipeline (Triton's dynamic batcher, up to the profile's max "
        "batch) or off (one request per execution); on,off sweeps both, one server each (default on; "
        "with --repo / --grpc-port the server's own setting, not changed)",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHT_MODES,
        default="decode-packed",
        help="how the graph models hold the weights (triton --weights; default decode-packed)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="onnxruntime intra-op threads per graph model (default 1)",
    )
    p.add_argument(
        "--stream-model",
        default=None,
        metavar="NAME",
        help="the decoupled (streaming) pipeline model (default: the repository's, if it has one)",
    )
    p.add_argument("--no-ttft-probe", action="store_true", help="without streaming, skip the 1-token pass")
    p.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="after the sweep, on the same server (the first --batching mode): N more requests at "
        "--soak-concurrency cycling the --keep levels, the server's RSS read after a warm-up and every "
        "N/20 requests (issue 22: within 5 %% of its level after the warm-up)",
    )
    p.add_argument(
        "--soak-concurrency", type=int, default=8, metavar="C", help="requests in flight in the soak (8)"
    )
    p.add_argument(
        "--soak-warmup",
        type=int,
        default=100,
        metavar="N",
        help="untimed soak requests before the first RSS (100)",
    )
    p.add_argument("--no-sweep", action="store_true", help="the soak only (with --soak)")
    p.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="client timeout per request (300)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results"),
        metavar="DIR",
        help="serve.json, serve.png (bench/results)",
    )


def _batching_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes) or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"{text!r}: give on, off or on,off")
    return modes


def check_args(args: argparse.Namespace) -> None:
    if (args.export is None) == (args.repo is None):
        raise UsageError(
            "bench serve: give --export DIR (an export) or --repo DIR (a python-backend repository)"
        )
    for flag, value in (("--requests", args.requests), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.soak < 0 or args.soak_warmup < 0 or args.soak_concurrency < 1:
        raise UsageError("--soak and --soak-warmup must be >= 0 and --soak-concurrency >= 1")
    if args.no_sweep and not args.soak:
        raise UsageError("--no-sweep: give --soak N (there is nothing else to run)")
    if args.soak and args.grpc_port is not None:
        raise UsageError(
            "--soak reads the server's RSS: leave out --grpc-port (this command starts the server)"
        )
    if min(args.concurrency) < 1:
        raise UsageError(f"--concurrency must be >= 1, got {min(args.concurrency)}")
    if args.grpc_port is not None and args.export is None:
        raise UsageError("--grpc-port: give --export DIR too (the export the running server serves)")
    if (args.repo is not None or args.grpc_port is not None) and args.batching != ["on"]:
        raise UsageError(
            "--batching: only with --export (the repository is written for each mode); a given "
            "repository or running server keeps its own setting"
        )


def _image(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (336, 336, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def requests_for(keeps: list[int | None], n: int, max_new: int, images: list[bytes]) -> list[Request]:
    """``n`` requests cycling through ``keeps`` (one level, or a mix), the images and the prompts."""
    return [
        Request(images[i % len(images)], PROMPTS[i % len(PROMPTS)], max_new, keeps[i % len(keeps)])
        for i in range(n)
    ]


def _repository(args: argparse.Namespace, work: Path, batching: str = "on") -> tuple[Path, dict[str, Any]]:
    from star_export import deploy
    from star_export.deploy.server import served_models

    if args.repo is not None:
        _, pipeline, backend = served_models(args.repo)
        if backend not in (None, "python"):
            raise UsageError(
                f"--repo {args.repo}: a {backend} repository; this server runs --backend python only"
            )
        marker = json.loads((args.repo / deploy.files.MARKER).read_text()) if pipeline else {}
        return args.repo.resolve(), marker
    repo = work / f"model_repository_batching_{batching}"
    written = deploy.write_repository(
        args.export,
        repo,
        "python",
        args.max_new_tokens,
        pipeline_instances=args.pipeline_instances,
        intra_op_threads=args.threads,
        pipeline_max_batch=1 if batching == "off" else 0,
        weights=args.weights,
    )
    return repo, written.to_dict() | {
        "settings": {"pipeline_instances": args.pipeline_instances, "threads": args.threads}
    }


def stream_model(client: Any, wanted: str | None) -> str | None:
    """The decoupled model that takes the pipeline's inputs (``prompt``), or None."""
    index = client.get_model_repository_index().models
    names = [wanted] if wanted else sorted(m.name for m in index if m.state == "READY")
    for name in names:
        try:
            config = client.get_model_config(name).config
        except Exception:
            if wanted:
                raise UsageError(f"--stream-model {wanted}: not a model of the server") from None
            continue
        decoupled = config.model_transaction_policy.decoupled
        if decoupled and any(i.name == "prompt" for i in config.input):
            return name
        if wanted:
            raise UsageError(f"--stream-model {wanted}: not a decoupled model taking 'prompt'")
    return None


def sweep(
    port: int,
    server_pid: int | None,
    model: str,
    stream: str | None,
    args: argparse.Namespace,
    levels: list[Any],
    batching: str | None = None,
) -> list[dict[str, Any]]:
    """Every (level, concurrency) point: warm-up, timed requests, the 1-token probe, the server's RSS."""
    images = [_image(s) for s in range(3)]
    points = []
    for level in levels:
        keeps = level if isinstance(level, list) else [level]
        name = "mix " + "+".join(map(str, keeps)) if isinstance(level, list) else str(level)
        for c in args.concurrency:
            warm = requests_for(keeps, c, args.max_new_tokens, images)
            run_requests(port, warm, c, stream or model, args.timeout, stream is not None)
            timed = requests_for(keeps, args.requests, args.max_new_tokens, images)
            outcomes = run_requests(port, timed, c, stream or model, args.timeout, stream is not None)
            probe = []
            if stream is None and not args.no_ttft_probe:
                probe = run_requests(
                    port, requests_for(keeps, args.requests, 1, images), c, model, args.timeout
                )
            row = {
                "level": name,
                "keeps": keeps,
                "batching": batching,
                "concurrency": c,
                **summarise(outcomes, stream is not None, probe),
            }
            row["server_rss_bytes"] = tree_rss(server_pid)["rss"] if server_pid else None
            points.append(row)
            print(format_row(row), flush=True)
    return points


def run_soak(
    port: int, server_pid: int, model: str, args: argparse.Namespace, keeps: list[int]
) -> dict[str, Any]:
    """``--soak``: the server's RSS after a warm-up and every ``soak / 20`` requests (non-streaming
    pipeline, the --keep levels in turn)."""
    from star_export.bench.load import soak

    images = [_image(s) for s in range(3)]
    requests = requests_for(list(keeps), args.soak, args.max_new_tokens, images)
    print(
        f"soak: {args.soak_warmup} warm-up + {args.soak} requests at concurrency {args.soak_concurrency}, "
        f"keeps {','.join(map(str, keeps))} ...",
        flush=True,
    )

    def progress(sent: int, total: int) -> None:
        print(
            f"  soak {sent}/{total} requests, server RSS {tree_rss(server_pid)['rss'] / (1 << 20):.0f} MiB",
            flush=True,
        )

    result = soak(
        port,
        server_pid,
        requests,
        args.soak_concurrency,
        args.soak_warmup,
        model=model,
        timeout=args.timeout,
        chunk=max(1, args.soak // 20),
        progress=progress,
    )
    return result.to_dict() | {"concurrency": args.soak_concurrency, "keeps": list(keeps)}


def format_soak(s: dict[str, Any]) -> str:
    mib = 1 << 20
    return (
        f"soak: {s['requests']} requests after {s['warmup']} warm-up (concurrency {s['concurrency']}, keeps "
        f"{','.join(map(str, s['keeps']))}): {s['ok']} ok, {s['failed']} failed, {s['wall_s']:.0f} s; server RSS "
        f"{s['rss_after_warmup'] / mib:.0f} MiB after the warm-up, {s['rss_end'] / mib:.0f} MiB at the end "
        f"({s['growth']:+.1%}; highest read {s['peak_growth']:+.1%})"
    )


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


HEADER = (
    f"{'level':>14} {'batch':>5} {'conc':>4} {'req/s':>6} {'tok/s':>6} {'TTFT50':>7} {'TPOT50':>7} {'ITL50':>6} "
    f"{'e2e50':>7} {'e2e90':>7} {'e2e99':>7} {'ok':>4} {'rej':>4} {'fail':>4} {'RSS MiB':>8}"
)


def format_row(r: dict[str, Any]) -> str:
    rps = "-" if r["requests_per_s"] is None else f"{r['requests_per_s']:.2f}"
    tps = "-" if r["output_tokens_per_s"] is None else f"{r['output_tokens_per_s']:.1f}"
    return (
        f"{r['level']:>14} {r.get('batching') or '-':>5} {r['concurrency']:>4} {rps:>6} {tps:>6} {_ms(r['ttft_p50_s']):>7} "
        f"{_ms(r['tpot_p50_s']):>7} {_ms(r['itl_p50_s']):>6} {_ms(r['e2e_p50_s']):>7} {_ms(r['e2e_p90_s']):>7} "
        f"{_ms(r['e2e_p99_s']):>7} {r['ok']:>4} {r['rejected']:>4} {r['failed']:>4} "
        + ("       -" if r["server_rss_bytes"] is None else f"{r['server_rss_bytes'] / (1 << 20):>8.0f}")
    )


def format_table(doc: dict[str, Any]) -> str:
    m = doc["model"]
    lines = [
        f"bench serve: {m['name']} (N {m['n_visual']}, {m['num_layers']} decoder layers, keeps "
        f"{','.join(map(str, m['keeps']))}), tritonserver {doc['server'].get('version', '?')} python backend, "
        f"{doc['settings'].get('pipeline_instances', '?')} pipeline instances",
        f"machine: {doc['machine'].get('cpu', '?')}, {doc['machine'].get('logical_cpus', '?')} CPUs; "
        f"{doc['settings']['requests']} requests per point, {doc['settings']['max_new_tokens']} new tokens; "
        f"latencies in ms",
        f"TTFT: {doc['ttft_kind']}",
        HEADER,
        *(format_row(r) for r in doc["points"]),
    ]
    if doc.get("scaling"):
        lines.append(
            "requests/s at the highest concurrency over concurrency 1: "
            + "; ".join(f"{k} {v['ratio']:.2f}x (c={v['concurrency']})" for k, v in doc["scaling"].items())
        )
    return "\n".join(lines)


def _series(r: dict[str, Any]) -> str:
    return r["level"] + (f" batching {r['batching']}" if r.get("batching") else "")


def scaling(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per level (and batching mode): requests/s at its highest concurrency over that at concurrency 1."""
    out: dict[str, dict[str, Any]] = {}
    for series in dict.fromkeys(_series(r) for r in points):
        pts = {r["concurrency"]: r["requests_per_s"] for r in points if _series(r) == series}
        top = max(pts)
        if 1 in pts and top > 1 and pts[1] and pts[top]:
            out[series] = {"concurrency": top, "ratio": round(pts[top] / pts[1], 3)}
    return out


def plot(doc: dict[str, Any], path: Path) -> Path:
    """requests/s vs p90 end-to-end latency, one line per level (points labelled with the concurrency)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    colours = {lv: f"C{i}" for i, lv in enumerate(dict.fromkeys(r["level"] for r in doc["points"]))}
    for series in dict.fromkeys(_series(r) for r in doc["points"]):
        pts = [r for r in doc["points"] if _series(r) == series and r["requests_per_s"] and r["e2e_p90_s"]]
        if not pts:
            continue
        x, y = [r["e2e_p90_s"] for r in pts], [r["requests_per_s"] for r in pts]
        off = pts[0].get("batching") == "off"
        colour = colours[pts[0]["level"]]
        ax.plot(x, y, marker="o", linestyle="--" if off else "-", color=colour, label=f"keep {series}")
        for r, xx, yy in zip(pts, x, y, strict=True):
            ax.annotate(
                str(r["concurrency"]), (xx, yy), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    m = doc["model"]
    ax.set_xlabel("end-to-end latency p90 (s)")
    ax.set_ylabel("requests / s")
    ax.set_title(f"{m['name']} (N {m['n_visual']}) on tritonserver, labels: concurrency", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from star_export.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _model_info(repo: Path | None, export: Path | None) -> dict[str, Any]:
    """Name, N, layers, dtype and keep levels from the export's manifest (or the repository's copy)."""
    manifest_path = export / "manifest.json" if export else next(repo.glob("*/1/manifest.json"), None)
    if export is not None and not manifest_path.is_file():
        raise UsageError(f"--export {export}: no manifest.json (not an export directory)")
    manifest = json.loads(manifest_path.read_text()) if manifest_path else {}
    geo = (manifest.get("model") or {}).get("geometry") or {}
    model = manifest.get("model") or {}
    levels = [int(lv["keep2"]) for lv in (manifest.get("star") or {}).get("levels", [])]
    return {
        "name": model.get("source") or model.get("directory") or str(export or repo),
        "hidden_size": geo.get("hidden_size"),
        "n_visual": geo.get("n_visual"),
        "num_layers": geo.get("num_layers"),
        "dtype": next(
            (
                t["dtype"]
                for g in (manifest.get("graphs") or {}).values()
                for t in g["inputs"]
                if t["name"] == "pixel_values"
            ),
            None,
        ),
        "keeps": levels,
    }


def _server_facts(port: int, wanted: str | None) -> tuple[str, str | None]:
    """(server version, streaming model or None) of the server on 127.0.0.1:``port``."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        return client.get_server_metadata().version, stream_model(client, wanted)
    finally:
        client.close()


def run_serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server (or use the running one), sweep, write serve.json / serve.png into ``args.out``;
    returns the document."""
    from star_export.atomic import atomic_write
    from star_export.bench.timing import machine_info
    from star_export.deploy.server import TritonServer, free_port

    check_args(args)
    source = args.export if args.export is not None else args.repo
    if not source.is_dir():
        raise UsageError(f"--{'export' if args.export is not None else 'repo'} {source}: no such directory")
    model = _model_info(args.repo, args.export)
    held = model["keeps"]
    keeps = args.keep or held
    missing = [k for k in keeps if held and k not in held]
    if missing:
        raise UsageError(f"--keep {missing[0]}: this export holds keep levels {','.join(map(str, held))}")
    levels: list[Any] = list(keeps) + ([list(keeps)] if len(keeps) > 1 and not args.no_mix else [])
    started = time.time()
    if args.grpc_port is not None:  # a server already running
        port, startup_s, pipeline = args.grpc_port, None, "pipeline"
        version, stream = _server_facts(port, args.stream_model)
        print(HEADER, flush=True)
        points, soaked = sweep(port, None, pipeline, stream, args, levels), None
    else:
        points, startup_s, soaked = [], None, None
        modes = args.batching if args.repo is None else [None]
        if args.no_sweep:  # the soak runs on the first mode's server only
            modes = modes[:1]
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="star-bench-serve-") as tmp:
                work = Path(tmp)
                repo, info = _repository(args, work, mode or "on")
                server = TritonServer(repo, work)
                note = f" (batching {mode})" if mode else ""
                print(f"starting tritonserver on {repo}{note} ...", flush=True)
                server.start({k: free_port() for k in ("http", "grpc", "metrics")}, timeout=900)
                try:
                    pipeline = (info.get("models") or {}).get("pipeline", "pipeline")
                    version, stream = _server_facts(server.ports["grpc"], args.stream_model)
                    pid = server.proc.pid
                    if not args.no_sweep:
                        print(HEADER, flush=True)
                        points += sweep(server.ports["grpc"], pid, pipeline, stream, args, levels, mode)
                    if args.soak and soaked is None:
                        soaked = run_soak(server.ports["grpc"], pid, pipeline, args, keeps)
                        soaked["batching"] = mode
                finally:
                    server.stop()
                startup_s = server.startup_s if startup_s is None else startup_s
    doc = {
        "what": "python -m star_export bench serve: closed-loop load on the pipeline model over gRPC (loopback)",
        "machine": machine_info(0),
        "model": model,
        "server": {
            "version": version,
            "startup_s": startup_s,
            "stream_model": stream,
            "pipeline": pipeline,
        },
        "settings": {
            "requests": args.requests,
            "max_new_tokens": args.max_new_tokens,
            "concurrency": args.concurrency,
            "pipeline_instances": args.pipeline_instances if args.repo is None else None,
            "threads": args.threads if args.repo is None else None,
            "batching": args.batching if args.repo is None and args.grpc_port is None else None,
            "weights": args.weights if args.repo is None and args.grpc_port is None else None,
            "repository": (
                f"a running server (gRPC 127.0.0.1:{args.grpc_port})"
                if args.grpc_port is not None
                else str(args.repo)
                if args.repo
                else "written from --export into a temporary directory"
            ),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        },
        "ttft_kind": points[0]["ttft_kind"] if points else "not measured",
        "points": points,
        "scaling": scaling(points),
        "soak": soaked,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.no_sweep:  # the soak alone: its own file, a sweep's serve.json is left as it is
        atomic_write(args.out / "serve_soak.json", json.dumps(doc, indent=2) + "\n")
        print("\n" + format_soak(soaked))
        print(f"wrote {args.out / 'serve_soak.json'}")
        return doc
    atomic_write(args.out / "serve.json", json.dumps(doc, indent=2) + "\n")
    plot(doc, args.out / "serve.png")
    print("\n" + format_table(doc))
    if soaked is not None:
        print(format_soak(soaked))
    print(f"wrote {args.out / 'serve.json'} and {args.out / 'serve.png'}")
    return doc
