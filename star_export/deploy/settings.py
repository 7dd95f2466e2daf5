"""What a repository is asked for (:class:`RepositorySettings`, checked) and what was written
(:class:`Repository`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from star_export.errors import UsageError

BACKENDS = ("python", "onnxruntime", "tensorrt")
# How the python backend's graph models hold the weights (onnxruntime on the CPU):
#   shared: every model maps the one weights file (in memory once; MatMul pre-packing off, which makes
#           a decode step of 2+ rows 3.5-4x slower than one row (measured), so batching across requests gains little)
#   decode-packed: the prefill models map it, the decode model loads and pre-packs its own copy
#           (two copies whatever the number of levels; batched decode steps cost about one row's)
#   packed: every model loads and pre-packs its own copy (levels + 1 copies)
WEIGHT_MODES = ("decode-packed", "shared", "packed")


@dataclass(frozen=True)
class RepositorySettings:
    """What a repository is asked for: backend, instances, device, model name prefix, limits."""

    backend: str = "python"
    max_new_tokens: int = 32  # the pipeline's default limit
    instances: int = 1  # instances of prefill and of decode
    pipeline_instances: int = 2  # concurrent pipeline requests
    device: str | None = None  # "cpu" | "gpu"; default gpu for tensorrt, cpu otherwise
    prefix: str = (
        ""  # model name prefix, e.g. "llava_" -> llava_prefill(_k32...), llava_decode, llava_pipeline
    )
    intra_op_threads: int = 0  # onnxruntime threads per session; 0 = from the thread budget (cores)
    cores: int = 0  # cores the server may use; 0 = this machine's (os.sched_getaffinity)
    batch_delay_us: int = 2000  # dynamic batching: the longest a request waits for others to join
    pipeline_max_batch: int = 0  # rows per pipeline execution; 0 = the profile's max batch, 1 = no batching
    max_queue: int = 64  # requests queued per pipeline model; more are rejected (UNAVAILABLE)
    queue_timeout_s: float = 60.0  # a request queued longer is rejected; 0 = no timeout
    stream: bool = True  # also write pipeline_stream (decoupled: one response per token)
    weights: str = "decode-packed"  # WEIGHT_MODES: how the graph models hold the weights (python backend)

    @property
    def kind(self) -> str:
        device = self.device or ("gpu" if self.backend == "tensorrt" else "cpu")
        return "KIND_GPU" if device == "gpu" else "KIND_CPU"

    def name(self, model: str) -> str:
        return f"{self.prefix}{model}"

    def pipeline_rows(self, profile_batch: int) -> int:
        """Rows the pipeline runs per execution: the profile's max batch, or fewer
        (``pipeline_max_batch``; 1 = no batching across requests)."""
        return min(profile_batch, self.pipeline_max_batch or profile_batch)

    @property
    def pipelines(self) -> int:
        """Pipeline instances that may run at once (the streaming model's count too)."""
        return self.pipeline_instances * (2 if self.stream else 1)


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_budget(s: RepositorySettings, graph_models: int) -> RepositorySettings:
    """``s`` with ``cores`` and ``intra_op_threads`` resolved (never the library's default).

    A pipeline instance runs one graph call at a time (BLS: prefill, then decode steps), and a graph
    model runs one call per instance, so at most ``min(pipelines, graph_models * instances)``
    onnxruntime sessions compute at once; each gets ``cores // that`` intra-op threads (at least 1).
    """
    cores = s.cores or machine_cores()
    if s.intra_op_threads:
        return replace(s, cores=cores)
    busy = max(1, min(s.pipelines, graph_models * s.instances))
    return replace(s, cores=cores, intra_op_threads=max(1, cores // busy))


@dataclass
class Repository:
    """What :func:`write_repository` wrote."""

    path: Path
    backend: str
    models: dict[str, str]  # graph (prefill or prefill_k32..., decode) or "pipeline" -> model name
    files: list[str] = field(default_factory=list)  # relative paths, sorted
    limits: dict[str, int] = field(default_factory=dict)  # batch/text_len/past_len_l1/past_len_l2 maxima
    # keep levels served: {"keep1", "keep2", "span1", "span2", "model"}, the default first
    levels: list[dict[str, Any]] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)  # files hard-linked to the export's (else copied)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def check_settings(s: RepositorySettings) -> None:
    """One-line UsageErrors for settings Triton or the backend would reject."""
    if s.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {s.backend!r}")
    if s.device not in (None, "cpu", "gpu"):
        raise UsageError(f"--device must be cpu or gpu, got {s.device!r}")
    if s.backend == "tensorrt" and s.device == "cpu":
        raise UsageError("--backend tensorrt runs on the GPU only (--device gpu)")
    if s.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if s.instances < 1 or s.pipeline_instances < 1:
        raise UsageError("--instances and --pipeline-instances must be >= 1")
    if s.intra_op_threads < 0:
        raise UsageError(f"--threads must be >= 0, got {s.intra_op_threads}")
    if s.cores < 0:
        raise UsageError(f"--cores must be >= 0, got {s.cores}")
    if s.batch_delay_us < 0:
        raise UsageError(f"--batch-delay-us must be >= 0, got {s.batch_delay_us}")
    if s.pipeline_max_batch < 0:
        raise UsageError(f"--pipeline-max-batch must be >= 0, got {s.pipeline_max_batch}")
    if s.max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {s.max_queue}")
    if s.queue_timeout_s < 0:
        raise UsageError(f"--queue-timeout must be >= 0 seconds, got {s.queue_timeout_s:g}")
    if s.weights not in WEIGHT_MODES:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, got {s.weights!r}")
    if s.prefix and not all(c.isalnum() or c in "_-" for c in s.prefix):
        raise UsageError(f"--prefix {s.prefix!r}: use letters, digits, '_' and '-' only")
