"""A bounded load generator for the Triton pipeline model, on loopback, with tritonclient's asyncio gRPC
client (``tritonclient.grpc.aio``, the field's client; no hand-written HTTP).

Closed loop: ``concurrency`` workers, each sending its next request as soon as its previous one is
answered, until ``len(requests)`` have been sent; every request has a client timeout, so a point
always ends. A decoupled (streaming) model is driven through ``tritonclient.grpc``'s stream instead,
one blocking stream per worker thread (the asyncio client cannot request Triton's final-response
flag). Per request: start and end (``time.perf_counter``), the tokens of the answer and, with a
decoupled (streaming) model, the arrival time of each response; an error is kept with its status.
A rejection is an error the server gives for overload (Triton's queue policy: ``UNAVAILABLE`` /
"exceeds maximum queue size", or the queue timeout); every other error counts as failed.

Also: the resident set of a process and its descendants (the server and its backend stubs), and
:func:`soak`, N requests with the server's RSS after warm-up and at the end.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from star_export.bench.procs import tree_rss

REJECTED = ("exceeds maximum queue size", "queue timeout", "request timeout expired", "rejected")
REJECTED_STATUS = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class Request:
    """One pipeline request: one image (file bytes) and prompt, a token limit, a keep level (None:
    the repository's default)."""

    image: bytes
    prompt: str
    max_new_tokens: int
    keep: int | None = None


@dataclass
class Outcome:
    """What happened to one request (times from ``time.perf_counter``)."""

    keep: int | None
    start: float
    end: float
    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # streaming: when each token arrived
    error: str | None = None
    status: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rejected(self) -> bool:
        """An overload answer (the queue policy), not a failure."""
        if self.error is None:
            return False
        return (self.status or "") in REJECTED_STATUS or any(r in self.error.lower() for r in REJECTED)


def pipeline_inputs(module: Any, request: Request) -> list:
    """The pipeline model's inputs for one request (batch 1), built with ``module`` (tritonclient.grpc
    or tritonclient.grpc.aio share ``InferInput``)."""
    data = {
        "image": (np.array([[request.image]], dtype=np.object_), "BYTES"),
        "prompt": (np.array([[request.prompt.encode()]], dtype=np.object_), "BYTES"),
        "max_new_tokens": (np.array([[request.max_new_tokens]], dtype=np.int32), "INT32"),
    }
    if request.keep is not None:
        data["keep"] = (np.array([[request.keep]], dtype=np.int32), "INT32")
    inputs = []
    for name, (array, dtype) in data.items():
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _tokens(result: Any) -> list[int]:
    ids = result.as_numpy("token_ids")
    return [] if ids is None else [int(t) for t in np.asarray(ids).reshape(-1) if t >= 0]


def _status(error: Exception) -> str:
    status = getattr(error, "status", None)
    return str(status() if callable(status) else status or type(error).__name__)


def _stream_one(port: int, model: str, request: Request, timeout: float) -> Outcome:
    """One request to a decoupled (streaming) model: tritonclient.grpc's stream with Triton's empty
    final response (the asyncio client cannot ask for it: its ``triton_`` parameters are reserved), so
    the end of the answer is the response flagged ``triton_final_response``."""
    import queue

    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    start = time.perf_counter()
    out = Outcome(keep=request.keep, start=start, end=start)
    try:
        client.start_stream(
            callback=lambda result, error: responses.put((time.perf_counter(), result, error))
        )
        client.async_stream_infer(
            model, pipeline_inputs(grpcclient, request), enable_empty_final_response=True
        )
        while True:
            left = start + timeout - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"no final response within {timeout:.0f} s")
            now, result, error = responses.get(timeout=left)
            if error is not None:
                raise error
            got = _tokens(result)
            out.tokens += got
            out.arrivals += [now] * len(got)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    except Exception as e:  # an error answer, or the timeout
        out.error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        out.status = _status(e)
    finally:
        client.stop_stream()
        client.close()
    out.end = out.arrivals[-1] if out.ok and out.arrivals else time.perf_counter()
    return out


async def _one(client: Any, module: Any, model: str, request: Request, timeout: float) -> Outcome:
    start = time.perf_counter()
    out = Outcome(keep=request.keep, start=start, end=start)
    try:
        result = await client.infer(model, pipeline_inputs(module, request), client_timeout=timeout)
        out.tokens = _tokens(result)
    except Exception as e:  # an error answer, or the client's timeout
        out.error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        out.status = _status(e)
    out.end = time.perf_counter()
    return out


async def _run(
    port: int, requests: Sequence[Request], concurrency: int, model: str, timeout: float, stream: bool
) -> list[Outcome]:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(f"127.0.0.1:{port}")
    outcomes: list[Outcome | None] = [None] * len(requests)
    cursor = iter(range(len(requests)))

    async def worker() -> None:
        for i in cursor:  # one shared iterator: each index taken once
            if stream:  # the blocking stream client, in a thread per worker
                outcomes[i] = await asyncio.to_thread(_stream_one, port, model, requests[i], timeout)
            else:
                outcomes[i] = await _one(client, aio, model, requests[i], timeout)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(requests))))))
    finally:
        await client.close()
    return [o for o in outcomes if o is not None]


