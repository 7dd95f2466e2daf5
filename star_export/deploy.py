"""Stage 6 of the data's way: an export directory -> a Triton model repository (+ the C++ header).

``write_repository(from_dir, repo, backend)`` reads ``manifest.json`` (the I/O contract, written
once by the exporter) and writes, atomically (staging directory + rename)::

    repo/
      README.md                      tritonserver command line + a tritonclient call
      star_export_repository.json    what was written, from which export (marks the folder ours)
      prefill/config.pbtxt           generated from manifest["graphs"]["prefill"]
      prefill/1/model.{py,onnx,plan} per backend (python: model.py + model.onnx)
      decode/config.pbtxt            generated from manifest["graphs"]["decode"]
      decode/1/model.{py,onnx,plan}
      pipeline/config.pbtxt          Python backend, BLS: image bytes + prompt -> text + token ids
      pipeline/1/model.py            (star_export/triton_models/pipeline.py)
      pipeline/1/manifest.json, pipeline/1/processor/

Backends of the prefill/decode models:

* ``tensorrt``: ``platform: "tensorrt_plan"``, ``1/model.plan`` copied from the engines that
  ``python -m star_export build`` recorded under ``engines`` in the manifest (KIND_GPU,
  optimization profile "0", whose ranges are written into config.pbtxt as comments);
* ``onnxruntime``: ``platform: "onnxruntime_onnx"``, ``1/model.onnx`` (+ its external data file);
* ``python``: ``backend: "python"``, onnxruntime inside the Python backend (hosts whose Triton
  has only the Python backend, e.g. the ``nvidia-pytriton`` wheel's server).

Every config follows Triton's model configuration rules: ``max_batch_size`` > 0 (the batch
dim is the first dim of every tensor and is left out of ``dims``), other dynamic dims are -1,
dtypes map numpy names to ``TYPE_*``. :func:`write_cpp_header` writes the model constants the
C++ example (``examples/cpp``) is compiled with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from star_export import __version__
from star_export.errors import UsageError

BACKENDS = ("python", "onnxruntime", "tensorrt")
GRAPHS = ("prefill", "decode")
MARKER = "star_export_repository.json"
TEMPLATES = Path(__file__).parent / "triton_models"

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
)
PIPELINE_OUTPUTS = (
    ("text", "string", (1,), False, "the answer, detokenised (special tokens skipped)"),
    ("token_ids", "int64", (-1,), False, "generated ids incl. the stop token, padded with -1"),
)


@dataclass(frozen=True)
class RepositorySettings:
    backend: str = "python"
    max_new_tokens: int = 32  # the pipeline's default limit
    instances: int = 1  # instances of prefill and of decode
    pipeline_instances: int = 2  # concurrent pipeline requests
    device: str | None = None  # "cpu" | "gpu"; default gpu for tensorrt, cpu otherwise
    prefix: str = ""  # model name prefix, e.g. "llava_" -> llava_prefill, llava_decode, llava_pipeline
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
    models: dict[str, str]  # role (prefill/decode/pipeline) -> model name
    files: list[str] = field(default_factory=list)  # relative paths, sorted
    limits: dict[str, int] = field(default_factory=dict)  # batch / text_len / past_len maxima served

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


# ------------------------------------------------------------------------------------------ manifest
def read_export(from_dir: Path) -> dict[str, Any]:
    """The export's manifest.json, checked (one-line UsageErrors, as ``generate --from``)."""
    from star_export.manifest import read_manifest

    from_dir = Path(from_dir)
    if from_dir.exists() and not from_dir.is_dir():
        raise UsageError(f"--from {from_dir}: not a directory")
    manifest = read_manifest(from_dir)
    for key in ("star", "model", "image_token_id"):
        if key not in manifest:
            raise UsageError(f"--from {from_dir}: manifest.json has no {key!r}; re-export the directory")
    return manifest


