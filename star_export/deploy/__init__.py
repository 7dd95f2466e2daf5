"""Stage 6 of the data's way: an export directory -> a Triton model repository (+ the C++ header).

:func:`write_repository` (``from_dir, repo, backend``) reads ``manifest.json`` (the I/O contract,
written once by the exporter) and writes, atomically (staging directory + rename)::

    repo/
      README.md                      tritonserver command line + a tritonclient call
      star_export_repository.json    what was written, from which export (marks the folder ours)
      prefill/config.pbtxt           generated from manifest["graphs"]["prefill"]
      prefill/1/model.{py,onnx,plan} per backend (python: model.py + model.onnx + weights.onnx.data)
      decode/config.pbtxt            generated from manifest["graphs"]["decode"]
      decode/1/model.{py,onnx,plan}
      pipeline/config.pbtxt          Python backend, BLS: image bytes + prompt (+ keep) -> text + token ids
      pipeline/1/model.py            (star_export/triton_models/pipeline.py)
      pipeline/1/manifest.json, pipeline/1/processor/
      pipeline_stream/               the same, decoupled: one response per token (unless stream=False)

An export with several keep levels (``--keep 32,64,128``) gets one prefill model per level, named
after its graph (``prefill_k32``, ``prefill_k64``, ``prefill_k128``), and ONE decode model; the
pipeline's optional ``keep`` input picks the level per request. The export stores its weights once
(``weights.onnx.data``); each ONNX model directory needs that file beside its ``model.onnx``, so it
is hard-linked there (copied where the filesystem has no hard links).

Backends of the prefill/decode models:

* ``tensorrt``: ``platform: "tensorrt_plan"``, ``1/model.plan`` linked or copied from the engines
  that ``python -m star_export build`` recorded under ``engines`` in the manifest (KIND_GPU,
  optimization profile "0", whose ranges are written into config.pbtxt as comments);
* ``onnxruntime``: ``platform: "onnxruntime_onnx"``, ``1/model.onnx`` (+ its external data file);
* ``python``: ``backend: "python"``, onnxruntime inside the Python backend (hosts whose Triton
  has only the Python backend, e.g. the ``nvidia-pytriton`` wheel's server).

This module holds the writer, the stage's entry point; one job per submodule:
:mod:`~star_export.deploy.settings` (what is asked for), :mod:`~star_export.deploy.source` (the
export, its engines, the limits served), :mod:`~star_export.deploy.config` (config.pbtxt text),
:mod:`~star_export.deploy.files` (copies, atomic replacement), :mod:`~star_export.deploy.models`
(one model directory), :mod:`~star_export.deploy.readme`, :mod:`~star_export.deploy.cpp_header`
(``star_model.h`` for ``examples/cpp``), :mod:`~star_export.deploy.command` (the ``triton``
command) and :mod:`~star_export.deploy.server` (a real tritonserver on this kind of machine, for the
``serve`` command and the tests).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from star_export import __version__
from star_export.deploy.command import EPILOG, add_triton_arguments, run_triton
from star_export.deploy.config import (
    ENGINE_LINES,
    PIPELINE_INPUTS,
    PIPELINE_OUTPUTS,
    TRITON_DTYPES,
    graph_config,
    pipeline_config,
    triton_dims,
    triton_dtype,
)
from star_export.deploy.cpp_header import cpp_header, write_cpp_header
from star_export.deploy.files import MARKER, TEMPLATES, check_repo_path, replace_dir, sha256

# The writer looks its model writers up in this module (a test replaces _write_pipeline to fail midway).
from star_export.deploy.models import write_graph_model as _write_graph_model
from star_export.deploy.models import write_pipeline as _write_pipeline
from star_export.deploy.readme import repository_readme
from star_export.deploy.settings import (
    BACKENDS,
    Repository,
    RepositorySettings,
    check_settings,
    thread_budget,
)
from star_export.deploy.source import (
    batch_first,
    check_servable,
    find_engines,
    graph_names,
    levels_of,
    longest_answer,
    read_export,
    served_limits,
)
from star_export.errors import UsageError

__all__ = [
    "BACKENDS",
    "ENGINE_LINES",
    "EPILOG",
    "MARKER",
    "PIPELINE_INPUTS",
    "PIPELINE_OUTPUTS",
    "TEMPLATES",
    "TRITON_DTYPES",
    "Repository",
    "RepositorySettings",
    "add_triton_arguments",
    "cpp_header",
    "find_engines",
    "graph_config",
    "graph_names",
    "pipeline_config",
    "read_export",
    "repository_readme",
    "run_triton",
    "triton_dims",
    "triton_dtype",
    "write_cpp_header",
    "write_repository",
]


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
    cores: int = 0,
    batch_delay_us: int = 2000,
    pipeline_max_batch: int = 0,
    max_queue: int = 64,
    queue_timeout_s: float = 60.0,
    stream: bool = True,
    weights: str = "decode-packed",
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
        cores=cores,
        batch_delay_us=batch_delay_us,
        pipeline_max_batch=pipeline_max_batch,
        max_queue=max_queue,
        queue_timeout_s=queue_timeout_s,
        stream=stream,
        weights=weights,
    )
    check_settings(settings)
    manifest = read_export(from_dir)
    check_servable(from_dir, manifest)  # bf16: refused here, not at the server's first request
    graphs = manifest["graphs"]
    names = graph_names(manifest)  # every level's prefill graph, then decode
    settings = thread_budget(settings, len(names))  # onnxruntime threads from the cores, written down
    for g in names:
        batch_first(graphs[g])
    check_repo_path(repo)
    engines = find_engines(from_dir, manifest) if backend == "tensorrt" else {}

    # Limits the repository serves: the engines' profiles (tensorrt) or the export's ranges.
    limits = served_limits(graphs, engines, names)
    levels = levels_of(manifest)
    shortest_prompt = min(
        d["min"] for g in names[:-1] for d in graphs[g]["dynamic_dims"] if d["name"] == "text_len"
    )
    longest, tightest = longest_answer(limits, levels, shortest_prompt)
    if settings.max_new_tokens > longest:
        raise UsageError(
            f"--max-new-tokens {settings.max_new_tokens}: the decode profile allows at most {longest} new "
            f"tokens at keep {tightest} (past_len_l1 max {limits['past_len_l1']}, past_len_l2 max "
            f"{limits['past_len_l2']})"
        )

    repo.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{repo.name}.staging-", dir=repo.parent))
    try:
        pipelines = ("pipeline", "pipeline_stream") if settings.stream else ("pipeline",)
        models = {g: settings.name(g) for g in (*names, *pipelines)}
        linked: list[Path] = []
        for g in names:
            linked += _write_graph_model(
                stage / models[g], from_dir, graphs[g], settings, limits["batch"], engines.get(g)
            )
        prefill_models = {int(lv["keep2"]): models[lv["graph"]] for lv in levels}
        _write_pipeline(stage / models["pipeline"], from_dir, manifest, settings, limits, prefill_models)
        files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        result = Repository(
            path=repo,
            backend=backend,
            models=models,
            files=files,
            limits=limits,
            levels=[
                {k: lv[k] for k in ("keep1", "keep2", "span1", "span2", "keep_range") if k in lv}
                | {"model": models[lv["graph"]]}
                for lv in levels
            ],
            linked=sorted(str(p.relative_to(stage)) for p in linked),
        )
        (stage / "README.md").write_text(repository_readme(result, manifest, from_dir, settings))
        marker = {
            "star_export": __version__,
            "from": str(from_dir.resolve()),
            "manifest_sha256": sha256(from_dir / "manifest.json"),
            "settings": asdict(settings),
            **{k: v for k, v in result.to_dict().items() if k not in ("path",)},
        }
        (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        result.files = sorted({*files, "README.md", MARKER})
        os.chmod(stage, 0o755)
        replace_dir(stage, repo)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result
