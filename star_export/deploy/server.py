"""A real ``tritonserver`` on this kind of machine: the binary inside the ``nvidia-pytriton`` wheel
(Triton 2.51, Python backend only, CPU), set up as it needs to run (measured pitfalls in
``/work/shared/FIELD_NOTES.md``, "A real Triton server on this CPU machine"):

* ``bin``, ``backends`` and ``caches`` are copied out of the wheel into a work directory, with the
  Python-backend stub built for the running Python placed in ``backends/python/``;
* the stub finds its packages through ``python3`` on ``PATH``: a throw-away venv whose path puts a
  numpy<2 directory first (the stub mis-reads tensors under numpy 2; ``tools/install_triton_server.sh``
  installs it in ``<sys.prefix>/triton-stub-site``, or ``STAR_EXPORT_TRITON_STUB_SITE``), then this
  venv's site-packages;
* ``LD_LIBRARY_PATH``: the running Python's ``LIBDIR`` first (else the stub may load the system's
  libpython), then the wheel's ``nvidia_pytriton.libs``;
* loopback addresses only, ``--exit-on-error=false`` (a model that fails to load is reported, the
  server is stopped by us), a bounded exit timeout.

Used by ``python -m star_export serve`` (:mod:`star_export.commands.serve`) and by the tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from star_export.errors import MissingComponent

INSTALL = "bash tools/install_triton_server.sh"
LOG_NOISE = ("CUDA", "NVML", "DCGM", "GPU metrics")  # harmless lines on a CPU machine


class ServerError(RuntimeError):
    """tritonserver did not come up. ``kind``: ``ports`` (an address in use), ``libraries`` (the binary
    cannot start at all here), ``models`` (a model failed to load), ``exited`` or ``timeout``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel's server lives: ``tritonserver/`` (bin, backends, caches), the stub, the libs."""

    wheel: Path
    stub: Path
    libs: Path


