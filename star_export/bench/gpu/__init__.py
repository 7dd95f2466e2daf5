"""STAR's prefill speedup at LLaVA-1.5-7B scale on one CUDA GPU, measured (issue #16).

    python tools/gpu_bench.py --device cuda --out gpu_bench_out        # on the GPU host
    python tools/gpu_bench.py --device cpu --tiny --out /tmp/gb        # the same script, tiny, on CPU

Needs only PyTorch and transformers (plus numpy; matplotlib for the plot): no TensorRT, no
onnxruntime, no checkpoint. The model is LLaVA-1.5-7B's real widths (CLIP ViT-L/14-336 vision
tower, hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32064; ``model.llava_7b_config``,
also ``tools/measure_export_memory.py``'s) with random fp16 weights created directly on the device
(``torch.device("cuda")`` + transformers' ``_from_config(dtype=fp16)``: no fp32 copy, nothing on disk).
``--tiny`` uses the ``llava-tiny`` recipe's widths at 112 px (N = 64 visual tokens) instead.

Measured in one run, every variant interleaved round-robin (the order rotated by one each round, so
drift hits all alike), after ``--warmup`` untimed rounds; median and p10/p90 of ``--repeats`` rounds:

* prefill latency through the PyTorch rewrite (the LLaVA family's ``LlavaPrefill``): unpruned
  (keep1 = keep2 = N = 576) and STAR keep 64/128/192 (keep1 = 2 * keep, K = ``--layer``), batch 1
  and 8, in eager PyTorch and in one faster mode: CUDA graphs (the prefill captured once per shape
  and replayed), else ``torch.compile`` when capturing fails, else eager only. The mode is decided
  by the first variant that sets it up; each failure is recorded with its reason (``modes``);
* decode tokens/s: ``StarDecode`` steps on the per-layer caches (L1 slots before K, L2 from K on)
  of the variant's first prefill. Eager: ``--decode-steps`` greedy steps, the caches growing. Graphs
  / compile: the first step captured (compiled) once and replayed ``--decode-steps`` times (the
  same past length each time: one step's cost, not a growing cache);
* KV-cache bytes, read from the caches and from the cost model (``cost.prefill_cost``);
* the STAR scoring's share: ``star.stage1_scores`` + ``topk_sorted`` + ``stage2_scores`` + the stage-2
  top-k alone (``bench.StarScoring``, exactly the prefill's calls; the stage-2 top-k is
  ``stage2_select`` for LLaVA, which has no structural tokens) on tensors of the prefill's shapes,
  5 back-to-back calls per sample, divided by the pruned prefill in the same mode and batch;
* achieved TFLOP/s (``cost.prefill_cost`` FLOPs of what runs, all 24 vision layers, over the
  median) against the device's fp16 matmul peak measured here (a ``--peak-size``-cubed
  ``torch.matmul``), and the cost model's speedup ceiling (``cost.ceiling``) at each keep;
* parity on the device: the rewrite in fp16 vs the same weights in fp32 (the first
  ``--parity-layers`` decoder layers of the benchmarked model, shared, and an fp32 copy; TF32
  off), by ``star_export.selection``/``validate``'s rules: selection overlap with the dtype's
  margins (``precision_noise``: its rounding emulated on the fp32 run), then logits and caches
  directly or, where selections differ, with the fp16 side's selection forced into the fp32 run
  (``comparison.check_side``).

Writes ``--out``/gpu_bench.json (rewritten after every phase and every timing round, so a run cut
short keeps what it measured; ``status`` says how far it got) and ``gpu_bench.png``; prints
progress lines and, last, one table. Exit 0 when the run finished and parity passed, 1 when a
parity row failed, 2 for a bad flag (one line), 3 when the device is missing (one line).

Time on an H200 (estimate, not yet measured: no device was lent when this was written), defaults:
imports ~15 s; creating 7.06 B fp16 parameters on the device ~10-20 s (14 GB of init kernels at
>1 TB/s plus Python module construction); the matmul and copy peaks <2 s; parity ~10-20 s (a
4-layer fp32 copy, 4.8 GB, and ~5 runs of a 4-layer model per keep); set-up ~15 s (8 cases: one
eager prefill + decode each, and two warm-up calls + one capture per CUDA graph, the largest
prefill, batch 8 unpruned, ~66 TFLOP at ~0.5 PFLOP/s ~0.13 s); timing: a round is ~3 s (16 prefills,
~0.6 s together; 64 eager decode steps at ~25-30 ms, launch-bound, ~2 s; 64 replayed steps at
~5 ms, weight-bound: 13.5 GB / ~4 TB/s ~3.4 ms, ~0.3 s), 3 + 20 rounds ~70 s. Total ~2.5-3 min.
``--budget-s`` (default 420) bounds it: no new accelerated variant is set up after 60 % of the
budget, and no new timing round starts once the next would end past it (at least one runs).
torch.compile, the fallback, is the unbounded part: inductor on a 32-layer model takes minutes
per shape, so under it the set-up budget leaves some shapes eager only (each says why).

Modules, one job each (imports run one way: run -> flags / model / parity / variants -> accel ->
device; report -> flags):
  * ``flags``: the command line, the checks before any weight exists, the run's settings;
  * ``device``: ``Run`` (the JSON as it grows), ``Clock``, the device's description and peaks;
  * ``model``: LLaVA-1.5-7B's widths (or llava-tiny's), the model built on the device;
  * ``parity``: the shared-weight truncated model, fp16/bf16 vs fp32 parity rows;
  * ``accel``: CUDA graphs / torch.compile with the fallback chain;
  * ``variants``: the cases and timed variants, their set-up within the budget, the interleaved rounds;
  * ``report``: derived numbers against the cost model, the table, the plot;
  * ``run``: the six phases in order and ``main`` (``tools/gpu_bench.py`` calls it).
"""

from star_export.bench.gpu.run import bench, main

__all__ = ["bench", "main"]