def _batch_first(graph: Mapping[str, Any]) -> None:
    for t in (*graph["inputs"], *graph["outputs"]):
        if not t["shape"] or t["shape"][0] != "batch":
            raise UsageError(
                f"{graph['graph']}: tensor {t['name']} has shape {t['shape']}; Triton batching needs "
                "'batch' as the first dim of every tensor"
            )


def triton_dims(shape: Iterable[int | str]) -> list[int]:
    """A contract shape without its batch dim; symbolic dims (``text_len``, ``past_len + 17``) -> -1."""
    return [d if isinstance(d, int) else -1 for d in list(shape)[1:]]


def triton_dtype(dtype: str) -> str:
    try:
        return TRITON_DTYPES[dtype]
    except KeyError:
        raise UsageError(f"dtype {dtype!r} has no Triton equivalent") from None


def _dim_max(graph: Mapping[str, Any], name: str) -> int:
    return int(next(d["max"] for d in graph["dynamic_dims"] if d["name"] == name))


def _profile_max(engine: Mapping[str, Any], graph: Mapping[str, Any], symbol: str) -> int | None:
    """The engine's profile-0 max of a bare symbolic dim (e.g. ``past_len``), from its inputs."""
    profiles = engine.get("profiles") or []
    if not profiles:
        return None
    shapes = profiles[0].get("inputs", {})
    for t in graph["inputs"]:
        if t["name"] in shapes and symbol in t["shape"]:
            return int(shapes[t["name"]]["max"][t["shape"].index(symbol)])
    return None


# ------------------------------------------------------------------------------------------ engines
def _engine_file(from_dir: Path, entry: Mapping[str, Any]) -> Path | None:
    recorded = Path(str(entry.get("path") or entry.get("file") or ""))
    for candidate in (recorded, from_dir / recorded, from_dir / recorded.name):
        if str(candidate) not in ("", ".") and candidate.is_file():
            return candidate
    return None


