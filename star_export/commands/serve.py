"""``serve``: a real tritonserver on a Triton repository, on loopback, until Ctrl-C / SIGTERM. The
server's set-up (the binary inside the nvidia-pytriton wheel, its backend stub's environment) is
:mod:`star_export.deploy.server`."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from star_export.errors import UsageError

NAME = "serve"
HELP = "start tritonserver on a Triton repository (loopback, this machine's CPU server)"
DESCRIPTION = (
    "Start the tritonserver installed by tools/install_triton_server.sh (inside the nvidia-pytriton "
    "wheel: Python backend, CPU) on a repository written by `python -m star_export triton`, bound to "
    "127.0.0.1. Prints the HTTP and gRPC addresses, the models and a tritonclient call once the server "
    "is ready; its log goes to a file in a temporary directory (printed). Ctrl-C or SIGTERM stops it "
    "after draining: the pipeline model is unloaded first, which answers its queued and running "
    "requests and refuses new ones (exit 0 on a clean stop). On a GPU host, serve with the NGC Triton container instead (README)."
)
EPILOG = """examples:
  python -m star_export triton --from star_out --repo model_repository
  python -m star_export serve --repo model_repository
  python -m star_export serve --repo model_repository --http-port 9000 --grpc-port 9001 --metrics-port 9002
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, required=True, help="Triton model repository (from `triton --repo`)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1 (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port on 127.0.0.1 (default 8002)")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the models to load (default 300)",
    )


def example(http: int, pipeline: str) -> str:
    """One shell line asking the pipeline about cat.png over HTTP with tritonclient."""
    return (
        'python -c "import numpy as np, tritonclient.http as t; '
        f"c = t.InferenceServerClient('127.0.0.1:{http}'); "
        "i = [t.InferInput('image', [1, 1], 'BYTES'), t.InferInput('prompt', [1, 1], 'BYTES')]; "
        "i[0].set_data_from_numpy(np.array([[open('cat.png', 'rb').read()]], dtype=object)); "
        "i[1].set_data_from_numpy(np.array([[b'What is in the image?']], dtype=object)); "
        f"print(c.infer('{pipeline}', i).as_numpy('text')[0, 0].decode())\""
    )


def run(args: argparse.Namespace) -> int:
    from star_export.deploy.server import (
        ServerError,
        TritonServer,
        find_tritonserver,
        port_in_use,
        served_models,
    )
    from star_export.errors import MissingComponent, Terminated

    models, pipeline, backend = served_models(args.repo)
    ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    for kind, port in ports.items():
        if not 1 <= port <= 65535:
            raise UsageError(f"--{kind}-port {port}: not a TCP port (1-65535)")
    if len(set(ports.values())) < 3:
        raise UsageError(f"--http-port, --grpc-port and --metrics-port must differ (got {ports})")
    for kind, port in ports.items():
        if port_in_use(port):
            raise UsageError(f"--{kind}-port {port}: 127.0.0.1:{port} is already in use; pick another port")
    if backend not in (None, "python"):
        raise MissingComponent(
            f"--repo {args.repo} uses the {backend} backend; the tritonserver installed here has only the "
            f"Python backend: write the repository with --backend python, or serve it in the NGC Triton "
            f"container on a GPU host (README, Serving with Triton)"
        )
    install = find_tritonserver()
    work = Path(tempfile.mkdtemp(prefix="star_export-serve-"))
    server = None
    try:
        # explicit model control (every model loaded at start): a stop first unloads the pipeline, which
        # finishes its queued and running requests (a bare SIGTERM fails a BLS pipeline's requests)
        explicit = ["--model-control-mode=explicit", "--load-model=*"]
        server = TritonServer(args.repo.resolve(), work, install=install, options=explicit)
        print(f"star_export serve: starting tritonserver on {args.repo}; log: {server.log_path}", flush=True)
        try:
            server.start(ports, timeout=args.ready_timeout)
        except ServerError as e:
            if e.kind == "ports":
                raise UsageError(
                    f"a port of {ports} is already in use; pick others (log: {server.log_path})"
                ) from None
            first = str(e).splitlines()[0]
            print(f"star_export: error: {first} (log: {server.log_path})", file=sys.stderr)
            return 1
        pipe = pipeline or ("pipeline" if "pipeline" in models else None)
        print(
            f"star_export serve: ready in {server.startup_s:.1f} s: HTTP http://127.0.0.1:{ports['http']}  "
            f"gRPC 127.0.0.1:{ports['grpc']}  metrics http://127.0.0.1:{ports['metrics']}/metrics\n"
            f"  models: {', '.join(models)}\n"
            + (f"  try:    {example(ports['http'], pipe)}\n" if pipe else "")
            + f"  log:    {server.log_path}\n  Ctrl-C stops it.",
            flush=True,
        )
        try:
            while server.proc.poll() is None:
                time.sleep(0.5)
        except (KeyboardInterrupt, Terminated) as e:
            code = 130 if isinstance(e, KeyboardInterrupt) else 143
            clean = server.stop(timeout=30, drain=[pipe] if pipe else ())
            status = server.proc.returncode
            print(
                f"star_export serve: stopped (tritonserver exit {status}"
                + ("" if clean else ", killed after 30 s")
                + f"); log: {server.log_path}",
                flush=True,
            )
            return 0 if clean else code
        print(
            f"star_export: error: tritonserver exited by itself ({server.proc.returncode}); "
            f"log: {server.log_path}",
            file=sys.stderr,
        )
        return 1
    finally:
        if server is not None:
            server.stop(timeout=30)
        for part in ("tritonserver", "stub-venv"):  # the copies; the log stays
            shutil.rmtree(work / part, ignore_errors=True)
