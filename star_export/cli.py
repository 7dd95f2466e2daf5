"""Command line: ``python -m star_export <command>``, a thin layer over the Python API.

User mistakes (UsageError) exit 2 with one line on stderr, a missing component (TensorRT, a
GPU) exits 3 with one line, a failed parity check exits 1 after writing its report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
from pathlib import Path

from star_export import __version__
from star_export.errors import MissingComponent, UsageError

EPILOG_EXPORT = """\
examples:
  python -m star_export llava --keep 64
      tiny embedded LLaVA (random weights): export star_out/, validate, report
  python -m star_export llava --keep 64 --keep1 192 --layer 3 --out run1/
  python -m star_export export --model llava-hf/llava-1.5-7b-hf --keep 64
      a hub id (resolved in the local Hugging Face cache first) or a checkpoint directory,
      exported in its own dtype (fp16) without an fp32 copy
  python -m star_export export --model ~/ckpt/llava-v1.6-mistral-7b-hf --grid 2x2 --keep 64
      LLaVA-NeXT: one fixed anyres tile grid per export (row newlines always kept)
  python -m star_export export --model ~/ckpt/Qwen2-VL-7B-Instruct --image-size 448 --keep 64
      Qwen2-VL: one static resolution per export (M-RoPE positions kept)
  python -m star_export llava --recipe qwen2-vl-tiny     (or llava-next-tiny): tiny embedded models

writes into --out: prefill.onnx (prefill_k<K>.onnx per keep level), decode.onnx, weights.onnx.data
(the weights, once), processor/ (tokenizer, chat template, image processor), manifest.json (every
tensor name, dtype and shape; STAR settings; pre-processing; versions), report.json (parity checks).
exit codes: 0 ok, 1 parity or graph scan failed (report written), 2 usage error, 3 missing TensorRT/GPU.
"""

EPILOG_GENERATE = """\
examples:
  python -m star_export generate --image cat.png --prompt "What is in the image?"
      embedded llava-tiny through the PyTorch rewrite (random weights: the answer is noise)
  python -m star_export llava --keep 64 --out star_out && \\
  python -m star_export generate --from star_out --image cat.png --prompt "What is in the image?"
      the exported prefill.onnx + decode.onnx in onnxruntime
"""

EPILOG_EVAL = """\
examples:
  python -m star_export llava --keep 64,128,576 --out star_out
  python -m star_export eval --from star_out --data examples/eval/questions.jsonl --out eval_out
      keep 64 and 128 vs the unpruned reference; the keep 576 level is the 'unpruned' row
  python -m star_export eval --from star_out --data llava-bench.jsonl --image-root images/ --limit 50