def find_engines(from_dir: Path, manifest: Mapping[str, Any]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{graph: (engine file, manifest entry)} for prefill and decode, or a one-line UsageError."""
    engines = manifest.get("engines") or {}
    missing = [g for g in GRAPHS if g not in engines]
    if missing:
        raise UsageError(
            f"--backend tensorrt: {from_dir}/manifest.json records no TensorRT engine for "
            f"{', '.join(missing)}; build them on a host with TensorRT and a GPU "
            f"(python -m star_export build --from {from_dir}) or use --backend onnxruntime/python"
        )
    out = {}
    for g in GRAPHS:
        path = _engine_file(from_dir, engines[g])
        if path is None:
            raise UsageError(
                f"--backend tensorrt: the {g} engine recorded in manifest.json "
                f"({engines[g].get('path')}) is not there; rebuild or copy it into {from_dir}"
            )
        out[g] = (path, dict(engines[g]))
    return out


# ------------------------------------------------------------------------------------------ configs
def _q(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal (double quotes, escapes)


def _tensor_entries(entries: Iterable[tuple[str, str, list[int], bool]], indent: str = "  ") -> str:
    blocks = []
    for name, dtype, dims, optional in entries:
        lines = [
            f"{indent}{{",
            f"{indent}  name: {_q(name)}",
            f"{indent}  data_type: {triton_dtype(dtype)}",
            f"{indent}  dims: [ {', '.join(str(d) for d in dims)} ]",
        ]
        if optional:
            lines.append(f"{indent}  optional: true")
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
) -> str:
    lines = [f"# {c}" if c else "#" for c in comments]
    lines += [
        f"name: {_q(name)}",
        engine_line,
        f"max_batch_size: {max_batch_size}",
        "input [",
        _tensor_entries(inputs),
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
    lines += ["  }", "]"]
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{ key: {_q(key)} value: {{ string_value: {_q(value)} }} }}")
    return "\n".join(lines) + "\n"


ENGINE_LINES = {
    "python": 'backend: "python"',
    "onnxruntime": 'platform: "onnxruntime_onnx"',
    "tensorrt": 'platform: "tensorrt_plan"',
}


def _profile_comments(engine_path: Path, entry: Mapping[str, Any], max_batch: int) -> list[str]:
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
    """config.pbtxt of the prefill or decode model, from the manifest's graph entry."""
    _batch_first(graph)
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


def pipeline_config(settings: RepositorySettings, max_batch_size: int, limits: Mapping[str, int]) -> str:
    return _config_text(
        name=settings.name("pipeline"),
        engine_line=ENGINE_LINES["python"],
        max_batch_size=max_batch_size,
        inputs=[(n, d, list(s), o) for n, d, s, o, _ in PIPELINE_INPUTS],
        outputs=[(n, d, list(s), o) for n, d, s, o, _ in PIPELINE_OUTPUTS],
        kind="KIND_CPU",
        count=settings.pipeline_instances,
        parameters={
            "prefill_model": settings.name("prefill"),
            "decode_model": settings.name("decode"),
            "max_new_tokens": str(settings.max_new_tokens),
            **{f"{k}_max": str(v) for k, v in limits.items()},
        },
        comments=[
            f"Generated by star_export {__version__}: image bytes + prompt -> text, greedy, BLS over",
            f"{settings.name('prefill')} and {settings.name('decode')} (see 1/model.py).",
        ],
    )


# ------------------------------------------------------------------------------------------ files
def _external_data(onnx_path: Path) -> list[Path]:
    """Files an ONNX model's tensors point to (external data), e.g. ``prefill.onnx.data``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    names = set()
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names |= {e.value for e in t.external_data if e.key == "location"}
    return [onnx_path.parent / n for n in sorted(names)]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _template(name: str) -> Path:
    path = TEMPLATES / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: Triton model template missing from the star_export installation "
            "(package data star_export/triton_models/*.py)"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_repo_path(repo: Path) -> None:
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"--repo {repo}: exists and is not a directory")
    if repo.is_dir() and any(repo.iterdir()) and not (repo / MARKER).is_file():
        raise UsageError(
            f"--repo {repo}: exists, is not empty and was not written by star_export; "
            "choose a new path (the whole directory is replaced)"
        )
    probe = repo if repo.exists() else next((p for p in repo.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--repo {repo}: not writable")


def _replace_dir(stage: Path, repo: Path) -> None:
    """Move ``stage`` to ``repo`` by rename; an old repository is moved aside first, then removed."""
    old = None
    if repo.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{repo.name}.old-", dir=repo.parent))
        old.rmdir()
        os.rename(repo, old)
    try:
        os.rename(stage, repo)
    except OSError:
        if old is not None:
            os.rename(old, repo)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ writer
def write_repository(
    from_dir: Path,
    repo: Path,
    backend: str = "python",
    max_new_tokens_default: int = 32,
    *,
    instances: int = 1,
    pipeline_instances: int = 2,
    device: str | None = None,
    prefix: str = "",
    intra_op_threads: int = 0,
) -> Repository:
    """Write a Triton model repository for the export in ``from_dir`` to ``repo`` (atomically).

    Raises UsageError (one line) for a bad ``from_dir``/``repo``/backend, or a tensorrt backend
    whose engines are not recorded in the manifest.
    """
    from_dir, repo = Path(from_dir), Path(repo)
    settings = RepositorySettings(
        backend=backend,
        max_new_tokens=max_new_tokens_default,
        instances=instances,
        pipeline_instances=pipeline_instances,
        device=device,
        prefix=prefix,
        intra_op_threads=intra_op_threads,
    )
    _check_settings(settings)
    manifest = read_export(from_dir)
    graphs = manifest["graphs"]
    for g in GRAPHS:
        _batch_first(graphs[g])
    _check_repo_path(repo)
    engines = find_engines(from_dir, manifest) if backend == "tensorrt" else {}

    # Limits the repository serves: the engines' profiles (tensorrt) or the export's ranges.
    limits = {
        "batch": min(_dim_max(graphs[g], "batch") for g in GRAPHS),
        "text_len": _dim_max(graphs["prefill"], "text_len"),
        "past_len": _dim_max(graphs["decode"], "past_len"),
    }
    if engines:
        for key, g in (
            ("batch", "prefill"),
            ("batch", "decode"),
            ("text_len", "prefill"),
            ("past_len", "decode"),
        ):
            got = _profile_max(engines[g][1], graphs[g], key)
            if got is not None:
                limits[key] = min(limits[key], got) if key == "batch" else got
    star = manifest["star"]
    shortest_prompt = min(d["min"] for d in graphs["prefill"]["dynamic_dims"] if d["name"] == "text_len")
    longest_answer = limits["past_len"] - (shortest_prompt - 1 + int(star.get("span2", star["keep2"]))) + 1
    if settings.max_new_tokens > longest_answer:
        raise UsageError(
            f"--max-new-tokens {settings.max_new_tokens}: the decode profile allows at most "
            f"{longest_answer} new tokens (past_len max {limits['past_len']})"
        )

    repo.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{repo.name}.staging-", dir=repo.parent))
    try:
        models = {role: settings.name(role) for role in (*GRAPHS, "pipeline")}
        for g in GRAPHS:
            _write_graph_model(
                stage / models[g], from_dir, graphs[g], settings, limits["batch"], engines.get(g)
            )
        _write_pipeline(stage / models["pipeline"], from_dir, manifest, settings, limits)
        files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        result = Repository(path=repo, backend=backend, models=models, files=files, limits=limits)
        (stage / "README.md").write_text(repository_readme(result, manifest, from_dir, settings))
        marker = {
            "star_export": __version__,
            "from": str(from_dir.resolve()),
            "manifest_sha256": _sha256(from_dir / "manifest.json"),
            "settings": asdict(settings),
            **{k: v for k, v in result.to_dict().items() if k not in ("path",)},
        }
        (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        result.files = sorted({*files, "README.md", MARKER})
        os.chmod(stage, 0o755)
        _replace_dir(stage, repo)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


def _check_settings(s: RepositorySettings) -> None:
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


def _write_graph_model(
    model_dir: Path,
    from_dir: Path,
    graph: Mapping[str, Any],
    settings: RepositorySettings,
    max_batch: int,
    engine: tuple[Path, dict[str, Any]] | None,
) -> None:
    version = model_dir / "1"
    onnx_path = from_dir / graph.get("file", f"{graph['graph']}.onnx")
    comments = [
        f"Generated by star_export {__version__} from manifest.json ({graph['graph']} graph): do not edit;",
        "regenerate with python -m star_export triton. Dims leave out the batch dim (max_batch_size > 0);",
        "-1 marks a dynamic dim: "
        + ", ".join(
            f"{d['name']} {d['min']}..{d['max']}" for d in graph["dynamic_dims"] if d["name"] != "batch"
        )
        + ".",
    ]
    parameters: dict[str, str] = {}
    if settings.backend == "tensorrt":
        assert engine is not None
        _copy(engine[0], version / "model.plan")
        comments += _profile_comments(engine[0], engine[1], max_batch)
    elif settings.backend == "onnxruntime":
        _copy(onnx_path, version / "model.onnx")
        for data in _external_data(onnx_path):
            _copy(data, version / data.name)  # the graph refers to it by this name
    else:
        _copy(_template("onnx_graph.py"), version / "model.py")
        _copy(onnx_path, version / "model.onnx")
        for data in _external_data(onnx_path):
            _copy(data, version / data.name)
        parameters = {"onnx_file": "model.onnx", "intra_op_num_threads": str(settings.intra_op_threads)}
    (model_dir / "config.pbtxt").write_text(
        graph_config(graph, settings, max_batch_size=max_batch, comments=comments, parameters=parameters)
    )


def _write_pipeline(
    model_dir: Path,
    from_dir: Path,
    manifest: Mapping[str, Any],
    settings: RepositorySettings,
    limits: Mapping[str, int],
) -> None:
    version = model_dir / "1"
    _copy(_template("pipeline.py"), version / "model.py")
    _copy(from_dir / "manifest.json", version / "manifest.json")
    processor = from_dir / ((manifest.get("tokenizer") or {}).get("directory") or "processor")
    if not processor.is_dir() or not any(processor.iterdir()):
        raise UsageError(
            f"--from {from_dir}: no processor/ (tokenizer, chat template, image processor) for the "
            "pipeline model; re-export with python -m star_export llava"
        )
    shutil.copytree(processor, version / "processor")
    (model_dir / "config.pbtxt").write_text(pipeline_config(settings, limits["batch"], limits))


# ------------------------------------------------------------------------------------------ README
def repository_readme(
    repo: Repository, manifest: Mapping[str, Any], from_dir: Path, settings: RepositorySettings
) -> str:
    m = repo.models
    star = manifest["star"]
    backend_note = {
        "python": "prefill and decode run the exported ONNX graphs in onnxruntime inside Triton's Python "
        "backend (works with any Triton that has the Python backend, including the `nvidia-pytriton` "
        "wheel's CPU server). The Python environment of the backend stub needs `numpy`, `onnxruntime`, "
        "`pillow` and `transformers`.",
        "onnxruntime": "prefill and decode use Triton's ONNX Runtime backend (`onnxruntime_onnx`). The "
        "pipeline model (Python backend) needs `numpy`, `pillow` and `transformers` in the stub's "
        "Python environment.",
        "tensorrt": "prefill and decode use Triton's TensorRT backend (`tensorrt_plan`, KIND_GPU, "
        "optimization profile 0). Engines only load on the GPU model and TensorRT version they were "
        "built with. The pipeline model (Python backend) needs `numpy`, `pillow`, `transformers` and, "
        "to read GPU outputs, `torch` in the stub's Python environment.",
    }[repo.backend]
    layout = "\n".join(f"    {f}" for f in repo.files if not f.startswith(f"{m['pipeline']}/1/processor/"))
    return f"""# Triton model repository for a STAR-pruned LLaVA

Written by `python -m star_export triton --from {from_dir} --backend {repo.backend}` (star_export
{__version__}) from `{manifest["model"]["source"]}`: {star["N"]} visual tokens -> {star["keep1"]}
(stage 1) -> {star["keep2"]} (stage 2, from decoder layer {star["layer_K"]}). Do not edit the
`config.pbtxt` files by hand: they are generated from the export's manifest.json.

Backend: {backend_note}

## Models

| model | what it does |
| --- | --- |
| `{m["prefill"]}` | prefill graph: `pixel_values`, `input_ids`, `attention_mask` -> `logits`, kept indices, `present.{{i}}.key/value` |
| `{m["decode"]}` | one decode step with per-layer pasts (L1 slots before layer K, L2 from K on) |
| `{m["pipeline"]}` | Python backend (BLS): image bytes + prompt -> `text`, `token_ids` (greedy) |

Limits served: batch <= {repo.limits["batch"]} rows per request, prompts <= {repo.limits["text_len"]}
tokens, past length <= {repo.limits["past_len"]} (prompt - 1 + {star.get("span2", star["keep2"])} + new tokens - 1).
Default `max_new_tokens`: {settings.max_new_tokens} (config parameter of `{m["pipeline"]}`).

Layout:

{layout}
    {m["pipeline"]}/1/processor/...

## Start the server

```bash
tritonserver --model-repository=$PWD/{repo.path.name} \\
    --http-port=8000 --grpc-port=8001 --metrics-port=8002
curl -s localhost:8000/v2/health/ready && echo ready
```

- The Python backend's stub imports its packages from the `python3` first on `PATH` (not from
  `PYTHONPATH`); that environment needs the packages named above.
