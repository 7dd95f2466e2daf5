"""Serving under load (issue 22, items 4-6): weights held once by onnxruntime sessions, the load
generator's figures, ``bench serve`` end to end, and faults against a real tritonserver (model
unload / reload under load, draining, SIGTERM, a short soak).

The server tests share one tritonserver (model-control explicit mode, one pipeline instance) on the
``--keep 8,16,32`` export the other Triton tests use; every answer is compared token for token with
``load_export(dir).generate``. The stop test ends that server, so it runs last among them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from star_export.bench.load import Outcome, Request, run_requests, soak, summarise
from star_export.bench.procs import tree_rss

pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] is not installed")

PROMPT = "What is in the image?"
MAX_NEW = 6
MIB = 1 << 20


# ------------------------------------------------------------------------- weights once in memory
SESSIONS = r"""
import sys
from pathlib import Path
import numpy as np, onnxruntime as ort
from star_export.weights import SharedWeights

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

directory, share = Path(sys.argv[1]), sys.argv[2] == "1"
weights = SharedWeights(directory) if share else None
sessions, after = [], []
for g in range(3):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    path = directory / f"g{g}.onnx"
    if weights is not None:
        weights.options(path, opts)
    sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
    sessions[-1].run(None, {"x": np.ones((2, 512), np.float32)})
    after.append(rss())
print(after[2] - after[0])
"""


@pytest.fixture(scope="module")
def three_graphs(tmp_path_factory) -> tuple[Path, int]:
    """Three graphs over the same 8 MiB of MatMul weights (each graph names them its own way), stored
    once by ``star_export.weights.share_weights`` as an export stores its levels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from star_export.weights import share_weights

    directory = tmp_path_factory.mktemp("three-graphs")
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((512, 512), dtype=np.float32) for _ in range(8)]
    paths = []
    for g in range(3):
        nodes, x = [], "x"
        for i in range(len(weights)):
            nodes.append(helper.make_node("MatMul", [x, f"g{g}.w{i}"], [f"h{i}"]))
            x = f"h{i}"
        graph = helper.make_graph(
            nodes,
            f"g{g}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 512])],
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", 512])],
            [numpy_helper.from_array(w, f"g{g}.w{i}") for i, w in enumerate(weights)],
        )
        path = directory / f"g{g}.onnx"
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        onnx.save(model, str(path), save_as_external_data=True, location=f"g{g}.data", size_threshold=0)
        paths.append(path)
    shared = share_weights(paths)
    assert shared.tensors == 8 and shared.references == 24
    return directory, sum(w.nbytes for w in weights)


def _rss_growth(directory: Path, share: bool) -> int:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", SESSIONS, str(directory), "1" if share else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip())


def test_three_sessions_hold_the_weights_once(three_graphs):
    """RSS after the third session minus after the first (each has run once): about nothing with the
    weights shared, two more copies without (the check discriminates: it fails with sharing off)."""
    directory, weight_bytes = three_graphs
    shared = _rss_growth(directory, share=True)
    separate = _rss_growth(directory, share=False)
    assert shared < 0.15 * weight_bytes, (shared / MIB, weight_bytes / MIB)
    assert separate > 1.5 * weight_bytes, (separate / MIB, weight_bytes / MIB)  # sharing disabled


@pytest.fixture(scope="module")
def levels_export(cli_export) -> Path:
    """``llava --keep 8,16,32`` (shared with test_triton.py: same name and arguments)."""
    return cli_export("llava-levels", "--keep", "8,16,32")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def expected(levels_export, image_file) -> dict[int, list[int]]:
    """``load_export(dir).generate`` at every level (unshared sessions): the reference answers."""
    from star_export.session import load_export

    pipe = load_export(levels_export, share_weights=False)
    return {
        k: pipe.generate([image_file], [PROMPT], max_new_tokens=MAX_NEW, keep=k).result.tokens[0]
        for k in (8, 16, 32)
    }


def test_load_export_shares_one_mapping_and_answers_the_same(levels_export, image_file, expected):
    from star_export.session import load_export

    pipe = load_export(levels_export)
    for k in (8, 16, 32):
        assert (
            pipe.generate([image_file], [PROMPT], max_new_tokens=MAX_NEW, keep=k).result.tokens[0]
            == expected[k]
        )
    weights = pipe.backend(8).weights
    assert all(pipe.backend(k).weights is weights for k in (16, 32))  # one pool for every level
    data = levels_export / "weights.onnx.data"
    assert weights.bytes == data.stat().st_size  # the data file mapped once
    (mapping,) = weights._maps.values()
    lo = mapping.ctypes.data
    pointers = [v.data_ptr() for v in weights.values.values()]
    assert pointers and all(lo <= p < lo + mapping.nbytes for p in pointers)  # every value inside it


