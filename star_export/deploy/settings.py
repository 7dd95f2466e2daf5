"""What a repository is asked for (:class:`RepositorySettings`, checked) and what was written
(:class:`Repository`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from star_export.errors import UsageError

BACKENDS = ("python", "onnxruntime", "tensorrt")


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
    intra_op_threads: int = 0  # python backend: onnxruntime threads per instance (0 = its default)

    @property
    def kind(self) -> str:
        device = self.device or ("gpu" if self.backend == "tensorrt" else "cpu")
        return "KIND_GPU" if device == "gpu" else "KIND_CPU"

    def name(self, model: str) -> str:
        return f"{self.prefix}{model}"


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
    if s.prefix and not all(c.isalnum() or c in "_-" for c in s.prefix):
        raise UsageError(f"--prefix {s.prefix!r}: use letters, digits, '_' and '-' only")