- Stubs built before numpy 2 (Triton 24.10, e.g. the `nvidia-pytriton` 0.7 wheel's server) read
  every tensor wrongly under numpy 2; the models here then refuse to load with a message saying
  so. Give the stub an environment with `numpy<2`.
- Large models: raise the Python backend's shared memory, e.g.
  `--backend-config=python,shm-default-byte-size=67108864`. Every decode step hands the
  per-layer caches from one BLS call to the next as DLPack tensors (renamed, not copied by the
  pipeline's code); only the logits are read on the host. This path has been run on CPU only.

## Ask a question

```python
import numpy as np
import tritonclient.http as httpclient  # pip install "tritonclient[http,grpc]"

client = httpclient.InferenceServerClient("localhost:8000")
image = np.array([[open("cat.png", "rb").read()]], dtype=object)  # [batch, 1] bytes
prompt = np.array([["What is in the image?".encode()]], dtype=object)
limit = np.array([[{settings.max_new_tokens}]], dtype=np.int32)  # optional
inputs = [
    httpclient.InferInput("image", image.shape, "BYTES"),
    httpclient.InferInput("prompt", prompt.shape, "BYTES"),
    httpclient.InferInput("max_new_tokens", limit.shape, "INT32"),
]
for tensor, data in zip(inputs, (image, prompt, limit)):
    tensor.set_data_from_numpy(data)
result = client.infer("{m["pipeline"]}", inputs)
print(result.as_numpy("text")[0, 0].decode(), result.as_numpy("token_ids")[0])
```

gRPC is the same with `tritonclient.grpc` and port 8001. `token_ids` rows are padded with -1
after the last generated token (the stop token, when one was produced, is included).
star_export's tests start a real `tritonserver` on a `--backend python` repository and check that
its answers equal `python -m star_export generate --from DIR` (greedy, onnxruntime) token for
token; the onnxruntime and tensorrt backends run the same graphs with their own kernels.
"""


# ------------------------------------------------------------------------------------------ C++
def cpp_header(manifest: Mapping[str, Any]) -> str:
    """``star_model.h`` for examples/cpp: the model constants, from the manifest (never by hand)."""
    geo, star, graphs = manifest["model"]["geometry"], manifest["star"], manifest["graphs"]
    if geo.get("arch", "llava") != "llava":
        raise UsageError(
            f"--cpp-header: examples/cpp drives LLaVA-1.5 exports (pixel_values [B, 3, S, S]); this export is "
            f"{geo['arch']} (pixel_values {['B', *geo['pixel_shape']]}): use the manifest's tensor table"
        )
    consts = [
        (
            "int32_t",
            "kNumLayers",
            geo["num_layers"],
            "decoder layers: present.{i}.* / past.{i}.*, i < kNumLayers",
        ),
        (
            "int32_t",
            "kLayerK",
            star["layer_K"],
            "layers < K hold L1 = T - 1 + kKeep1 slots, layers >= K hold L2",
        ),
        ("int64_t", "kNVisual", star["N"], "visual tokens before pruning (positions continue after N)"),
        ("int64_t", "kKeep1", star["keep1"], "visual tokens kept by stage 1"),
        ("int64_t", "kKeep2", star["keep2"], "visual tokens kept by stage 2"),
        ("int64_t", "kImageSize", geo["image_size"], "pixel_values: [B, 3, kImageSize, kImageSize]"),
        ("int64_t", "kVocab", geo["vocab_size"], "logits: [B, kVocab]"),
        ("int64_t", "kKvHeads", geo["num_kv_heads"], "present/past: [B, kKvHeads, S, kHeadDim]"),
        ("int64_t", "kHeadDim", geo["head_dim"], ""),
        ("int64_t", "kImageTokenId", manifest["image_token_id"], "the ONE placeholder per prompt row"),
        ("int64_t", "kMaxBatch", min(_dim_max(graphs[g], "batch") for g in GRAPHS), "profile maxima"),
        ("int64_t", "kMaxTextLen", _dim_max(graphs["prefill"], "text_len"), ""),
        ("int64_t", "kMaxPastLen", _dim_max(graphs["decode"], "past_len"), "stage-2 past length"),
    ]
    body = "\n".join(
        f"constexpr {t} {n} = {int(v)};" + (f"  // {doc}" if doc else "") for t, n, v, doc in consts
    )
    return f"""// Generated by star_export {__version__} from manifest.json of {manifest["model"]["source"]}
// (keep1={star["keep1"]}, keep2={star["keep2"]}, K={star["layer_K"]}): do not edit. Regenerate with
//   python -m star_export triton --from OUT_DIR --cpp-header examples/cpp/star_model.h
#pragma once
#include <cstdint>

namespace star_model {{
{body}
}}  // namespace star_model
"""


def write_cpp_header(from_dir: Path, path: Path) -> Path:
    manifest = read_export(Path(from_dir))
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--cpp-header {path}: is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(cpp_header(manifest))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ CLI
EPILOG = """\
examples:
  python -m star_export llava --keep 64 --out star_out
  python -m star_export triton --from star_out --repo model_repository
      Python-backend repository (onnxruntime inside Triton; runs on the nvidia-pytriton CPU server)
  python -m star_export triton --from star_out --repo model_repository --backend tensorrt
      after `python -m star_export build --from star_out` on a GPU host (engines in the manifest)
  python -m star_export triton --from star_out --cpp-header examples/cpp/star_model.h
"""


def add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m star_export triton``."""
    parser.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="an output directory of `llava` (manifest.json, prefill.onnx, decode.onnx, processor/)",
    )
    parser.add_argument(
        "--repo", type=Path, default=None, metavar="DIR", help="model repository to write (replaced whole)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="python",
        help="prefill/decode models: python (onnxruntime in the Python backend, default), "
        "onnxruntime (onnxruntime_onnx), tensorrt (tensorrt_plan; needs engines from `build`)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="pipeline's default limit (default 32)"
    )
    parser.add_argument("--instances", type=int, default=1, metavar="N", help="instances of prefill/decode")
    parser.add_argument(
        "--pipeline-instances",
        type=int,
        default=2,
        metavar="N",
        help="concurrent pipeline requests (default 2)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default=None,
        help="instance kind (default gpu for tensorrt, else cpu)",
    )
    parser.add_argument("--prefix", default="", help="model name prefix, e.g. llava_ (default none)")
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N", help="python backend: onnxruntime threads per instance"
    )
    parser.add_argument(
        "--cpp-header",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the C++ example's star_model.h",
    )
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")