# ------------------------------------------------------------------------------ load generator
def _outcome(start, end, tokens=3, arrivals=None, error=None, status=None):
    return Outcome(None, start, end, list(range(tokens)), arrivals or [], error, status)


def test_decode_step_times_per_batch_pre_packed_and_shared(levels_export):
    """``weights_memory --decode-batches``: one decode step per batch size in both sessions (the one
    over the shared mapping with pre-packing off, and one with its own pre-packed copy); the step's
    feeds follow the manifest's decode inputs, so one the graph refuses fails here."""
    from star_export.bench.weights_memory import decode_step_ms

    steps = decode_step_ms(levels_export, [1, 2], steps=2, past=(20, 12))
    assert set(steps) == {"pre-packed (own copy)", "shared mapping (pre-packing off)"}
    for row in steps.values():
        assert set(row) == {"1", "2"} and all(ms > 0 for ms in row.values())


def test_summary_figures_from_known_times():
    done = [_outcome(0.0, 1.0), _outcome(0.5, 2.5), _outcome(1.0, 2.0)]
    rejected = _outcome(
        1.0,
        1.1,
        0,
        error="[StatusCode.UNAVAILABLE] Exceeds maximum queue size",
        status="StatusCode.UNAVAILABLE",
    )
    failed = _outcome(
        1.0, 1.2, 0, error="prefill_k8: Model prefill_k8 is not ready", status="StatusCode.INTERNAL"
    )
    probe = [_outcome(0.0, 0.4, 1), _outcome(0.0, 0.6, 1)]
    s = summarise([*done, rejected, failed], stream=False, ttft_probe=probe)
    assert (s["requests"], s["ok"], s["rejected"], s["failed"]) == (5, 3, 1, 1)
    assert s["wall_s"] == pytest.approx(2.5) and s["requests_per_s"] == pytest.approx(3 / 2.5)
    assert s["output_tokens_per_s"] == pytest.approx(9 / 2.5)
    assert s["e2e_p50_s"] == pytest.approx(1.0) and s["e2e_p90_s"] == pytest.approx(1.8)
    assert s["ttft_p50_s"] == pytest.approx(0.5) and "1-token" in s["ttft_kind"]
    assert s["tpot_p50_s"] == pytest.approx((1.0 - 0.5) / 2)  # (e2e - TTFT) / (tokens - 1), median
    streamed = [_outcome(0.0, 1.0, 3, [0.2, 0.6, 1.0]), _outcome(0.0, 2.0, 3, [0.4, 1.0, 2.0])]
    s = summarise(streamed, stream=True)
    assert s["ttft_p50_s"] == pytest.approx(0.3) and s["itl_p50_s"] == pytest.approx(0.5)
    assert s["tpot_p50_s"] == pytest.approx((0.4 + 0.8) / 2)
    assert not failed.rejected and rejected.rejected  # an INTERNAL error is a failure, not a rejection


# -------------------------------------------------------------------------- a real tritonserver
@pytest.fixture(scope="module")
def server(levels_export, tmp_path_factory):
    """tritonserver in model-control explicit mode (every model loaded), one pipeline instance."""
    from star_export import deploy
    from star_export.deploy import server as triton_server
    from star_export.errors import MissingComponent

    try:
        install = triton_server.find_tritonserver()
        triton_server.stub_site()
    except MissingComponent as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (required in CI)")
        pytest.skip(str(e))
    work = tmp_path_factory.mktemp("load-server")
    repo = work / "model_repository"
    deploy.write_repository(levels_export, repo, "python", MAX_NEW, pipeline_instances=1, intra_op_threads=1)
    srv = triton_server.TritonServer(
        repo,
        work,
        triton_server.stub_bin(work),
        install,
        options=["--model-control-mode=explicit", "--load-model=*"],
        exit_timeout=20,
    )
    try:
        srv.start({k: triton_server.free_port() for k in ("http", "grpc", "metrics")})
    except triton_server.ServerError as e:
        pytest.skip(str(e)) if e.kind == "libraries" else pytest.fail(str(e))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def requests(image_file) -> list[Request]:
    return [Request(image_file.read_bytes(), PROMPT, MAX_NEW, 8) for _ in range(24)]


def _client(server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports['grpc']}")


