"""The README.md of a written repository: how to start tritonserver and ask a question."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from star_export import __version__
from star_export.deploy.settings import Repository, RepositorySettings


def repository_readme(
    repo: Repository, manifest: Mapping[str, Any], from_dir: Path, settings: RepositorySettings
) -> str:
    """README.md of the repository: models, limits, how to start the server and ask a question."""
    m = repo.models
    star = manifest["star"]
    levels = repo.levels
    default = levels[0]
    several = len(levels) > 1 or "keep_range" in default  # a keep range: any keep in it per request
    keeps = ", ".join(
        f"any of {lv['keep_range']['min']}..{lv['keep_range']['max']}"
        if "keep_range" in lv
        else str(lv["keep2"])
        for lv in levels
    )
    prefill_rows = "\n".join(
        f"| `{lv['model']}` | prefill graph, keep {lv['keep1']} -> {lv['keep2']}"
        + (" (the default level)" if several and lv is default else "")
        + ": `pixel_values`, `input_ids`, `attention_mask` -> `logits`, kept indices, `present.{i}.key/value` |"
        for lv in levels
    )
    spans = "; ".join(
        f"keep {lv['keep2']}: L1 = prompt - 1 + {lv['span1']}, L2 = prompt - 1 + {lv['span2']}"
        for lv in levels
    )
    keep_input = (
        f"""
