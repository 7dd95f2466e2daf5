"""``generate``: answer prompts about images with the pruned model, from an export (onnxruntime) or
a checkpoint (the PyTorch rewrite), through :mod:`star_export.session`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from star_export.commands.argtypes import integer
from star_export.errors import UsageError

NAME = "generate"
HELP = "answer a prompt about an image with the pruned model (onnxruntime or PyTorch)"
DESCRIPTION = (
    "Pre-process an image and a prompt with the checkpoint's own processor and chat template, "
    "run the STAR-pruned prefill, then greedy or sampled decode steps with per-layer KV caches "
    "(L1 slots before layer K, L2 from K on). With --from DIR it runs the exported graphs in "
    "onnxruntime; with --model (or nothing: the shipped trained demo model) the PyTorch rewrite."
)
EPILOG = """\
examples:
  python -m star_export generate --image examples/demo/scene.png --prompt "What colour is the circle?"
      the shipped demo model (trained on scenes of shapes) through the PyTorch rewrite
  python -m star_export llava --keep 64 --out star_out && \\
  python -m star_export generate --from star_out --image examples/demo/scene.png --prompt "How many squares are there?"
      the exported prefill.onnx + decode.onnx in onnxruntime
"""


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--image",
        type=Path,
        action="append",
        required=True,
        metavar="FILE",
        help="PNG/JPEG image; repeat with --prompt for a batch (one image may serve all prompts)",
    )
    g.add_argument(
        "--prompt", action="append", required=True, metavar="TEXT", help="the question; repeatable"
    )
    src = g.add_mutually_exclusive_group()
    src.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="an export directory (manifest.json, prefill.onnx, decode.onnx, processor/)",
    )
    src.add_argument(
        "--model",
        default=None,
        metavar="DIR|ORG/NAME|demo:NAME",
        help="a checkpoint (directory, hub id or shipped demo: demo:qwen3-vl-demo) run through the "
        "PyTorch rewrite",
    )
    g.add_argument(
        "--runtime",
        choices=("onnxruntime", "torch"),
        default=None,
        help="default: onnxruntime with --from, torch otherwise",
    )
    g.add_argument("--max-new-tokens", type=integer, default=32, metavar="N", help="default 32")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument(
        "--stop",
        type=int,
        action="append",
        default=None,
        metavar="ID",
        help="extra stop token id (EOS always stops); repeatable",
    )
    g.add_argument(
        "--keep",
        type=integer,
        default=None,
        help="keep2: with --from, one of the export's keep levels or any keep of its keep range (default: "
        "its default level); with --model, any (default 64)",
    )
    g.add_argument("--keep1", type=integer, default=None, help="--model: keep1 (default min(N, 2*keep))")
    g.add_argument("--layer", type=integer, default=None, help="--model: K (default 2)")
    g.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (tokens, kept indices, margins, timings)",
    )


def run(args: argparse.Namespace) -> int:
    from star_export.session import load_export, load_model

    for image in args.image:
        if not image.is_file():
            raise UsageError(f"--image {image}: no such file")
    runtime = args.runtime or ("onnxruntime" if args.from_dir else "torch")
    if args.from_dir is not None:
        if args.keep1 is not None or args.layer is not None:
            raise UsageError(
                "--keep1/--layer are fixed by the exported graphs of --from (--keep picks a level)"
            )
        pipe = load_export(args.from_dir, runtime=runtime)
        pipe.level(args.keep)  # a keep the export lacks: one line before any image is read
    else:
        if runtime == "onnxruntime":
            raise UsageError(
                "--runtime onnxruntime needs exported graphs: run `llava --out DIR`, then --from DIR"
            )
        pipe = load_model(
            args.model,
            keep=64 if args.keep is None else args.keep,
            keep1=args.keep1,
            layer=2 if args.layer is None else args.layer,
        )
    out = pipe.generate(
        args.image,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or (),
        keep=args.keep if args.from_dir is not None else None,
    )
    geo, cfg, result = pipe.geo, out.cfg, out.result
    per_token = result.decode_s / max(result.decode_steps, 1)
    if args.json:
        print(
            json.dumps(
                {
                    "runtime": runtime,
                    "answers": out.answers,
                    "tokens": result.tokens,
                    "visual_tokens": {
                        "N": geo.n_visual,
                        "keep1": cfg.keep1,
                        "keep2": cfg.keep2,
                        "layer_K": cfg.layer,
                    },
                    "stage1_keep_idx": result.stage1_keep_idx.tolist(),
                    "stage2_keep_idx": result.stage2_keep_idx.tolist(),
                    # how close each cut was: the keep-th score minus the next (0: a tie the index decided)
                    "stage1_margin": _floats(result.stage1_margin),
                    "stage2_margin": _floats(result.stage2_margin),
                    "prefill_ms": result.prefill_s * 1e3,
                    "decode_ms_per_step": per_token * 1e3,
                    "decode_tokens_per_s": result.decode_tokens_per_s,
                    "cache_lengths": {
                        "after_prefill": result.prefill_present_lengths,
                        "final": result.final_present_lengths,
                    },
                },
                indent=2,
            )
        )
        return 0
    print(f"runtime: {runtime}, {pipe.where}")
    print(
        f"visual tokens: {geo.n_visual} -> {cfg.keep1} (stage 1) -> {cfg.keep2} (stage 2, from layer {cfg.layer})"
        f"{f' + {geo.n_fixed} structural' if geo.n_fixed else ''}; "
        f"KV cache per layer after prefill: {result.prefill_present_lengths}"
    )
    images = args.image * len(args.prompt) if len(args.image) == 1 else args.image
    for prompt, image, answer in zip(args.prompt, images, out.answers, strict=True):
        print(f"[{image.name}] {prompt}\n  -> {answer}")
    print(
        f"prefill {result.prefill_s * 1e3:.1f} ms; decode {result.decode_steps} steps in "
        f"{result.decode_s * 1e3:.1f} ms ({per_token * 1e3:.2f} ms/step, {result.decode_tokens_per_s:.0f} tokens/s)"
    )
    return 0


def _floats(values: Iterable[float] | None) -> list[float | str] | None:
    """JSON-safe floats (inf -> "inf")."""
    if values is None:
        return None
    return [float(v) if abs(float(v)) != float("inf") else str(float(v)) for v in values]