def find_tritonserver() -> TritonInstall:
    """The wheel's tritonserver and the backend stub for the running Python, or MissingComponent."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingComponent(f"tritonserver is not installed (nvidia-pytriton): run {INSTALL}")
    package = Path(next(iter(spec.submodule_search_locations)))
    wheel = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not (wheel / "bin" / "tritonserver").is_file() or not stub.is_file():
        raise MissingComponent(
            f"{wheel}: no tritonserver binary or Python {version} backend stub in the wheel: run {INSTALL}"
        )
    return TritonInstall(wheel=wheel, stub=stub, libs=package.parent / "nvidia_pytriton.libs")


def stub_site() -> Path | None:
    """The numpy<2 directory the stub needs (None when this venv's numpy is already < 2)."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    numpy1 = Path(os.environ.get("STAR_EXPORT_TRITON_STUB_SITE", Path(sys.prefix) / "triton-stub-site"))
    if not (numpy1 / "numpy").is_dir():
        raise MissingComponent(
            f"the Triton Python backend stub needs numpy<2 and {numpy1} has none: run {INSTALL} "
            f'(or pip install --target {numpy1} "numpy>=1.26,<2")'
        )
    return numpy1


def stub_bin(work: Path) -> Path:
    """The bin/ whose ``python3`` the Python backend stub uses: numpy < 2 first, then this venv."""
    numpy1 = stub_site()
    if numpy1 is None:
        return Path(sys.executable).parent
    env = work / "stub-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--clear", str(env)], check=True, timeout=120
    )
    python = env / "bin" / "python3"
    purelib = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    lines = [str(numpy1), *site.getsitepackages()]
    Path(purelib, "star_export_triton_stub.pth").write_text("\n".join(lines) + "\n")
    probe = subprocess.run(
        [str(python), "-c", "import numpy, onnxruntime, transformers, PIL; print(numpy.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0 or not probe.stdout.startswith("1."):
        last = (probe.stderr.strip().splitlines() or ["numpy " + probe.stdout.strip()])[-1]
        raise MissingComponent(
            f"the Triton backend stub's Python cannot import its packages ({last}): run {INSTALL}"
        )
    return env / "bin"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before the server binds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """tritonserver from the nvidia-pytriton wheel on ``repo``, loopback only, in its own process group
    (Ctrl-C in a terminal reaches us, not it: :meth:`stop` ends it). Its log goes to ``log_path``.
    ``options``: more tritonserver flags (e.g. ``--model-control-mode=explicit``); ``exit_timeout``:
    seconds a stop waits for in-flight requests (``--exit-timeout-secs``)."""

    def __init__(
        self,
        repo: Path,
        work: Path,
        stub: Path | None = None,
        install: TritonInstall | None = None,
        *,
        options: Sequence[str] = (),
        exit_timeout: int = 10,
    ):
        install = install or find_tritonserver()
        self.work = Path(work)
        self.root = self.work / "tritonserver"
        for part in ("bin", "backends", "caches"):
            shutil.copytree(install.wheel / part, self.root / part, dirs_exist_ok=True)
        shutil.copy2(install.stub, self.root / "backends" / "python" / install.stub.name)
        stub = stub if stub is not None else stub_bin(self.work)
        self.env = dict(os.environ)
        # The running Python's libpython first (else the stub may pick the system's), then the wheel's libs.
        self.env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p
            for p in (
                sysconfig.get_config_var("LIBDIR"),
                str(install.libs),
                os.environ.get("LD_LIBRARY_PATH"),
            )
            if p
        )
        self.env["PATH"] = os.pathsep.join([str(stub), os.environ.get("PATH", "")])
        self.repo, self.log_path = Path(repo), self.work / "tritonserver.log"
        self.options, self.exit_timeout = list(options), int(exit_timeout)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.startup_s = 0.0

    def command(self) -> list[str]:
        return [
            str(self.root / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={self.root / 'backends'}",
            f"--cache-directory={self.root / 'caches'}",
            *(f"--{k}-address=127.0.0.1" for k in ("http", "grpc", "metrics")),
            *(f"--{k}-port={v}" for k, v in self.ports.items()),
            "--allow-gpu-metrics=false",
            "--exit-on-error=false",
            # bounded shutdown even with a client connection left open
            f"--exit-timeout-secs={self.exit_timeout}",
            "--log-verbose=0",
            *self.options,
        ]

    def start(self, ports: dict[str, int], timeout: float = 150.0) -> None:
        """Start on ``ports`` ({"http", "grpc", "metrics"}) and wait until ready (ServerError if not;
        the server is stopped then)."""
        self.ports = dict(ports)
        started = time.perf_counter()
        with self.log_path.open("w") as log:
            try:
                self.proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
                )
            except OSError as e:
                raise ServerError("libraries", f"tritonserver cannot start at all here: {e}") from None
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                break
            if self.ready():
                self.startup_s = time.perf_counter() - started
                return
            failed = self.failed_models()
            if failed:
                self.stop()
                raise ServerError("models", f"tritonserver could not load {failed}:\n{self.log_tail()}")
            time.sleep(0.25)
        exited = self.proc.poll() is not None
        log_text = self.log_tail()
        self.stop()
        if "address already in use" in log_text.lower():
            raise ServerError("ports", f"an address is already in use (ports {self.ports}):\n{log_text}")
        if "Started HTTPService" not in log_text and "error while loading shared libraries" in log_text:
            last = log_text.strip().splitlines()[-1]
            raise ServerError("libraries", f"tritonserver cannot start at all here: {last}")
        if exited:
            raise ServerError("exited", f"tritonserver exited with {self.proc.returncode}:\n{log_text}")
        raise ServerError("timeout", f"tritonserver was not ready within {timeout:.0f}s:\n{log_text}")

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['http']}{path}"

    def ready(self) -> bool:
        """Triton's readiness endpoint (``/v2/health/ready``) answers 200."""
        try:
            with urllib.request.urlopen(self._url("/v2/health/ready"), timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def failed_models(self) -> dict[str, str]:
        """{model: reason} of models that failed to load (the server keeps running: --exit-on-error=false)."""
        try:
            request = urllib.request.Request(self._url("/v2/repository/index"), data=b"{}", method="POST")
            with urllib.request.urlopen(request, timeout=1) as r:
                index = json.loads(r.read())
        except (OSError, ValueError):
            return {}
        return {m["name"]: m.get("reason", "") for m in index if m.get("state") == "UNAVAILABLE"}

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        kept = [line for line in lines if not any(w in line for w in LOG_NOISE)]
        return "\n".join(kept[-n:])[-8000:]

    def drain(self, models: Sequence[str], timeout: float | None = None) -> bool:
        """Unload ``models`` (the pipeline) and wait until they are gone: Triton finishes their queued and
        in-flight requests (the pipeline's BLS calls still run) and answers new ones NOT_FOUND. Needs
        ``--model-control-mode=explicit``. A SIGTERM alone does not drain a BLS pipeline: the server
        refuses every new inference at once, the pipeline's calls to its prefill and decode models
        included, so the requests in flight fail ("Server not ready"). True once every model is
        unloaded within ``timeout`` (default the exit timeout)."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.ports['http']}")
        try:
            for model in models:
                client.unload_model(model)
            deadline = time.perf_counter() + (self.exit_timeout if timeout is None else timeout)
            while time.perf_counter() < deadline:
                states = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
                if all(states.get(m) not in ("READY", "UNLOADING") for m in models):
                    return True
                time.sleep(0.1)
            return False
        finally:
            client.close()

    def stop(self, timeout: float = 30.0, drain: Sequence[str] = ()) -> bool:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the process group. True if it stopped by itself.
        ``drain``: models to :meth:`drain` first (the pipeline; explicit model-control mode only)."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        if drain and "--model-control-mode=explicit" in self.options:
            try:
                self.drain(drain)
            except Exception:  # the server went away meanwhile: stop it anyway
                pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
            self.proc.wait(10)
            return False


def served_models(repo: Path) -> tuple[list[str], str | None, str | None]:
    """(models, pipeline model, backend) of a Triton repository; UsageError (one line) if ``repo`` is
    missing or holds no model (no ``*/config.pbtxt``)."""
    from star_export.deploy.files import MARKER
    from star_export.errors import UsageError

    repo = Path(repo)
    if not repo.is_dir():
        raise UsageError(
            f"--repo {repo}: no such directory (write one with `python -m star_export triton "
            f"--from EXPORT --repo {repo}`)"
        )
    configs = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    if not configs:
        raise UsageError(
            f"--repo {repo}: not a Triton model repository (no */config.pbtxt; write one with "
            f"`python -m star_export triton --from EXPORT --repo {repo}`)"
        )
    try:
        marker = json.loads((repo / MARKER).read_text())
    except (OSError, ValueError):
        return configs, None, None
    models = marker.get("models", {})
    return configs, models.get("pipeline"), marker.get("backend")


def port_in_use(port: int) -> bool:
    """Something already listens on 127.0.0.1:``port`` (SO_REUSEADDR, as the server binds: connections
    left in TIME_WAIT by a previous server do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