def run_triton(args: argparse.Namespace) -> int:
    """``python -m star_export triton``: 0 on success; UsageError (exit 2) for bad input."""
    if args.repo is None and args.cpp_header is None:
        raise UsageError("give --repo DIR (a Triton model repository) and/or --cpp-header FILE")
    out: dict[str, Any] = {}
    if args.repo is not None:
        result = write_repository(
            args.from_dir,
            args.repo,
            args.backend,
            args.max_new_tokens,
            instances=args.instances,
            pipeline_instances=args.pipeline_instances,
            device=args.device,
            prefix=args.prefix,
            intra_op_threads=args.threads,
        )
        out["repository"] = result.to_dict()
    if args.cpp_header is not None:
        out["cpp_header"] = str(write_cpp_header(args.from_dir, args.cpp_header))
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2))
        return 0
    if "repository" in out:
        r = out["repository"]
        print(f"wrote {r['path']}/ ({r['backend']} backend): models {', '.join(r['models'].values())}")
        print(f"  limits: batch <= {r['limits']['batch']}, prompt <= {r['limits']['text_len']} tokens")
        print(
            f"  serve:  tritonserver --model-repository=$PWD/{Path(r['path']).name}   (see {r['path']}/README.md)"
        )
    if "cpp_header" in out:
        print(f"wrote {out['cpp_header']}")
    return 0
