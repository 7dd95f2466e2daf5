"""The Triton pipeline under load (issue 22, items 1-3 and 8), on ONE real tritonserver per module.

The ``--backend python`` repository of the three-level export (``--keep 8,16,32``, shared with
test_triton.py) served with one pipeline instance, a long batching delay (so requests fired together
land in one ``execute``) and a small queue:

* batching: concurrent requests at two keep levels, different prompts, lengths and
  ``max_new_tokens``, run as one prefill per level (the server's statistics) and each answer equals
  ``load_export(dir).generate`` of that request alone, token for token;
* streaming: ``pipeline_stream`` (decoupled) over gRPC streaming: the streamed tokens and text,
  concatenated, equal the non-streamed answer;
* overload: beyond ``max_queue_size`` requests are rejected (UNAVAILABLE), a request queued past
  its timeout is rejected, the answered ones are right;
* a battery of malformed requests, each answered INVALID_ARGUMENT with a message naming the
  problem, then a good request is answered;
* the thread budget and queue settings written in the configs (Triton's own protobuf schema).
"""

from __future__ import annotations

import json
import queue
import sys
import time
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from test_triton import (  # the shared helpers and fixtures of the one-request tests
    LEVEL_KEEPS,
    PROMPTS,
    answer,
    grpc_client,
    images,  # noqa: F401  (a fixture)
    levels_export,  # noqa: F401  (a fixture)
    parse_config,
    pipeline_inputs,
    serving,
)

from star_export import deploy
from star_export.errors import UsageError

DELAY_US = 300_000  # requests fired together wait for one another (one execute)
QUEUE = 12  # >= the profile's max batch (8) + 2: the split test queues that many