def judge(outcomes: list[Outcome], expected: list[int]) -> dict[str, list[Outcome]]:
    """Each outcome: an exact answer, an error, or WRONG (an answer that differs from the reference)."""
    out: dict[str, list[Outcome]] = {"exact": [], "error": [], "wrong": []}
    for o in outcomes:
        out["error" if not o.ok else "exact" if o.tokens == expected else "wrong"].append(o)
    return out


def _under_load(server, requests, fault, concurrency=8) -> tuple[list[Outcome], float]:
    """Run ``requests`` from a thread; once the first answer is back, call ``fault()``; return the
    outcomes and when the fault began."""
    result: dict[str, list[Outcome]] = {}
    thread = threading.Thread(
        target=lambda: result.update(o=run_requests(server.ports["grpc"], requests, concurrency, timeout=60))
    )
    thread.start()
    time.sleep(0.3)  # the first requests are queued or running
    began = time.perf_counter()
    fault()
    thread.join(120)
    assert not thread.is_alive(), "the load did not end"
    return result["o"], began


def test_judge_flags_a_wrong_answer(expected):
    good = _outcome(0, 1)
    good.tokens = list(expected[8])
    bad = _outcome(0, 1)
    bad.tokens = [*expected[8][:-1], expected[8][-1] + 1]
    verdict = judge([good, bad, _outcome(0, 1, error="x")], expected[8])
    assert [len(verdict[k]) for k in ("exact", "error", "wrong")] == [1, 1, 1]


def test_unloading_a_prefill_model_under_load_fails_cleanly_then_reload_serves(server, requests, expected):
    client = _client(server)
    try:
        outcomes, _ = _under_load(server, requests, lambda: client.unload_model("prefill_k8"))
        verdict = judge(outcomes, expected[8])
        assert not verdict["wrong"]
        assert verdict["error"], "no request met the unloaded model: the fault was not under load"
        assert all("prefill_k8" in o.error and "not ready" in o.error for o in verdict["error"])
        client.load_model("prefill_k8")
        keeps = (8, 16, 32, 8)  # every level, through graph models that map the shared weights file
        after = run_requests(
            server.ports["grpc"],
            [Request(requests[0].image, PROMPT, MAX_NEW, k) for k in keeps],
            2,
            timeout=60,
        )
        assert [o.tokens for o in after] == [expected[k] for k in keeps]
    finally:
        client.close()


def test_soak_reports_the_servers_rss(server, requests):
    seen = []
    result = soak(
        server.ports["grpc"],
        server.proc.pid,
        requests[:12],
        concurrency=4,
        warmup=4,
        chunk=5,
        progress=lambda sent, total: seen.append((sent, total)),
    )
    assert (result.ok, result.failed) == (16, 0)
    assert result.rss_after_warmup > 50 * MIB and result.rss_end > 50 * MIB
    assert result.growth == pytest.approx(result.rss_end / result.rss_after_warmup - 1)
    assert [sent for sent, _ in result.trace] == [5, 10, 12] and seen == [(5, 12), (10, 12), (12, 12)]
    assert result.rss_end == result.trace[-1][1]
    peak = max(rss for _, rss in result.trace)
    assert result.peak_growth == pytest.approx(peak / result.rss_after_warmup - 1)
    assert result.peak_growth >= result.growth
    assert result.to_dict()["growth"] == result.growth
    assert tree_rss(server.proc.pid)["processes"] >= 5  # the server and a stub per model
    bad = [Request(r.image, r.prompt, r.max_new_tokens, 12) for r in requests[:3]]  # keep 12: not held
    assert soak(server.ports["grpc"], server.proc.pid, bad, concurrency=2, warmup=0).failed == 3


def test_the_stream_client_ends_on_tritons_final_flag(server, requests, expected):
    """The streaming path of the load generator (``stream=True``: tritonclient.grpc's stream with the
    empty-final-response flag), here on the non-decoupled pipeline: one response, flagged final."""
    outcomes = run_requests(server.ports["grpc"], requests[:2], 2, stream=True, timeout=60)
    assert [o.tokens for o in outcomes] == [expected[8]] * 2
    assert all(len(o.arrivals) == MAX_NEW and o.end == o.arrivals[-1] for o in outcomes)