keep = np.array([[{levels[-1]["keep2"]}]], dtype=np.int32)  # optional: one of {keeps} (default {default["keep2"]})"""
        if several
        else ""
    )
    keep_tensor = (
        """
    httpclient.InferInput("keep", keep.shape, "INT32"),"""
        if several
        else ""
    )
    keep_data = ", keep" if several else ""
    big = [f for f in repo.files if f.endswith(".onnx.data")]
    linked = len(set(repo.linked) & set(big))
    if linked == len(big):
        how = f"Here all {linked} are hard links to the export's file (one copy on disk)."
    elif linked:
        how = f"Here {linked} of {len(big)} are hard links to the export's file; the others are copies."
    else:
        how = "Here they are copies (this filesystem gave no hard links)."
    weights_note = (
        "Each ONNX model directory holds the graph's external data beside `model.onnx`, under the name "
        f"the graph refers to (the export stores its weights once, in `weights.onnx.data`). {how}"
        if big and repo.backend != "tensorrt"
        else ""
    )
    levels_text = (
        f"""
## Keep levels

This export holds {len(levels)} keep levels ({keeps}): one prefill model each, ONE decode model for
all (its two past lengths, L1 before layer K and L2 from K on, are dynamic). A request picks its
level with the optional `keep` input (INT32, one value per request; rows of one request share it),
default {default["keep2"]}. A keep the export does not hold is answered with an error that names the
levels; re-export with `--keep` to add one.
"""
        if several
        else ""
    )
    serve_note = (
        "On a CPU machine with the `nvidia-pytriton` wheel's server (`bash tools/install_triton_server.sh`), "
        "one command sets it up and starts it on loopback (Ctrl-C stops it):\n\n```bash\n"
        f"python -m star_export serve --repo {shlex.quote(str(repo.path.resolve()))}\n```\n\n"
        "With a full Triton (the NGC container on a GPU host):\n\n"
        if repo.backend == "python"
        else ""
    )
    backend_note = {
        "python": "prefill and decode run the exported ONNX graphs in onnxruntime inside Triton's Python "
        "backend (works with any Triton that has the Python backend, including the `nvidia-pytriton` "
        "wheel's CPU server). The Python environment of the backend stub needs `numpy`, `onnxruntime`, "
        "`pillow` and `transformers`.",
        "onnxruntime": "prefill and decode use Triton's ONNX Runtime backend (`onnxruntime_onnx`). The "
        "pipeline model (Python backend) needs `numpy`, `pillow` and `transformers` in the stub's "
        "Python environment.",
        "tensorrt": "prefill and decode use Triton's TensorRT backend (`tensorrt_plan`, KIND_GPU, "
        "optimization profile 0). Engines load only on the GPU model and TensorRT version they were "
        "built with, unless `build` was given `--version-compatible` / `--hardware-compatibility-level` "
        "(the manifest's engine_build records which). The pipeline model (Python backend) needs `numpy`, `pillow`, `transformers` and, "
        "to read GPU outputs, `torch` in the stub's Python environment.",
    }[repo.backend]
    stream_row = (
        f"| `{m['pipeline_stream']}` | the same, decoupled: one response per generated token (`token_ids` [B, 1], "
        "the `text` it adds), the last flagged final; stream it with `tritonclient.grpc` |\n"
        if "pipeline_stream" in m
        else ""
    )
    timeout = f"{settings.queue_timeout_s:g} s" if settings.queue_timeout_s > 0 else "none"
    rows = settings.pipeline_rows(repo.limits["batch"])
    batching = (
        f"""Requests that arrive within {settings.batch_delay_us} us of one another (Triton's `dynamic_batching`,
`max_queue_delay_microseconds`) run as ONE left-padded prefill and ONE decode loop per keep level
(at most {rows} rows); each row stops at its own `max_new_tokens` / stop ids and its
tokens are those it gets alone."""
        if rows > 1
        else "Batching across requests is off (`--pipeline-max-batch 1`): the pipeline runs one request at a time."
    )
    weights_mode = (
        {
            "decode-packed": "The prefill models map the shared weights file (in memory once for every level); the "
            "decode model loads and pre-packs its own copy, so a decode step of several rows costs about one "
            "row's (`--weights decode-packed`).",
            "shared": "Every graph model maps the shared weights file: in memory once, but without pre-packing a "
            "decode step of 2+ rows costs several times one row's (`--weights shared`).",
            "packed": "Every graph model loads and pre-packs its own copy of the weights (`--weights packed`).",
        }[settings.weights]
        if repo.backend == "python"
        else ""
    )
    serving_text = f"""
## Batching, queue, threads

{" ".join(t for t in (batching, weights_mode) if t)} The queue holds at most {settings.max_queue} requests
(`max_queue_size`; beyond that a request is rejected at once with UNAVAILABLE) and a request queued
longer than {timeout} is rejected (`default_queue_policy`). A malformed request is answered with
INVALID_ARGUMENT and a message naming the problem. onnxruntime runs {settings.intra_op_threads}
intra-op thread(s) per session ({settings.cores} cores; see the comments in each config.pbtxt).
Rewrite with `--batch-delay-us`, `--pipeline-max-batch`, `--weights`, `--max-queue`, `--queue-timeout`,
`--threads`, `--cores`.
"""
    pipelines = [m[k] for k in ("pipeline", "pipeline_stream") if k in m]
    layout = "\n".join(
        f"    {f}" for f in repo.files if not any(f.startswith(f"{p}/1/processor/") for p in pipelines)
    )
    layout += "".join(f"\n    {p}/1/processor/..." for p in pipelines)
    return f"""# Triton model repository for a STAR-pruned LLaVA

Written by `python -m star_export triton --from {from_dir} --backend {repo.backend}` (star_export
{__version__}) from `{manifest["model"]["source"]}`: {star["N"]} visual tokens -> keep1 (stage 1) ->
keep2 (stage 2, from decoder layer {star["layer_K"]}), keep levels (keep1 -> keep2):
{", ".join(f"{lv['keep1']} -> {lv['keep2']}" for lv in levels)}. Do not edit the `config.pbtxt` files
by hand: they are generated from the export's manifest.json.

Backend: {backend_note}

## Models

| model | what it does |
| --- | --- |
{prefill_rows}
| `{m["decode"]}` | one decode step with per-layer pasts (L1 slots before layer K, L2 from K on), every keep level |
| `{m["pipeline"]}` | Python backend (BLS): image bytes + prompt (+ `keep`) -> `text`, `token_ids` (greedy) |
{stream_row}
Limits served: batch <= {repo.limits["batch"]} rows per request, prompts <= {repo.limits["text_len"]}
tokens, past lengths L1 + new tokens - 1 <= {repo.limits["past_len_l1"]} and L2 + new tokens - 1 <=
{repo.limits["past_len_l2"]} ({spans}).
Default `max_new_tokens`: {settings.max_new_tokens} (config parameter of `{m["pipeline"]}`).
{levels_text}{serving_text}
Layout:

{layout}

{weights_note}

## Start the server

{serve_note}```bash
tritonserver --model-repository={shlex.quote(str(repo.path.resolve()))} \\
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
limit = np.array([[{settings.max_new_tokens}]], dtype=np.int32)  # optional{keep_input}
inputs = [
    httpclient.InferInput("image", image.shape, "BYTES"),
    httpclient.InferInput("prompt", prompt.shape, "BYTES"),
    httpclient.InferInput("max_new_tokens", limit.shape, "INT32"),{keep_tensor}
]
for tensor, data in zip(inputs, (image, prompt, limit{keep_data})):
    tensor.set_data_from_numpy(data)
result = client.infer("{m["pipeline"]}", inputs)
print(result.as_numpy("text")[0, 0].decode(), result.as_numpy("token_ids")[0])
```

gRPC is the same with `tritonclient.grpc` and port 8001. `token_ids` rows are padded with -1
after the last generated token (the stop token, when one was produced, is included).
star_export's tests start a real `tritonserver` on a `--backend python` repository and check that
its answers equal `python -m star_export generate --from DIR [--keep K]` (greedy, onnxruntime)
token for token, at every keep level in one server run; the onnxruntime and tensorrt backends run
the same graphs with their own kernels.
"""
