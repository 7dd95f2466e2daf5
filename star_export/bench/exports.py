"""The bench's graphs on disk: prefill / decode / the STAR scoring subgraph, exported once and cached.

Each graph's ``.key`` file records what it was exported from (the job, the sources that shape
the graphs, library versions, the weights' files); a graph whose key matches is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from star_export import cost as cost_mod
from star_export import star
from star_export.bench.timing import Log
from star_export.bench.variants import bench_inputs, scoring_inputs
from star_export.geometry import Geometry
from star_export.star import StarConfig


class StarScoring(torch.nn.Module):
    """STAR's scoring and selection alone: exactly the ``star.py`` calls of ``StarPrefill``.

    features (B, N, dv) from the vision tower, probs (B, H, L1, L1) of layer K-1, input_ids (B, T)
    -> stage1_keep_idx (B, keep1), stage2_keep_idx (B, keep2).
    """

    def __init__(self, cfg: StarConfig, image_token_id: int):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id

    def forward(self, features: torch.Tensor, probs: torch.Tensor, input_ids: torch.Tensor):
        cfg = self.cfg
        p = star.image_position(input_ids, self.image_token_id)  # (B,)
        keep1_idx = star.topk_sorted(star.stage1_scores(features), cfg.keep1)  # (B, keep1)
        selected = star.topk_sorted(star.stage2_scores(probs, p, cfg.keep1), cfg.keep2)  # (B, keep2)
        return keep1_idx, torch.gather(keep1_idx, 1, selected)


def export_scoring(cfg: StarConfig, geo: Geometry, example: dict[str, np.ndarray], path: Path) -> Path:
    """``StarScoring`` -> ONNX (dynamic batch, everything else static), like the prefill export."""
    module = StarScoring(cfg, geo.image_token_id).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    args = tuple(
        torch.from_numpy(np.repeat(example[k][:1], 2, axis=0)) for k in ("features", "probs", "input_ids")
    )
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=["features", "probs", "input_ids"],
            output_names=["stage1_keep_idx", "stage2_keep_idx"],
            dynamic_shapes={"features": {0: batch}, "probs": {0: batch}, "input_ids": {0: batch}},
            opset_version=18,
            optimize=True,
        )
        program.save(str(path), external_data=False)
    return path


def _source_digest() -> str:
    """Hash of the sources that shape the exported graphs (a changed rewrite or family re-exports)."""
    here = Path(__file__).resolve().parent.parent  # star_export/
    h = hashlib.sha256()
    names = ["rewrite.py", "star.py", "onnx_export.py", "contract.py", "bench/exports.py"]
    names += sorted(str(p.relative_to(here)) for p in (here / "families").glob("*.py"))
    for name in names:
        h.update((here / name).read_bytes())
    import onnxscript

    h.update(f"{torch.__version__} {onnxscript.__version__}".encode())
    return h.hexdigest()[:16]


@dataclass
class ExportJob:
    """One graph to export: ``prefill`` / ``decode`` (the product's graphs, through
    ``export.export_onnx`` and the contract) or ``scoring`` (``StarScoring``)."""

    graph: str  # prefill | decode | scoring
    tag: str  # unpruned | keep64 ...
    model_dir: str
    cfg: dict[str, int]
    batch: tuple[int, int, int]
    text_len: tuple[int, int, int]
    max_new_tokens: int
    prompt: tuple[int, int]  # the bench prompt: text tokens, placeholder index
    path: str

    def key(self) -> str:
        """Everything the graph depends on: job, sources and library versions, the weights' files."""
        weights = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in Path(self.model_dir).glob("*.safetensors")
        )
        return json.dumps(
            {**asdict(self), "path": None, "source": _source_digest(), "weights": weights}, sort_keys=True
        )


_WORKER_MODELS: dict[str, Any] = {}


def _export_job(job: ExportJob, loaded: Any = None) -> float:
    """Export one graph (in a worker process, or inline with the caller's model); returns seconds."""
    import logging

    from star_export.contract import decode_contract, prefill_contract
    from star_export.load import load
    from star_export.onnx_export import example_decode_inputs, export_onnx

    for name in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    start = time.perf_counter()
    if loaded is None:
        if job.model_dir not in _WORKER_MODELS:
            _WORKER_MODELS[job.model_dir] = load(job.model_dir)
        loaded = _WORKER_MODELS[job.model_dir]
    geo, cfg = loaded.geometry, StarConfig(**job.cfg)
    path = Path(job.path)
    key_file = path.with_name(path.name + ".key")
    key_file.unlink(missing_ok=True)  # a failed export never leaves a graph that looks up to date
    path.parent.mkdir(parents=True, exist_ok=True)
    if job.graph == "prefill":
        contract = prefill_contract(geo, cfg, job.batch, job.text_len)
        module = loaded.family.prefill_module(loaded.model, geo, cfg).eval()
        export_onnx(module, contract, path, geo.image_token_id, external_data=True)
    elif job.graph == "decode":
        contract = decode_contract(geo, cfg, job.batch, job.text_len, job.max_new_tokens)
        module = loaded.family.decode_module(loaded.model, geo, cfg).eval()
        export_onnx(module, contract, path, example_args=example_decode_inputs(contract), external_data=True)
    else:
        dims = cost_mod.ModelDims.from_config(loaded.model.config)
        feeds = bench_inputs(geo, 1, *job.prompt)
        export_scoring(cfg, geo, scoring_inputs(geo, dims, cfg, feeds), path)
    key_file.write_text(job.key())
    return time.perf_counter() - start


def _export_worker_init() -> None:
    torch.set_num_threads(1)


def export_graphs(
    jobs: Sequence[ExportJob], workers: int, log: Log, loaded: Any = None
) -> list[dict[str, Any]]:
    """Run the export jobs whose graph is not already on disk with the same key.

    ``workers > 1`` runs them in spawned processes, longest first (the exporter is
    single-threaded Python: two workers on two cores halve the time); inline otherwise, with
    ``loaded`` (the caller's model) when given.
    """
    records: list[dict[str, Any]] = []
    todo = []
    for job in jobs:
        key_file = Path(job.path + ".key")
        if Path(job.path).is_file() and key_file.is_file() and key_file.read_text() == job.key():
            records.append(
                {"graph": job.graph, "tag": job.tag, "path": job.path, "seconds": 0.0, "cached": True}
            )
            log(f"      {job.tag}/{Path(job.path).name}: up to date, reused")
        else:
            todo.append(job)
    order = {"prefill": 0, "decode": 1, "scoring": 2}
    todo.sort(key=lambda j: order.get(j.graph, 3))
    start = time.perf_counter()

    def done(job: ExportJob, secs: float) -> None:
        records.append(
            {"graph": job.graph, "tag": job.tag, "path": job.path, "seconds": secs, "cached": False}
        )
        log(
            f"      {job.tag}/{Path(job.path).name} ({secs:.1f}s; {time.perf_counter() - start:.0f}s elapsed)"
        )

    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            done(job, _export_job(job, loaded))
        return records
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(
        min(workers, len(todo)), mp_context=ctx, initializer=_export_worker_init
    ) as pool:
        futures = {pool.submit(_export_job, job): job for job in todo}
        for fut in cf.as_completed(futures):
            done(futures[fut], fut.result())
    return records