def test_bench_serve_sweeps_and_writes_table_json_and_plot(server, levels_export, tmp_path, capsys):
    """``bench serve`` on the module's running server (``--grpc-port``; without it the command starts
    its own on the export, the same code as the fixture)."""
    from star_export.cli import main

    out = tmp_path / "results"
    args = ["bench", "serve", "--export", str(levels_export), "--keep", "8,32", "--concurrency", "1,2"]
    args += [
        "--requests",
        "2",
        "--max-new-tokens",
        "2",
        "--grpc-port",
        str(server.ports["grpc"]),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    doc = json.loads((out / "serve.json").read_text())
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = {(p["level"], p["concurrency"]): p for p in doc["points"]}
    assert set(points) == {(lv, c) for lv in ("8", "32", "mix 8+32") for c in (1, 2)}
    for p in points.values():
        assert (p["requests"], p["ok"], p["rejected"], p["failed"]) == (2, 2, 0, 0)
        assert p["output_tokens"] == 2 * 2  # random weights: no EOS within 2 tokens
        assert p["e2e_p50_s"] <= p["e2e_p90_s"] <= p["e2e_p99_s"]
        assert p["requests_per_s"] == pytest.approx(2 / p["wall_s"])
        assert p["ttft_kind"] == "first streamed token"  # the repository has pipeline_stream: real TTFT
        assert p["ttft_p50_s"] > 0
        assert p["server_rss_bytes"] is None  # a server this command did not start: its RSS is not ours
    assert doc["model"]["keeps"] == [8, 16, 32] and doc["model"]["n_visual"]
    assert doc["machine"]["logical_cpus"]
    table = capsys.readouterr().out
    assert "TTFT: first streamed token" in table and "mix 8+32" in table


def test_stop_drains_in_flight_requests_then_exits(server, requests, expected):
    """Last: ends the module's server. ``stop(drain=["pipeline"])`` under load (what ``serve`` does on
    Ctrl-C / SIGTERM): the pipeline is unloaded first, so its queued and running requests are answered
    exactly and later ones refused at the door (NOT_FOUND, never failed half-way), then SIGTERM; the
    server exits with code 0 within its exit timeout. (A bare SIGTERM does not drain a BLS pipeline:
    Triton refuses every new inference at once, the pipeline's calls to prefill and decode included.)"""
    stopped: dict[str, bool] = {}
    outcomes, began = _under_load(
        server, requests, lambda: stopped.update(clean=server.stop(60, drain=["pipeline"]))
    )
    verdict = judge(outcomes, expected[8])
    assert stopped["clean"] and server.proc.returncode == 0
    assert time.perf_counter() - began < 2 * server.exit_timeout + 15
    assert not verdict["wrong"]
    assert any(o.end > began for o in verdict["exact"]), "nothing was in flight when the stop began"
    assert all(o.status == "StatusCode.NOT_FOUND" for o in verdict["error"]), {
        o.error for o in verdict["error"]
    }


def test_scaling_is_top_concurrency_over_one_per_level_and_batching_mode():
    from star_export.bench.serve import scaling

    def pt(level, batching, c, rps):
        return {"level": level, "batching": batching, "concurrency": c, "requests_per_s": rps}

    points = [
        pt("64", "on", 1, 2.0),
        pt("64", "on", 8, 3.5),
        pt("64", "off", 1, 2.0),
        pt("64", "off", 8, 1.8),
    ]
    points += [pt("576", "on", 1, 1.0), pt("576", None, 2, 1.0)]  # a series with no concurrency 1: left out
    assert scaling(points) == {
        "64 batching on": {"concurrency": 8, "ratio": 1.75},
        "64 batching off": {"concurrency": 8, "ratio": 0.9},
    }
    with pytest.raises(SystemExit):  # argparse refuses a mode it does not know
        from star_export.cli import main

        main(["bench", "serve", "--batching", "sometimes"])


BATCHING_REFUSED = ["bench", "serve", "--grpc-port", "1", "--batching", "on,off"]


def test_bench_serve_usage_errors_are_one_line(levels_export, tmp_path, capsys):
    from star_export.cli import main

    assert main(["bench", "serve", "--out", str(tmp_path)]) == 2
    assert (
        main(["bench", "serve", "--export", str(levels_export), "--keep", "12", "--out", str(tmp_path)]) == 2
    )
    assert main([*BATCHING_REFUSED, "--export", str(levels_export), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "star_export: error: bench serve: give --export DIR (an export) or --repo DIR (a python-backend repository)",
        "star_export: error: --keep 12: this export holds keep levels 8,16,32",
        "star_export: error: --batching: only with --export (the repository is written for each mode); a given "
        "repository or running server keeps its own setting",
    ]
    assert not list(tmp_path.iterdir())
