"""The text of Triton's ``config.pbtxt`` files: a prefill model per keep level and the decode model
from the manifest's graph entries, and the pipeline (BLS) model.

Every config follows Triton's model configuration rules: ``max_batch_size`` > 0 (the batch dim is
the first dim of every tensor and is left out of ``dims``), other dynamic dims are -1, dtypes map
numpy names to ``TYPE_*``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from star_export import __version__
from star_export.deploy.settings import RepositorySettings
from star_export.deploy.source import batch_first
from star_export.errors import UsageError

# numpy dtype name -> Triton model-config data type (model_config.proto, "Datatypes" table).
TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "string": "TYPE_STRING",
}
# The pipeline model's own I/O (dims without the batch dim), declared once here.
PIPELINE_INPUTS = (
    ("image", "string", (1,), False, "bytes of a PNG/JPEG file, one per row"),
    ("prompt", "string", (1,), False, "the question, UTF-8; the chat template places the image"),
    ("max_new_tokens", "int32", (1,), True, "generation limit (default: the config parameter)"),
    ("stop_token_ids", "int32", (-1,), True, "extra stop ids (< 0 ignored); EOS always stops"),
    ("keep", "int32", (1,), True, "keep level (keep2) to answer at, one per request (default: the export's)"),
)
RAGGED_INPUTS = frozenset({"stop_token_ids"})  # lengths differ between requests batched together
PIPELINE_OUTPUTS = (
    ("text", "string", (1,), False, "the answer, detokenised (special tokens skipped)"),
    ("token_ids", "int64", (-1,), False, "generated ids incl. the stop token, padded with -1"),
)


def triton_dims(shape: Iterable[int | str]) -> list[int]:
    """A contract shape without its batch dim; symbolic dims (``text_len``, ``past_len_l1 + 1``) -> -1."""
    return [d if isinstance(d, int) else -1 for d in list(shape)[1:]]


def triton_dtype(dtype: str) -> str:
    """The Triton ``TYPE_*`` of a numpy dtype name, or a one-line UsageError."""
    try:
        return TRITON_DTYPES[dtype]
    except KeyError:
        raise UsageError(f"dtype {dtype!r} has no Triton equivalent") from None


def _q(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal (double quotes, escapes)


def _tensor_entries(
    entries: Iterable[tuple[str, str, list[int], bool]], indent: str = "  ", ragged: frozenset = frozenset()
) -> str:
    blocks = []
    for name, dtype, dims, optional in entries:
        lines = [
            f"{indent}{{",
            f"{indent}  name: {_q(name)}",
            f"{indent}  data_type: {triton_dtype(dtype)}",
            # a tensor of shape [batch] only: Triton wants dims [ 1 ] reshaped to the batch dim alone
            f"{indent}  dims: [ {', '.join(str(d) for d in dims) or '1'} ]",
        ]
        if not dims:
            lines.append(f"{indent}  reshape: {{ shape: [ ] }}")
        if optional:
            lines.append(f"{indent}  optional: true")
        if name in ragged:
            lines.append(f"{indent}  allow_ragged_batch: true")
        lines.append(f"{indent}}}")
        blocks.append("\n".join(lines))
    return ",\n".join(blocks)


def _config_text(
    *,
    name: str,
    engine_line: str,
    max_batch_size: int,
    inputs: list[tuple[str, str, list[int], bool]],
    outputs: list[tuple[str, str, list[int], bool]],
    kind: str,
    count: int,
    profiles: list[str] | None = None,
    parameters: Mapping[str, str] | None = None,
    comments: Iterable[str] = (),
    ragged: frozenset = frozenset(),
    blocks: Iterable[str] = (),
) -> str:
    lines = [f"# {c}" if c else "#" for c in comments]
    lines += [
        f"name: {_q(name)}",
        engine_line,
        f"max_batch_size: {max_batch_size}",
        "input [",
        _tensor_entries(inputs, ragged=ragged),
        "]",
        "output [",
        _tensor_entries(outputs),
        "]",
        "instance_group [",
        "  {",
        f"    count: {count}",
        f"    kind: {kind}",
    ]
    if profiles:
        lines.append(f"    profile: [ {', '.join(_q(p) for p in profiles)} ]")
    lines += ["  }", "]", *blocks]
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{ key: {_q(key)} value: {{ string_value: {_q(value)} }} }}")
    return "\n".join(lines) + "\n"


ENGINE_LINES = {
    "python": 'backend: "python"',
    "onnxruntime": 'platform: "onnxruntime_onnx"',
    "tensorrt": 'platform: "tensorrt_plan"',
}


def profile_comments(engine_path: Path, entry: Mapping[str, Any], max_batch: int) -> list[str]:
    """config.pbtxt comment lines on a TensorRT engine: its file, version and profile 0's ranges."""
    out = [
        f"TensorRT engine: {engine_path.name} (TensorRT {entry.get('tensorrt', '?')}, "
        f"sha256 {str(entry.get('sha256', '?'))[:16]}...), copied to 1/model.plan.",
        "Optimization profile 0 (the only one star_export builds), min / opt / max per input:",
    ]
    profiles = entry.get("profiles") or []
    for name, rng in (profiles[0].get("inputs", {}) if profiles else {}).items():
        out.append(f"  {name}: {rng.get('min')} / {rng.get('opt')} / {rng.get('max')}")
    out += [
        f'max_batch_size {max_batch} = the profile\'s max batch. Every instance uses profile "0"',
        "(instance_group.profile); TensorRT rejects shapes outside these ranges, so serve longer",
        "prompts/answers by rebuilding (python -m star_export build --max-text-len/--max-new-tokens).",
        "The engine only runs on the GPU model and TensorRT version it was built with.",
    ]
    return out