def run_requests(
    port: int,
    requests: Sequence[Request],
    concurrency: int,
    model: str = "pipeline",
    timeout: float = 300.0,
    stream: bool = False,
) -> list[Outcome]:
    """Send ``requests`` to ``model`` on 127.0.0.1:``port`` (gRPC) with ``concurrency`` in flight."""
    return asyncio.run(_run(port, requests, concurrency, model, timeout, stream))


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarise(
    outcomes: Sequence[Outcome], stream: bool, ttft_probe: Sequence[Outcome] = ()
) -> dict[str, Any]:
    """The field's serving figures of one point: requests/s and output tokens/s over the point's wall
    time (first start to last end), end-to-end latency p50/p90/p99, TTFT and TPOT / ITL, counts.

    TTFT: streaming, the first token's arrival; otherwise the end-to-end time of ``ttft_probe``'s
    requests (1 new token each, sent at the same concurrency), marked ``ttft_kind``. TPOT per request:
    (end-to-end - TTFT) / (tokens - 1), with the probe's median TTFT where not streaming; ITL
    (streaming only): the gaps between tokens."""
    ok = [o for o in outcomes if o.ok]
    wall = (max(o.end for o in outcomes) - min(o.start for o in outcomes)) if outcomes else 0.0
    e2e = [o.end - o.start for o in ok]
    tokens = sum(len(o.tokens) for o in ok)
    out: dict[str, Any] = {
        "requests": len(outcomes),
        "ok": len(ok),
        "rejected": sum(o.rejected for o in outcomes),
        "failed": sum((not o.ok) and not o.rejected for o in outcomes),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "output_tokens": tokens,
        **{f"e2e_p{q}_s": percentile(e2e, q) for q in (50, 90, 99)},
    }
    if stream:
        ttft = [o.arrivals[0] - o.start for o in ok if o.arrivals]
        gaps = [b - a for o in ok for a, b in zip(o.arrivals, o.arrivals[1:], strict=False)]
        out["ttft_kind"] = "first streamed token"
        out["itl_p50_s"], out["itl_p90_s"] = percentile(gaps, 50), percentile(gaps, 90)
        tpot = [(o.end - o.arrivals[0]) / (len(o.tokens) - 1) for o in ok if len(o.tokens) > 1 and o.arrivals]
    else:
        probe = [o.end - o.start for o in ttft_probe if o.ok]
        ttft = probe
        out["ttft_kind"] = (
            "end-to-end time of a 1-token request (no streaming model)" if probe else "not measured"
        )
        out["itl_p50_s"] = out["itl_p90_s"] = None
        first = percentile(probe, 50)
        tpot = (
            []
            if first is None
            else [
                (e - first) / (len(o.tokens) - 1) for o, e in zip(ok, e2e, strict=True) if len(o.tokens) > 1
            ]
        )
    out["ttft_p50_s"], out["ttft_p90_s"] = percentile(ttft, 50), percentile(ttft, 90)
    out["tpot_p50_s"] = percentile(tpot, 50)
    return out


@dataclass
class Soak:
    """:func:`soak`'s figures: RSS of the server's process tree after the warm-up, after each chunk of
    requests (``trace``: [requests sent after the warm-up, RSS bytes]) and at the end."""

    requests: int
    warmup: int
    ok: int
    failed: int
    rss_after_warmup: int
    rss_end: int
    wall_s: float
    trace: list[list[int]] = field(default_factory=list)

    @property
    def growth(self) -> float:
        """Relative RSS growth from the end of the warm-up to the end."""
        return self.rss_end / self.rss_after_warmup - 1.0

    @property
    def peak_growth(self) -> float:
        """Relative growth of the highest RSS read after the warm-up (the trace and the end)."""
        peak = max([self.rss_end, *(rss for _, rss in self.trace)])
        return peak / self.rss_after_warmup - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "growth": self.growth, "peak_growth": self.peak_growth}


def soak(
    port: int,
    server_pid: int,
    requests: Sequence[Request],
    concurrency: int,
    warmup: int,
    model: str = "pipeline",
    timeout: float = 300.0,
    chunk: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Soak:
    """Send ``warmup`` requests, read the server's RSS, send ``requests`` (in chunks of ``chunk``,
    the RSS read after each; 0 = one chunk), read it again."""
    start = time.perf_counter()
    cycle = [requests[i % len(requests)] for i in range(warmup)]
    every = run_requests(port, cycle, concurrency, model, timeout)
    after = tree_rss(server_pid)["rss"]
    step = chunk or len(requests)
    trace: list[list[int]] = []
    for i in range(0, len(requests), step):
        every += run_requests(port, requests[i : i + step], concurrency, model, timeout)
        sent = min(i + step, len(requests))
        trace.append([sent, tree_rss(server_pid)["rss"]])
        if progress is not None:
            progress(sent, len(requests))
    return Soak(
        requests=len(requests),
        warmup=warmup,
        ok=sum(o.ok for o in every),
        failed=sum(not o.ok for o in every),
        rss_after_warmup=after,
        rss_end=trace[-1][1] if trace else after,
        wall_s=time.perf_counter() - start,
        trace=trace,
    )


def nan_to_none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
