"""Stage 6: speed, measured. Prefill latency and decode tokens/s of every runtime, side by side.

One process, one run: the graphs are exported (``keep1 = keep2 = N`` = unpruned, and each
``--keep``), every variant is set up, then the variants are timed *interleaved*: each round runs
every variant once (prefill, then ``decode_steps`` decode steps from the prefill's cache), in an
order rotated by one each round, so drift (thermal, other load) hits all variants alike.

Variants, per batch:
  * ``hf-eager``: the unmodified ``LlavaForConditionalGeneration`` (eager attention) on the
    expanded prompt (N placeholder copies), ``use_cache=True``; decode with its own cache.
  * ``torch-rewrite``: the exported modules themselves, ``StarPrefill`` / ``StarDecode``, in
    eager PyTorch (unpruned and each keep).
  * ``onnxruntime``: ``prefill.onnx`` + ``decode.onnx`` on the CPU execution provider,
    ``ORT_ENABLE_ALL``, intra-op threads = the benchmark's threads, thread spinning off
    (unpruned and each keep). Spinning is onnxruntime's default, but its idle threads keep a
    core busy for 10-100 ms after a run, which in an interleaved benchmark slows whatever runs
    next (measured: a 3 ms call right after an onnxruntime prefill took 7-8 ms with spinning,
    3 ms without); the settings comparison measures spinning on vs off.
  * ``*-scoring``: STAR's stage 1 + stage 2 scoring and selection alone (``StarScoring``:
    the same ``star.py`` calls as ``StarPrefill``, on inputs of the same shapes), exported to
    ONNX and timed like the rest, to give the scoring's share of the pruned prefill. A second
    estimate comes from onnxruntime's profiler: the kernel time of the nodes whose source line
    (the exporter's ``pkg.torch.onnx.stack_trace``) calls ``stage1_scores``, ``stage2_scores`` or
    ``topk_sorted``, over the whole pruned prefill.
  * ``tensorrt``: where TensorRT and a CUDA GPU are present; skipped with the reason otherwise.

Statistics: median and p10/p90 over the timed rounds. Each variant's set-up ends with one
untimed prefill + decode (the warm-up; ``warmup`` adds untimed interleaved rounds). Batch 1 runs
``repeats`` rounds; a batch B > 1 runs ``max(3, ceil(repeats / B))`` (its runs are B times longer
and relatively less noisy). Memory: resident set size sampled every 2 ms from
``/proc/self/statm`` during the untimed calls only (never while timing): the peak over the
process and the peak growth over the RSS at the start of a call (the call's working memory,
including onnxruntime's arena growth on its first call); KV-cache bytes are read from the cache
tensors and compared with the cost model.

onnxruntime's own means are measured on batch 1 (unpruned and the first keep), interleaved the
same way: graph optimisation levels, one intra-op thread vs all, thread spinning on, and
onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``, CLIP attention /
QuickGelu / SkipLayerNorm and RMSNorm + residual fusions) on top of ``ORT_ENABLE_ALL``, and, for
what it would buy only, dynamic int8 quantization of the weight MatMuls (it changes the outputs
and, on the pruned graph, the kept tokens; every setting's outputs are compared with the default's).

Writes ``bench.json`` (machine, versions, settings, every sample), ``bench.png`` (prefill
latency vs kept tokens with the cost-model ceiling) and prints one table.

Modules, one job each (imports run one way: cli -> run -> exports / ort -> variants -> timing;
report -> timing):
  * ``timing``: statistics, rounds per batch, RSS sampling, the machine;
  * ``variants``: the inputs, one runner per runtime, the timed variants, the interleaved rounds;
  * ``exports``: the graphs on disk (prefill, decode, the ``StarScoring`` subgraph), cached by key;
  * ``ort``: onnxruntime's session options, backend, profiler and settings comparison;
  * ``report``: bench.json's content, the table, the targets, the plot;
  * ``run``: ``run_bench``, the steps of one run in order;
  * ``cli``: the flags of ``python -m star_export bench``.

The other runners of the project's benchmarks live beside it (measured files: the top-level
``bench/results/``):
  * ``gpu/``: ``tools/gpu_bench.py``, LLaVA-1.5-7B widths on one CUDA GPU in PyTorch only (its docstring);
  * ``attention_formulations``: ``python -m star_export.bench.attention_formulations``, the decoder-
    attention formulations timed in onnxruntime (why ``rewrite.decoder_attention`` is explicit).
"""

from star_export.bench.cli import DESCRIPTION, EPILOG, add_bench_arguments, run_bench_cli
from star_export.bench.exports import ExportJob, StarScoring, export_graphs, export_scoring
from star_export.bench.ort import (
    ORT_LEVELS,
    SCORING_SOURCES,
    OrtBackend,
    OrtOptions,
    ort_ablation,
    ort_profile,
    ort_session,
    quantize_int8,
    transformer_optimize,
)
from star_export.bench.report import TARGET_KEEP, BenchReport, evaluate_targets, format_table, plot
from star_export.bench.run import (
    DEFAULT_BATCHES,
    DEFAULT_IMAGE_POSITION,
    DEFAULT_KEEPS,
    DEFAULT_RECIPE,
    DEFAULT_TEXT_LEN,
    RUNTIMES,
    run_bench,
)
from star_export.bench.timing import (
    SCORING_CALLS,
    Log,
    RssSampler,
    Stats,
    machine_info,
    max_rss_bytes,
    repeats_for,
    rss_bytes,
)
from star_export.bench.variants import (
    CallRunner,
    HFEagerRunner,
    NumpyBackendRunner,
    Runner,
    Shared,
    Variant,
    bench_inputs,
    decode_numpy,
    interleave,
    scoring_inputs,
)

__all__ = [
    "DEFAULT_BATCHES",
    "DEFAULT_IMAGE_POSITION",
    "DEFAULT_KEEPS",
    "DEFAULT_RECIPE",
    "DEFAULT_TEXT_LEN",
    "DESCRIPTION",
    "EPILOG",
    "ORT_LEVELS",
    "RUNTIMES",
    "SCORING_CALLS",
    "SCORING_SOURCES",
    "TARGET_KEEP",
    "BenchReport",
    "CallRunner",
    "ExportJob",
    "HFEagerRunner",
    "Log",
    "NumpyBackendRunner",
    "OrtBackend",
    "OrtOptions",
    "RssSampler",
    "Runner",
    "Shared",
    "StarScoring",
    "Stats",
    "Variant",
    "add_bench_arguments",
    "bench_inputs",
    "decode_numpy",
    "evaluate_targets",
    "export_graphs",
    "export_scoring",
    "format_table",
    "interleave",
    "machine_info",
    "max_rss_bytes",
    "ort_ablation",
    "ort_profile",
    "ort_session",
    "plot",
    "quantize_int8",
    "repeats_for",
    "rss_bytes",
    "run_bench",
    "run_bench_cli",
    "scoring_inputs",
    "transformer_optimize",
]