"""


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _ints(text: str) -> list[int]:
    """``32`` or ``32,64,128``."""
    return [_int(v) for v in text.split(",")]


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 2x2, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"expected positive rows and cols, got {text!r}")
    return rows, cols


def _size(text: str) -> int | tuple[int, int]:
    """``--image-size``: PX or HxW."""
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected PX or HxW such as 336 or 336x448, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on a bad flag."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"star_export: error: {message}\n")
        raise SystemExit(2)


def _takers(option: str) -> str:
    from star_export.families import option_families

    return ", ".join(option_families(option))


def _family_names() -> str:
    """The model_type of every supported family, for the command list."""
    from star_export.families import FAMILIES

    return ", ".join(f.name for f in FAMILIES)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``llava`` / ``export``."""
    p.add_argument(
        "--keep",
        type=_ints,
        default=None,
        metavar="K2[,K2...]",
        help="visual tokens kept by stage 2 (keep2), 1..N; default from the recipe (64). Several levels "
        "(32,64,128): one prefill graph each, the first the default, one decode graph and the weights "
        "shared; a request picks its level (generate --keep, the Triton pipeline's keep input)",
    )
    p.add_argument(
        "--keep1",
        type=_ints,
        default=None,
        metavar="K1[,K1...]",
        help="visual tokens kept by stage 1, keep..N, one per keep level; default min(N, 2*keep)",
    )
    p.add_argument(
        "--layer",
        type=_int,
        default=None,
        metavar="K",
        help="first decoder layer that sees the stage-2 sequence, 1..layers-1; default 2",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR|ORG/NAME",
        help="a checkpoint directory (Hugging Face layout) or a hub id resolved in the local Hugging Face "
        "cache; default: the recipe's embedded model (llava-tiny)",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="NAME|FILE",
        help="recipe name in recipes/ or a .toml path (profile ranges, expectations)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("star_out"),
        metavar="DIR",
        help="output directory (default: star_out/)",
    )
    p.add_argument(
        "--engine",
        type=Path,
        default=None,
        metavar="PATH",
        help="also build TensorRT engines at PATH (+ PATH's .decode.plan; several keep levels: PATH's "
        ".k32.plan, .k64.plan, ... + .decode.plan; needs TensorRT and a CUDA GPU)",
    )
    p.add_argument(
        "--batch-size",
        type=_int,
        default=2,
        metavar="B",
        help="batch of the validation inputs and the profile's opt batch (default 2)",
    )
    p.add_argument(
        "--text-len",
        type=_int,
        default=24,
        metavar="T",
        help="prompt length of the validation inputs (default 24)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs")
    p.add_argument("--skip-validation", action="store_true", help="export only, no parity checks")
    p.add_argument(
        "--grid",
        type=_grid,
        default=None,
        metavar="RxC",
        help=f"the fixed anyres tile grid, rows x cols, one of the checkpoint's image_grid_pinpoints "
        f"(default 2x2 when listed); families: {_takers('grid')}. Static shapes need one grid per export",
    )
    p.add_argument(
        "--image-size",
        type=_size,
        default=None,
        metavar="PX|HxW",
        help=f"the static image resolution, PX (square) or HxW (height x width: keep your images' aspect "
        f"ratio, e.g. 336x448 for 3:4), multiples of the checkpoint's patch size x merge size, within its "
        f"processor's min/max pixels; default: the family's; images are resized to it; families: "
        f"{_takers('image_size')}",
    )
    from star_export.engines import add_build_arguments

    add_build_arguments(p, include_engine=False)
    from star_export.flags import describe_export_flags

    describe_export_flags(p)  # --dtype and the profile flags are the export's too


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m star_export",
        description="STAR visual-token pruning for vision-language models, exported as static-shape ONNX / "
        "TensorRT with parity proofs.",
    )
    parser.add_argument("--version", action="version", version=f"star_export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    for name, summary in (
        ("llava", "the headline command: export a STAR-pruned model to ONNX and validate it"),
        ("export", f"the same as llava, for every family ({_family_names()})"),
    ):
        p = sub.add_parser(
            name,
            help=summary,
            description="Rewrite a vision-language model's prefill with STAR pruning (static shapes: TopK with "
            "constant K + Gather), export prefill.onnx and decode.onnx, check them (graph scan, "
            "onnxruntime vs PyTorch vs the dynamic reference vs the unmodified model, greedy decoding) "
            "and write processor/, manifest.json and report.json.",
            epilog=EPILOG_EXPORT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_export_arguments(p)
        p.set_defaults(func=cmd_export)

    b = sub.add_parser(
        "build",
        help="build TensorRT engines from an exported directory (needs TensorRT + a CUDA GPU)",
        description="Check every graph of --from for TensorRT readiness, then build the prefill engine at "
        "--engine (default DIR/prefill.plan) and the decode engine beside it (out.plan -> out.decode.plan; "
        "an export with several keep levels: one prefill engine per level, out.k32.plan, out.k64.plan, ..., "
        "and one decode engine) through polygraphy's "
        "TensorRT loaders, with optimization profiles from the manifest (or the --min/opt/max flags; the "
        "decode profile covers both past lengths of every level), "
        "the precision of --dtype and a reusable --timing-cache; records each in manifest.json. "
        "Exits 3 with the exact command to run on a GPU host when TensorRT or a GPU is missing.",
    )
    b.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="an export directory (`llava --out DIR`)",
    )
    from star_export.engines import add_build_arguments
    from star_export.engines.engines_only import add_trt_flags

    add_build_arguments(b)
    b.set_defaults(func=cmd_build)

    v = sub.add_parser(
        "validate",
        help="re-run the parity checks of an exported directory (and of its TensorRT engines with --trt)",
        description="Parity of --from's graphs against the PyTorch rewrite of the checkpoint recorded in the "
        "manifest and the dynamic reference (and, with --trt, of the TensorRT engines against onnxruntime "
        "through polygraphy's TrtRunner/OnnxrtRunner/Comparator); writes report.json.",
    )
    v.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="an export directory (`llava --out DIR`)",
    )
    add_trt_flags(v)  # --trt, --engines-only
    v.add_argument(
        "--batch-size",
        type=_int,
        default=2,
        metavar="B",
        help="batch of the random validation inputs (default 2, at least 2: one row is left padded)",
    )
    v.add_argument(
        "--text-len",
        type=_int,
        default=24,
        metavar="T",
        help="prompt length of the validation inputs (default 24)",
    )
    v.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs (default 0)")
    v.set_defaults(func=cmd_validate)

    g = sub.add_parser(
        "generate",
        help="answer a prompt about an image with the pruned model (onnxruntime or PyTorch)",
        description="Pre-process an image and a prompt with the checkpoint's own processor and chat template, "
        "run the STAR-pruned prefill, then greedy or sampled decode steps with per-layer KV caches "
        "(L1 slots before layer K, L2 from K on). With --from DIR it runs the exported graphs in "
        "onnxruntime; with --model (or nothing: the embedded llava-tiny) the PyTorch rewrite.",
        epilog=EPILOG_GENERATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        metavar="DIR|ORG/NAME",
        help="a checkpoint (directory or hub id) run through the PyTorch rewrite",
    )
    g.add_argument(
        "--runtime",
        choices=("onnxruntime", "torch"),
        default=None,
        help="default: onnxruntime with --from, torch otherwise",
    )
    g.add_argument("--max-new-tokens", type=_int, default=32, metavar="N", help="default 32")
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
        type=_int,
        default=None,
        help="keep2: with --from, one of the export's keep levels (default: its default level); "
        "with --model, any (default 64)",
    )
    g.add_argument("--keep1", type=_int, default=None, help="--model: keep1 (default min(N, 2*keep))")
    g.add_argument("--layer", type=_int, default=None, help="--model: K (default 2)")
    g.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (tokens, kept indices, margins, timings)",
    )
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser(
        "eval",
        help="what pruning costs in answers: each keep level vs the unpruned model on your images and questions",
        description="Answer every question of --data (greedy) with the unpruned reference (the PyTorch rewrite "
        "of the export's checkpoint at keep1 = keep2 = N) and with each keep level of --from; print per level "
        "answer and first-token agreement with the reference, the first token's KL, accuracy against the "
        "data's answers (VQA accuracy on rows with several, exact match on rows with one) and median latencies; write rows.jsonl (row by row, --resume continues it), "
        "eval.json and eval.png into --out. The 'unpruned' row is the export's own keep = N level (export "
        "with --keep ...,N) or, without one, transformers' unmodified model, against the reference.",
        epilog=EPILOG_EVAL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument(
        "--from", dest="from_dir", type=Path, required=True, metavar="DIR", help="an export directory"
    )
    e.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE",
        help="LLaVA's question JSONL (question_id, image, text[, answer|answers|gt_answer]), a JSONL of "
        "image, question[, answer...] or a CSV with image, question[, answer|answers (a|b)] columns",
    )
    e.add_argument("--keep", type=_ints, default=None, metavar="K2[,K2...]", help="levels (default: all)")
    e.add_argument("--limit", type=_int, default=None, metavar="N", help="the first N examples only")
    e.add_argument("--out", type=Path, default=Path("eval_out"), metavar="DIR", help="default eval_out/")
    e.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime", help="of the levels")
    e.add_argument("--image-root", type=Path, default=None, metavar="DIR", help="images relative to DIR")
    e.add_argument("--resume", action="store_true", help="continue --out's run (same settings)")
    e.add_argument("--skip-bad", action="store_true", help="report bad rows and run the rest")
    e.add_argument("--max-new-tokens", type=_int, default=16, metavar="N", help="default 16")
    e.add_argument("--batch-size", type=_int, default=1, metavar="B", help="examples per request (default 1)")
    e.set_defaults(func=cmd_eval)

    from star_export import bench

    bn = sub.add_parser(
        "bench",
        help="measure prefill latency and decode tokens/s, pruned vs unpruned, next to the cost model",
        description=bench.DESCRIPTION,
        epilog=bench.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_bench_arguments(bn)
    bn.set_defaults(func=bench.run_bench_cli)

    from star_export import deploy

    t = sub.add_parser(
        "triton",
        help="write a Triton model repository (prefill, decode, image+prompt pipeline)",
        description="Triton model repository from an export: prefill/decode (tensorrt_plan, onnxruntime_onnx "
        "or a Python-backend model running onnxruntime) + a BLS pipeline model (image + prompt -> text). "
        "Every config.pbtxt is generated from manifest.json.",
        epilog=deploy.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    deploy.add_triton_arguments(t)
    t.set_defaults(func=deploy.run_triton)

    c = sub.add_parser(
        "check",
        help="TensorRT-readiness scan of an ONNX graph (no TensorRT needed)",
        description="Scan an ONNX graph for what TensorRT's ONNX parser cannot take or what breaks static "
        "shapes: unsupported ops, TopK with a non-constant K or K > 3840, NonZero and other "
        "data-dependent shapes, opset range, dtypes. Exits 1 on a violation.",
    )
    c.add_argument("onnx", type=Path, help="path of the .onnx file")
    c.add_argument("--target", default="10", help="TensorRT major version to check against (default 10)")
    c.set_defaults(func=cmd_check)
    return parser


def check_build_flags(args: argparse.Namespace) -> None:
    """The TensorRT flags of an export, checked whether or not --engine is given (never silently ignored)."""
    from star_export.engines import DIM_FLAGS

    for dim, names in DIM_FLAGS.items():
        given = [(n, getattr(args, n.lstrip("-").replace("-", "_"), None)) for n in names]
        set_ = [(n, v) for n, v in given if v is not None]
        for n, v in set_:
            if v < 1:
                raise UsageError(f"{n} must be >= 1, got {v}")
        for (n1, v1), (n2, v2) in itertools.pairwise(set_):
            if v1 > v2:
                raise UsageError(f"{n1} {v1} > {n2} {v2}: the {dim} profile needs min <= opt <= max")
    for flag, low, high in (
        ("max_new_tokens", 1, None),
        ("workspace", 1, None),
        ("builder_optimization_level", 0, 5),
    ):
        value = getattr(args, flag, None)
        if value is not None and (value < low or (high is not None and value > high)):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise UsageError(f"--{flag.replace('_', '-')} must be {bound}, got {value}")
    if args.engine is not None and args.engine.is_dir():
        raise UsageError(f"--engine {args.engine}: is a directory")


def cmd_export(args: argparse.Namespace) -> int:
    from star_export.api import export
    from star_export.flags import profile_overrides

    check_build_flags(args)
    result = export(
        args.model,
        keep=args.keep,
        keep1=args.keep1,
        layer=args.layer,
        out=args.out,
        dtype=args.dtype,
        recipe=args.recipe,
        grid=args.grid,
        image_size=args.image_size,
        validate=not args.skip_validation,
        batch_size=args.batch_size,
        text_len=args.text_len,
        seed=args.seed,
        profile=profile_overrides(args),
        log=lambda line: print(line, flush=True),
    )
    print(f"wrote {args.out}/: {', '.join(result.written)}")
    if not result.scan_ok:
        for scan in result.scans.values():
            if not scan.ok:
                print(scan.format(), file=sys.stderr)
        print("star_export: graph scan failed (see above)", file=sys.stderr)
        return 1
    if result.report is not None and not result.report.passed:
        print(f"star_export: parity FAILED, see {args.out / 'report.json'}", file=sys.stderr)
        return 1
    if args.engine is not None:
        from star_export.engines import run_build

        print("[build] TensorRT engines (a prefill engine per keep level + decode)")
        return run_build(args, args.out)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from star_export.check import check_onnx

    if not args.onnx.is_file():
        raise UsageError(f"{args.onnx}: no such file")
    try:
        report = check_onnx(args.onnx, target=args.target)
    except ValueError as e:
        raise UsageError(f"{args.onnx}: {e}") from None
    print(report.format())
    return 0 if report.ok else 1


def cmd_build(args: argparse.Namespace) -> int:
    from star_export.engines import run_build
    from star_export.manifest import read_manifest

    read_manifest(args.from_dir)  # --engine defaults to DIR/prefill.plan (run_build)
    return run_build(args, args.from_dir)


def cmd_validate(args: argparse.Namespace) -> int:
    from star_export.api import quiet_libraries
    from star_export.engines.engines_only import run_engines_only
    from star_export.validate import validate_directory

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    quiet_libraries()
    if args.engines_only:  # implies --trt: the engine rows alone, against the recorded report.json
        return run_engines_only(args.from_dir, max(2, args.batch_size), args.text_len, args.seed)
    report = validate_directory(
        args.from_dir, trt=args.trt, batch=max(2, args.batch_size), text_len=args.text_len, seed=args.seed
    )
    print(report.format())
    print(f"wrote {args.from_dir / 'report.json'}")
    return 0 if report.passed else 1


def cmd_generate(args: argparse.Namespace) -> int:
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


def cmd_eval(args: argparse.Namespace) -> int:
    from star_export.evaluate import run

    report = run(
        args.from_dir,
        args.data,
        keeps=args.keep,
        limit=args.limit,
        out=args.out,
        runtime=args.runtime,
        image_root=args.image_root,
        resume=args.resume,
        skip_bad=args.skip_bad,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(report.format())
    print(f"wrote {report.files['rows']}, {report.files['json']}, {report.files['plot']}")
    return 0


def _floats(values) -> list[float | str] | None:
    """JSON-safe floats (inf -> "inf")."""
    if values is None:
        return None
    return [float(v) if abs(float(v)) != float("inf") else str(float(v)) for v in values]


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that staging directories are cleaned up. A BaseException,
    like KeyboardInterrupt: libraries that catch Exception (the ONNX exporter wraps what its tracing
    raises) let it through."""


def _on_sigterm(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C at any time, also while the parser imports torch: one line, exit 130
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (an embedding application): leave its handlers alone
            previous = None
        try:
            return args.func(args)
        except (UsageError, MissingComponent) as e:
            print(f"star_export: error: {e}", file=sys.stderr)
            return e.exit_code
        except Terminated:
            print("star_export: terminated", file=sys.stderr)
            return 143
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        print("star_export: interrupted", file=sys.stderr)
        return 130
