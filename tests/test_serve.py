"""``python -m star_export serve``: a real tritonserver started by the one documented command on a
``triton --backend python`` repository, answering like ``load_export(...).generate`` token for token,
stopped by Ctrl-C (exit 0, port freed); and its one-line errors (exit 2 / 3)."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from star_export import deploy
from star_export.cli import main
from star_export.deploy import server as triton_server
from star_export.errors import MissingComponent

ROOT = Path(__file__).resolve().parents[1]
KEEP, MAX_NEW = 16, 6  # the export test_triton.py shares (cli_export name and arguments)
PROMPT = "What is in the image?"


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_serve_answers_like_load_export_and_stops_on_ctrl_c(cli_export, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    try:
        triton_server.find_tritonserver()
        triton_server.stub_site()
    except MissingComponent as e:
        unavailable(str(e))
    from star_export.session import load_export

    export = cli_export(f"llava-keep{KEEP}", "--keep", str(KEEP))
    repo = tmp_path / "model_repository"
    deploy.write_repository(
        export, repo, "python", MAX_NEW, pipeline_instances=1, intra_op_threads=1, stream=False
    )
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(image)
    ports = {}
    for kind in ("http", "grpc", "metrics"):  # three distinct free ports
        while (port := triton_server.free_port()) in ports.values():
            pass
        ports[kind] = port
    flags = [f"--{k}-port={v}" for k, v in ports.items()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["TMPDIR"] = str(tmp_path)  # the server's work directory and log land under the test's own
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "star_export", "serve", "--repo", str(repo), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    out: list[str] = []
    try:
        while not any(line.startswith("star_export serve: ready") for line in out):
            line = lines.get(timeout=max(1.0, 300 - (time.perf_counter() - started)))
            assert line is not None, "".join(out)
            out.append(line)
        ready_s = time.perf_counter() - started
        for _ in range(4):  # models, try, log, Ctrl-C
            out.append(lines.get(timeout=10))
        text = "".join(out)
        assert f"HTTP http://127.0.0.1:{ports['http']}" in text and f"gRPC 127.0.0.1:{ports['grpc']}" in text
        assert "models: decode, pipeline, prefill" in text
        log = Path(next(line for line in out if line.strip().startswith("log:")).split("log:")[1].strip())
        assert log.is_file() and log.name == "tritonserver.log" and log.parent.parent == tmp_path

        expected = load_export(export).generate([image], [PROMPT], max_new_tokens=MAX_NEW)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}")
        try:
            inputs = []
            for name, value in (("image", image.read_bytes()), ("prompt", PROMPT.encode())):
                tensor = httpclient.InferInput(name, [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
                inputs.append(tensor)
            result = client.infer("pipeline", inputs)
        finally:
            client.close()
        tokens = [[int(t) for t in row if t >= 0] for row in result.as_numpy("token_ids")]
        assert tokens == expected.result.tokens
        assert len(tokens[0]) == MAX_NEW
        assert result.as_numpy("text")[0, 0].decode() == expected.answers[0]

        # the printed one-line example works as printed (cat.png in the working directory)
        example = next(line for line in out if line.strip().startswith("try:")).split("try:", 1)[1].strip()
        asked = subprocess.run(
            shlex.split(example), capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        assert asked.returncode == 0, asked.stderr[-2000:]
        assert asked.stdout.rstrip("\n") == expected.answers[0]

        stop = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:  # drain (unload the pipeline) + SIGTERM + the exit timeout
            code = proc.wait(150)
        except (
            subprocess.TimeoutExpired
        ):  # say what serve and tritonserver were doing (a run in CI hung here)
            said = []
            while not lines.empty():
                said.append(lines.get_nowait() or "")
            tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
            pytest.fail(
                f"serve still running 150 s after Ctrl-C; it printed {''.join(said)!r}; "
                "tritonserver.log ends:\n" + "\n".join(tail)
            )
        assert code == 0
        stop_s = time.perf_counter() - stop
        rest = []
        while (line := lines.get(timeout=10)) is not None:
            rest.append(line)
        assert any(line.startswith("star_export serve: stopped (tritonserver exit 0") for line in rest), rest
        assert not any(listening(p) for p in ports.values())
        assert not (log.parent / "tritonserver").exists() and log.is_file()  # the copies go, the log stays
        print(f"serve: ready in {ready_s:.1f} s, stopped in {stop_s:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_serve_errors_are_one_line(tmp_path, capsys, monkeypatch):
    def error(*argv: str) -> tuple[int, str]:
        code = main(["serve", *argv])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("star_export: error: "), err
        return code, err

    code, err = error("--repo", str(tmp_path / "nope"))
    assert code == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    code, err = error("--repo", str(tmp_path / "empty"))
    assert code == 2 and "not a Triton model repository" in err

    repo = tmp_path / "repo"
    (repo / "pipeline").mkdir(parents=True)
    (repo / "pipeline" / "config.pbtxt").write_text('backend: "python"\n')
    code, err = error("--repo", str(repo), "--http-port", "8000", "--grpc-port", "8000")
    assert code == 2 and "must differ" in err
    code, err = error("--repo", str(repo), "--http-port", "70000")
    assert code == 2 and "not a TCP port" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = error("--repo", str(repo), "--grpc-port", str(port))
    assert code == 2 and f"--grpc-port {port}" in err and "already in use" in err

    numbers = {triton_server.free_port() for _ in range(6)}
    if len(numbers) < 3:
        pytest.skip("free_port gave the same port again and again")
    free = [f"--{k}-port={p}" for k, p in zip(("http", "grpc", "metrics"), sorted(numbers)[:3], strict=True)]
    (repo / deploy.MARKER).write_text(json.dumps({"backend": "tensorrt", "models": {}}))
    code, err = error("--repo", str(repo), *free)
    assert code == 3 and "NGC" in err and "--backend python" in err
    (repo / deploy.MARKER).unlink()

    real = triton_server.importlib.util.find_spec
    monkeypatch.setattr(
        triton_server.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pytriton" else real(name, *a),
    )
    code, err = error("--repo", str(repo), *free)
    assert code == 3 and "bash tools/install_triton_server.sh" in err