@pytest.fixture(scope="module")
def server(levels_export, tmp_path_factory):  # noqa: F811
    settings = {"batch_delay_us": DELAY_US, "max_queue": QUEUE, "queue_timeout_s": 30, "stream": True}
    with serving(levels_export, tmp_path_factory, "triton-batching", pipeline_instances=1, **settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(levels_export):  # noqa: F811
    """``load_export(dir).generate`` of one request alone (the one-request path)."""
    from star_export.session import load_export

    pipe = load_export(levels_export)
    cache: dict = {}

    def run(rows: list[Path], prompts: list[str], max_new: int, keep: int) -> list[list[int]]:
        key = (tuple(rows), tuple(prompts), max_new, keep)
        if key not in cache:
            cache[key] = pipe.generate(rows, prompts, max_new_tokens=max_new, keep=keep)
        return cache[key]

    return run


@pytest.fixture
def grpc(server):
    module, client = grpc_client(server)
    yield module, client
    client.close()


def stats(client, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of ``model`` from the server's statistics."""
    s = client.get_inference_statistics(model).model_stats[0]
    return int(s.inference_count), int(s.execution_count)


def settled_stats(client, before: dict, model: str, rows: int, timeout: float = 15.0) -> dict:
    """The statistics of ``before``'s models once the server has counted ``rows`` more inferences of
    ``model``
    and the counts stopped moving. Triton updates a model's statistics after its ``execute`` returns,
    which can be after the client already holds the response (CI read a pipeline at (1, 0) of the
    (7, 1) it then reached); this waits for the books to close instead of racing them. On timeout it
    returns the last reading, so the caller's assertion shows the figures."""
    deadline = time.monotonic() + timeout
    last = {m: stats(client, m) for m in before}
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = {m: stats(client, m) for m in before}
        if now == last and now[model][0] - before[model][0] >= rows:
            return now
        last = now
    return last


def fire(module, client, cases: list, model: str = "pipeline", **infer) -> list:
    """Every case (pipeline_inputs' arguments, or a list of InferInput) sent at once (async gRPC);
    their results (or InferenceServerException), in order."""
    done: queue.Queue = queue.Queue()
    for i, case in enumerate(cases):
        inputs = pipeline_inputs(module, **case) if isinstance(case, dict) else case
        client.async_infer(
            model, inputs, partial(lambda i, result, error: done.put((i, result, error)), i), **infer
        )
    out: list = [None] * len(cases)
    for _ in cases:
        i, result, error = done.get(timeout=60)
        out[i] = error if error is not None else result
    return out


# ------------------------------------------------------------------------------- 1. batching
def test_concurrent_requests_batch_by_keep_and_equal_each_request_alone(grpc, images, reference):  # noqa: F811
    """Six requests fired together: four at keep 8 (two of one row, one of two rows, with different
    prompts and max_new_tokens), two at keep 16. One execute of the pipeline, one prefill per level,
    and every answer equals that request generated alone."""
    module, client = grpc
    cases = [
        {"images": [images[0]], "prompts": [PROMPTS[0]], "max_new": 2, "keep": 8},
        {"images": [images[1]], "prompts": [PROMPTS[1]], "max_new": 6, "keep": 8},
        {"images": [images[2]], "prompts": [PROMPTS[2]], "max_new": 4, "keep": 16},
        {"images": images[1:3], "prompts": PROMPTS[1:3], "max_new": 3, "keep": 8},
        {"images": [images[2]], "prompts": [PROMPTS[0]], "max_new": 5, "keep": 16},
        {"images": [images[0]], "prompts": [PROMPTS[1]], "max_new": 1, "keep": 8},
    ]
    before = {m: stats(client, m) for m in ("pipeline", "prefill_k8", "prefill_k16", "decode")}
    results = fire(module, client, cases)
    after = settled_stats(client, before, "pipeline", rows=sum(len(c["images"]) for c in cases))
    for case, result in zip(cases, results, strict=True):
        assert not isinstance(result, Exception), result
        tokens, texts = answer(result)
        expected = reference(case["images"], case["prompts"], case["max_new"], case["keep"])
        assert tokens == expected.result.tokens, case
        assert texts == expected.answers
        assert max(len(t) for t in tokens) == case["max_new"]  # no EOS from random weights: each its own end
    delta = {m: (after[m][0] - before[m][0], after[m][1] - before[m][1]) for m in before}
    assert delta["pipeline"] == (7, 1)  # 7 rows in 6 requests, ONE execute
    assert delta["prefill_k8"] == (5, 1) and delta["prefill_k16"] == (2, 1)  # one prefill batch per level
    # one decode loop per level, as long as its longest answer: 6 - 1 steps at keep 8, 5 - 1 at keep 16
    assert delta["decode"][1] == (6 - 1) + (5 - 1)


def test_requests_that_do_not_fit_one_batch_are_split_and_stay_exact(grpc, images, reference):  # noqa: F811
    """More rows than the profile's max batch at once: Triton's batcher hands over at most
    max_batch_size rows per execute; every answer is still its own."""
    module, client = grpc
    max_batch = client.get_model_config("pipeline").config.max_batch_size
    rows = max_batch + 2
    cases = [
        {"images": [images[i % 3]], "prompts": [PROMPTS[(i + 1) % 3]], "max_new": 1 + i % 3, "keep": 32}
        for i in range(rows)
    ]
    assert rows <= QUEUE
    before = {"prefill_k32": stats(client, "prefill_k32")}
    results = fire(module, client, cases)
    for case, result in zip(cases, results, strict=True):
        assert not isinstance(result, Exception), result
        expected = reference(case["images"], case["prompts"], case["max_new"], 32)
        assert answer(result)[0] == expected.result.tokens
    after = settled_stats(client, before, "prefill_k32", rows=len(cases))
    executions = after["prefill_k32"][1] - before["prefill_k32"][1]
    assert executions == -(-len(cases) // max_batch)  # ceil: each prefill batch as full as allowed


# ------------------------------------------------------------------------------- 2. streaming
def test_streamed_tokens_concatenated_equal_the_answer(server, images, reference):  # noqa: F811
    module, client = grpc_client(server)
    got: queue.Queue = queue.Queue()
    cases = {
        "two-rows": {"images": images[:2], "prompts": PROMPTS[:2], "max_new": 5, "keep": 16},
        "one-row": {"images": [images[2]], "prompts": [PROMPTS[2]], "max_new": 3, "keep": 8},
    }
    try:
        client.start_stream(callback=lambda result, error: got.put((time.perf_counter(), result, error)))
        start = time.perf_counter()
        for rid, case in cases.items():
            client.async_stream_infer(
                "pipeline_stream",
                pipeline_inputs(module, **case),
                request_id=rid,
                enable_empty_final_response=True,
            )
        streams: dict[str, list] = {rid: [] for rid in cases}
        finals = 0
        while finals < len(cases):
            t, result, error = got.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            streams[response.id].append((t - start, result, final))
            finals += final
    finally:
        client.stop_stream()
        client.close()
    for rid, case in cases.items():
        expected = reference(case["images"], case["prompts"], case["max_new"], case["keep"])
        steps = streams[rid]
        assert [final for _, _, final in steps] == [False] * (len(steps) - 1) + [True]
        assert len(steps) == max(len(t) for t in expected.result.tokens)  # one response per step
        ids = np.concatenate([r.as_numpy("token_ids") for _, r, _ in steps], axis=1)  # [rows, steps]
        assert [[int(t) for t in row if t >= 0] for row in ids] == expected.result.tokens
        texts = ["".join(parts) for parts in zip(*(answer_text(r) for _, r, _ in steps), strict=True)]
        assert texts == expected.answers
        print(f"{rid}: first token after {steps[0][0]:.3f} s, last after {steps[-1][0]:.3f} s")


def answer_text(result) -> list[str]:
    return [t[0].decode() for t in result.as_numpy("text")]


# ------------------------------------------------------------------------- 3. overload, bad requests
def test_overload_is_rejected_at_the_queue_and_answered_requests_are_right(grpc, images, reference):  # noqa: F811
    from tritonclient.utils import InferenceServerException

    module, client = grpc
    case = {"images": [images[0]], "prompts": [PROMPTS[0]], "max_new": 2, "keep": 8}
    results = fire(module, client, [case] * 30)
    rejected = [r for r in results if isinstance(r, InferenceServerException)]
    answered = [r for r in results if not isinstance(r, InferenceServerException)]
    assert rejected and answered
    assert {(r.status(), "Exceeds maximum queue size" in r.message()) for r in rejected} == {
        ("StatusCode.UNAVAILABLE", True)
    }
    expected = reference(case["images"], case["prompts"], 2, 8).result.tokens
    assert all(answer(r)[0] == expected for r in answered)
    assert len(answered) <= QUEUE + client.get_model_config("pipeline").config.max_batch_size
    # a request queued past its own timeout (1 ms < the batching delay) is rejected, not served late
    (late,) = fire(module, client, [case], timeout=1000)
    assert isinstance(late, InferenceServerException) and "timeout" in late.message().lower(), late
    (good,) = fire(module, client, [case])
    assert answer(good)[0] == expected


def battery(module, images, tmp_path) -> list[tuple[str, list, str]]:  # noqa: F811
    """(what, inputs, the words the error must name): at least ten malformed requests."""
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n not really an image")

    def inputs(**changes):
        case = {"images": [images[0]], "prompts": [PROMPTS[0]], "max_new": 2, "keep": 8} | changes
        return pipeline_inputs(module, **case)

    def tensor(name, array, dtype):
        t = module.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    image = np.array([[images[0].read_bytes()]], dtype=np.object_)
    replace = {
        "int prompt": tensor("prompt", np.array([[7]], dtype=np.int32), "INT32"),
        "float limit": tensor("max_new_tokens", np.array([[2.0]], dtype=np.float32), "FP32"),
        "2-d keep": tensor("keep", np.array([[8, 8]], dtype=np.int32), "INT32"),
        "bad utf-8": tensor("prompt", np.array([[b"\xff\xfe what"]], dtype=np.object_), "BYTES"),
        "3 prompts": tensor("prompt", np.array([[PROMPTS[0].encode()]] * 3, dtype=np.object_), "BYTES"),
    }

    def swapped(name: str, what: str) -> list:
        return [replace[what] if t.name() == name else t for t in inputs()]

    return [
        ("wrong dtype (prompt INT32)", swapped("prompt", "int prompt"), "prompt"),
        ("wrong dtype (max_new_tokens FP32)", swapped("max_new_tokens", "float limit"), "max_new_tokens"),
        ("wrong shape (keep [1, 2])", swapped("keep", "2-d keep"), "keep"),
        ("missing input", [tensor("image", image, "BYTES")], "prompt"),
        ("rows differ", swapped("prompt", "3 prompts"), "batch"),
        ("not an image", inputs(images=[junk]), "image 0: not a readable image"),
        ("one placeholder", inputs(prompts=["look at <image> please"]), "image placeholder"),
        ("two placeholders", inputs(prompts=["<image> and <image>"]), "image placeholder"),
        ("prompt not UTF-8", swapped("prompt", "bad utf-8"), "not UTF-8"),
        ("keep not held", inputs(keep=12), "keep 12: this export holds keep levels 8, 16, 32"),
        ("mixed keeps", inputs(images=images[:2], prompts=PROMPTS[:2], keep=[8, 16]), "same for every row"),
        ("prompt too long", inputs(prompts=["many words " * 400]), "the exported profile allows at most"),
        ("max_new_tokens 0", inputs(max_new=0), "max_new_tokens must be >= 1, got 0"),
        ("max_new_tokens < 0", inputs(max_new=-3), "max_new_tokens must be >= 1, got -3"),
        ("max_new_tokens too big", inputs(max_new=100000), "exceeds the exported decode profile"),
    ]


def test_malformed_requests_are_invalid_argument_naming_the_problem(grpc, images, reference, tmp_path):  # noqa: F811
    from tritonclient.utils import InferenceServerException

    module, client = grpc
    cases = battery(module, images, tmp_path)
    assert len(cases) >= 10
    for model in ("pipeline", "pipeline_stream"):
        for what, inputs, needle in cases:
            if model == "pipeline":
                with pytest.raises(InferenceServerException) as e:
                    client.infer(model, inputs)
                error = e.value
            else:
                error = stream_error(client, model, inputs)
            # a gRPC stream carries only the message (ModelStreamInferResponse.error_message), no status
            status = error.status() if model == "pipeline" else "StatusCode.INVALID_ARGUMENT"
            assert status == "StatusCode.INVALID_ARGUMENT", (model, what, error)
            assert needle.lower() in error.message().lower(), (model, what, error.message())
    # the same battery batched with good requests in one execute: each answered on its own
    good = {"images": [images[1]], "prompts": [PROMPTS[2]], "max_new": 3, "keep": 8}
    mixed = [good, *(c[1] for c in cases[5:]), good]
    out = fire(module, client, mixed)
    expected = reference(good["images"], good["prompts"], 3, 8).result.tokens
    assert answer(out[0])[0] == expected and answer(out[-1])[0] == expected
    for (what, _, needle), error in zip(cases[5:], out[1:-1], strict=True):
        assert isinstance(error, InferenceServerException), what
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and needle.lower() in error.message().lower()
    result = client.infer("pipeline", pipeline_inputs(module, **good))  # and the server keeps serving
    assert answer(result)[0] == expected


def stream_error(client, model: str, inputs: list):
    """The error a decoupled model answers ``inputs`` with, over gRPC streaming."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put(error))
    try:
        client.async_stream_infer(model, inputs)
        error = got.get(timeout=60)
    finally:
        client.stop_stream()
    assert error is not None
    return error


# ------------------------------------------------------------------------- 8. thread budget (configs)
def test_thread_budget_and_queue_policy_are_written_in_the_configs(levels_export, tmp_path):  # noqa: F811
    from tritonclient.grpc import model_config_pb2

    def params(path: Path) -> dict[str, str]:
        return {k: v.string_value for k, v in parse_config(path).parameters.items()}

    # 16 cores, 2 pipeline instances + 2 streaming: 4 sessions compute at once -> 4 threads each
    repo = deploy.write_repository(levels_export, tmp_path / "r16", "python", cores=16)
    p = params(repo.path / "prefill_k8" / "config.pbtxt")
    assert (p["intra_op_num_threads"], p["inter_op_num_threads"], p["allow_spinning"]) == ("4", "1", "0")
    assert "Threads: 4 intra-op per session" in (repo.path / "decode" / "config.pbtxt").read_text()
    marker = json.loads((repo.path / deploy.MARKER).read_text())["settings"]
    assert (marker["cores"], marker["intra_op_threads"]) == (16, 4)
    # 2 cores -> 1; one pipeline, no streaming: 1 session at a time -> all 8 cores; an explicit --threads wins
    two = deploy.write_repository(levels_export, tmp_path / "r2", "onnxruntime", cores=2)
    p = params(two.path / "decode" / "config.pbtxt")
    assert (p["intra_op_thread_count"], p["inter_op_thread_count"]) == (
        "1",
        "1",
    )  # onnxruntime backend's keys
    one = deploy.write_repository(
        levels_export, tmp_path / "r8", "python", cores=8, pipeline_instances=1, stream=False
    )
    assert params(one.path / "decode" / "config.pbtxt")["intra_op_num_threads"] == "8"
    assert not (one.path / "pipeline_stream").exists()
    mine = deploy.write_repository(levels_export, tmp_path / "r3", "python", cores=8, intra_op_threads=3)
    assert params(mine.path / "decode" / "config.pbtxt")["intra_op_num_threads"] == "3"

    # the pipeline's batching and queue policy, and the decoupled variant (Triton's schema)
    for name, decoupled in (("pipeline", False), ("pipeline_stream", True)):
        config = parse_config(repo.path / name / "config.pbtxt")
        batching = config.dynamic_batching
        assert batching.max_queue_delay_microseconds == 2000
        policy = batching.default_queue_policy
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (64, 60_000_000)
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert policy.allow_timeout_override
        assert config.model_transaction_policy.decoupled is decoupled
        ragged = {t.name for t in config.input if t.allow_ragged_batch}
        assert ragged == {"stop_token_ids"}
    for bad, needle in (
        ({"cores": -1}, "--cores"),
        ({"max_queue": 0}, "--max-queue"),
        ({"batch_delay_us": -5}, "--batch-delay-us"),
        ({"queue_timeout_s": -1}, "--queue-timeout"),
    ):
        with pytest.raises(UsageError, match=needle):
            deploy.write_repository(levels_export, tmp_path / "bad", "python", **bad)
    assert not (tmp_path / "bad").exists()
    assert LEVEL_KEEPS == (8, 16, 32)


# ------------------------------------------------------------------------- packing (no server)
@pytest.fixture
def pipeline_module(monkeypatch):
    """star_export/triton_models/pipeline.py imported with stand-ins for Triton's modules."""
    import importlib.util

    import star_export.encoding as encoding

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("pb_utils"))
    monkeypatch.setitem(sys.modules, "star_encoding", encoding)
    path = Path(deploy.TEMPLATES) / "pipeline.py"
    spec = importlib.util.spec_from_file_location("star_pipeline_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packing_groups_by_keep_and_keeps_each_batch_within_the_profile(pipeline_module):
    m = pipeline_module
    model = m.TritonPythonModel.__new__(m.TritonPythonModel)
    model.max_batch, model.past_max1, model.past_max2 = 4, 40, 40
    k8, k16 = m.Level(8, "prefill_k8", 16, 8), m.Level(16, "prefill_k16", 32, 16)

    def job(i, level, rows, text_len, limit):
        ids = np.zeros((rows, text_len), dtype=np.int64)
        return m.Job(i, level, [limit] * rows, [set()] * rows, ids, ids, None)

    # allowed new tokens at keep 8: 40 - (T - 1 + 16) + 1 = 26 - T; at keep 16: 10 - T
    jobs = [
        job(0, k8, 1, 5, 20),  # fits alone (21 allowed)
        job(1, k16, 1, 3, 4),
        job(2, k8, 2, 4, 3),
        job(3, k8, 1, 10, 3),  # T 10 -> 16 allowed: the batch's 20 no longer fits -> new batch
        job(4, k16, 2, 3, 5),
        job(5, k8, 2, 9, 2),  # rows 1 + 2 = 3 <= 4 with job 3
        job(6, k8, 2, 2, 2),  # rows 5 > 4 -> new batch
    ]
    batches = [[j.index for j in b] for b in model._pack(jobs)]
    assert batches == [[0, 2], [3, 5], [6], [1, 4]]
    model.max_batch = 8  # a looser batch limit: only the profile splits
    assert [[j.index for j in b] for b in model._pack(jobs)] == [[0, 2], [3, 5, 6], [1, 4]]