def graph_config(
    graph: Mapping[str, Any],
    settings: RepositorySettings,
    *,
    max_batch_size: int,
    comments: Iterable[str] = (),
    parameters: Mapping[str, str] | None = None,
) -> str:
    """config.pbtxt of a prefill (one keep level) or the decode model, from the manifest's graph entry."""
    batch_first(graph)
    io = [
        [(t["name"], t["dtype"], triton_dims(t["shape"]), False) for t in graph[side]]
        for side in ("inputs", "outputs")
    ]
    return _config_text(
        name=settings.name(graph["graph"]),
        engine_line=ENGINE_LINES[settings.backend],
        max_batch_size=max_batch_size,
        inputs=io[0],
        outputs=io[1],
        kind=settings.kind,
        count=settings.instances,
        profiles=["0"] if settings.backend == "tensorrt" else None,
        parameters=parameters,
        comments=comments,
    )


def batching_block(settings: RepositorySettings) -> str:
    """The pipeline's ``dynamic_batching``: requests queued within the delay run as one batch; the
    queue is bounded (``max_queue_size``: beyond it a request is rejected at once, UNAVAILABLE) and
    a request waiting longer than the timeout is rejected (``timeout_action: REJECT``)."""
    policy = ["    timeout_action: REJECT"]
    if settings.queue_timeout_s > 0:
        policy += [
            f"    default_timeout_microseconds: {round(settings.queue_timeout_s * 1e6)}",
            "    allow_timeout_override: true",
        ]
    policy.append(f"    max_queue_size: {settings.max_queue}")
    return "\n".join(
        [
            "dynamic_batching {",
            f"  max_queue_delay_microseconds: {settings.batch_delay_us}",
            "  default_queue_policy {",
            *policy,
            "  }",
            "}",
        ]
    )


def pipeline_config(
    settings: RepositorySettings,
    max_batch_size: int,
    limits: Mapping[str, int],
    prefill_models: Mapping[int, str],
    default_keep: int,
    *,
    stream: bool = False,
) -> str:
    """config.pbtxt of the pipeline model (Python backend, BLS over a prefill model per keep level and
    the decode model), or of its streaming variant (``stream``: decoupled, one response per token).
    ``prefill_models``: {keep2: model name}, the default level first."""
    keeps = ", ".join(str(k) for k in prefill_models)
    name = settings.name("pipeline_stream" if stream else "pipeline")
    blocks = [batching_block(settings)]
    if stream:
        blocks.append("model_transaction_policy { decoupled: true }")
    timeout = f"{settings.queue_timeout_s:g} s" if settings.queue_timeout_s > 0 else "none"
    return _config_text(
        name=name,
        engine_line=ENGINE_LINES["python"],
        max_batch_size=max_batch_size,
        inputs=[(n, d, list(s), o) for n, d, s, o, _ in PIPELINE_INPUTS],
        outputs=[(n, d, list(s), o) for n, d, s, o, _ in PIPELINE_OUTPUTS],
        kind="KIND_CPU",
        count=settings.pipeline_instances,
        parameters={
            "prefill_model": prefill_models[default_keep],  # the default level's
            "prefill_models": json.dumps({str(k): m for k, m in prefill_models.items()}),
            "default_keep": str(default_keep),
            "decode_model": settings.name("decode"),
            "max_new_tokens": str(settings.max_new_tokens),
            **{f"{k}_max": str(v) for k, v in limits.items()},
        },
        comments=[
            f"Generated by star_export {__version__}: image bytes + prompt -> text, greedy, BLS over",
            f"{', '.join(prefill_models.values())} and {settings.name('decode')} (see 1/model.py).",
            f"Keep levels: {keeps} (optional input 'keep', default {default_keep}); one decode model serves all.",
            *(
                [
                    f"Batching: requests queued within {settings.batch_delay_us} us run as one batch per keep "
                    f"level (<= {max_batch_size} rows, each row stops at its own end);",
                ]
                if max_batch_size > 1
                else ["Batching: off (--pipeline-max-batch 1): one request per execution;"]
            ),
            f"queue <= {settings.max_queue} requests,"
            f" queue timeout {timeout} (both rejected). Flags: --batch-delay-us, --pipeline-max-batch,"
            " --max-queue, --queue-timeout.",
            *(
                ["Streaming (decoupled): one response per generated token, the last flagged final."]
                if stream
                else []
            ),
        ],
        ragged=RAGGED_INPUTS,
        blocks=blocks,
    )
