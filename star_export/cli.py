"""Command line: ``python -m star_export <command>``.

User mistakes (UsageError) exit 2 with one line on stderr, a missing component (TensorRT, a
GPU) exits 3 with one line, a failed parity check exits 1 after writing its report.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from pathlib import Path

from star_export import __version__
from star_export.errors import MissingComponent, UsageError

DEFAULT_RECIPE = "llava-tiny"
GENERIC_PROFILE = {"batch": [1, 2, 8], "text_len": [2, 64, 512]}

EPILOG_LLAVA = """\
examples:
  python -m star_export llava --keep 64
      tiny embedded LLaVA (random weights): export star_out/prefill.onnx, validate, report
  python -m star_export llava --keep 64 --keep1 192 --layer 3 --out run1/
  python -m star_export llava --model ~/ckpt/llava-1.5-7b-hf --recipe llava-1.5-7b --keep 64
      a real checkpoint, exported in its own dtype (fp16) without an fp32 copy
  python -m star_export llava --model ~/ckpt/llava-v1.6-mistral-7b-hf --grid 2x2 --keep 64
      LLaVA-NeXT: one fixed anyres tile grid per export (row newlines always kept)
  python -m star_export llava --model ~/ckpt/Qwen2-VL-7B-Instruct --image-size 448 --keep 64
      Qwen2-VL: one static square resolution per export (M-RoPE positions kept)
  python -m star_export llava --recipe llava-next-tiny   (or qwen2-vl-tiny): tiny embedded models

writes into --out: prefill.onnx (+ prefill.onnx.data for large models), manifest.json (every
tensor name, dtype and shape; STAR settings; pre-processing; versions), report.json (parity).
exit codes: 0 ok, 1 parity failed (report written), 2 usage error, 3 missing TensorRT/GPU.
"""


EPILOG_GENERATE = """\
examples:
  python -m star_export generate --image cat.png --prompt "What is in the image?"
      embedded llava-tiny through the PyTorch rewrite (random weights: the answer is noise)
  python -m star_export llava --keep 64 --out star_out && \\
  python -m star_export generate --from star_out --image cat.png --prompt "What is in the image?"
      the exported prefill.onnx + decode.onnx in onnxruntime
"""


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 2x2, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"expected positive rows and cols, got {text!r}")
    return rows, cols


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on a bad flag."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"star_export: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m star_export",
        description="STAR visual-token pruning for LLaVA, exported as static-shape ONNX / TensorRT with parity proofs.",
    )
    parser.add_argument("--version", action="version", version=f"star_export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "llava",
        help="export a STAR-pruned LLaVA / LLaVA-NeXT / Qwen2-VL prefill to ONNX and validate it",
        description="Rewrite a LLaVA (1.5 or NeXT) or Qwen2-VL prefill with STAR pruning (static shapes: TopK with constant K + "
        "Gather), export prefill.onnx, check it (graph scan, onnxruntime vs PyTorch vs reference vs "
        "the unmodified model) and write manifest.json + report.json.",
        epilog=EPILOG_LLAVA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--keep",
        type=_int,
        default=None,
        metavar="K2",
        help="visual tokens kept by stage 2 (keep2), 1..N; default from the recipe (64)",
    )
    p.add_argument(
        "--keep1",
        type=_int,
        default=None,
        metavar="K1",
        help="visual tokens kept by stage 1, keep..N; default min(N, 2*keep)",
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
        type=Path,
        default=None,
        metavar="DIR",
        help="a checkpoint directory (HF layout): LLaVA-1.5, LLaVA-NeXT or Qwen2-VL; "
        "default: the embedded llava-tiny",
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
        help="also build a TensorRT engine at PATH (needs TensorRT and a CUDA GPU)",
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
        help="LLaVA-NeXT: the fixed anyres tile grid, rows x cols (one of the checkpoint's "
        "image_grid_pinpoints); default 2x2 when listed. Static shapes need one grid per export",
    )
    p.add_argument(
        "--image-size",
        type=_int,
        default=None,
        metavar="PX",
        help="Qwen2-VL: the static square image resolution (a multiple of patch*merge = 28 px); "
        "default 336 (144 visual tokens). Images are resized to PX x PX",
    )
    from star_export.build import add_build_arguments

    add_build_arguments(p, include_engine=False)
    for action in p._actions:  # llava exports: --dtype is the ONNX's precision too
        if action.dest == "dtype":
            action.help = (
                "precision of the export (and of the --engine build); default: the checkpoint's own "
                "dtype (config.json), so fp16/bf16 checkpoints are never widened to fp32"
            )
    p.set_defaults(func=cmd_llava)

    b = sub.add_parser(
        "build",
        help="build TensorRT engines from an exported directory (needs TensorRT + a CUDA GPU)",
        description="Check every graph of --from for TensorRT readiness, then build the prefill engine at "
        "--engine and the decode engine beside it (out.plan -> out.decode.plan) through polygraphy's "
        "TensorRT loaders, with optimization profiles from the manifest (or the --min/opt/max flags), "
        "the precision of --dtype and a reusable --timing-cache; records both in manifest.json. "
        "Exits 3 with the exact command to run on a GPU host when TensorRT or a GPU is missing.",
    )
    b.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="an output directory of `llava`",
    )
    add_build_arguments(b)
    b.set_defaults(func=cmd_build)

    v = sub.add_parser(
        "validate",
        help="re-run the parity checks of an exported directory (and of its TensorRT engines with --trt)",
        description="Parity of --from's graphs against the PyTorch rewrite of the checkpoint recorded in the "
        "manifest (and, with --trt, of the TensorRT engines against onnxruntime through polygraphy's "
        "TrtRunner/OnnxrtRunner/Comparator); writes report.json.",
    )
    v.add_argument("--from", dest="from_dir", type=Path, required=True, metavar="DIR")
    v.add_argument("--trt", action="store_true", help="also compare the TensorRT engines of the manifest")
    v.add_argument("--batch-size", type=_int, default=2, metavar="B")
    v.add_argument("--text-len", type=_int, default=24, metavar="T")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=cmd_validate)

    g = sub.add_parser(
        "generate",
        help="answer a prompt about an image with the pruned model (onnxruntime or PyTorch)",
        description="Pre-process an image and a prompt with the checkpoint's own processor and chat template, "
        "run the STAR-pruned prefill, then greedy or sampled decode steps with per-layer KV caches "
        "(L1 slots before layer K, L2 from K on). With --from DIR it runs the exported graphs in "
        "onnxruntime; with --model DIR (or nothing: the embedded llava-tiny) the PyTorch rewrite.",
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
        help="an output directory of `llava` (manifest.json, prefill.onnx, decode.onnx, processor/)",
    )
    src.add_argument("--model", type=Path, default=None, metavar="DIR", help="a LLaVA checkpoint directory")
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
    g.add_argument("--keep", type=_int, default=None, help="torch runtime: keep2 (default 64)")
    g.add_argument("--keep1", type=_int, default=None, help="torch runtime: keep1")
    g.add_argument("--layer", type=_int, default=None, help="torch runtime: K")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    from star_export import bench

    bn = sub.add_parser(
        "bench",
        help="measure prefill latency and decode tokens/s, pruned vs unpruned, next to the cost model",
        description="Export the unpruned graph (keep1 = keep2 = N) and pruned ones, then time them in one process, "
        "interleaved: HF PyTorch eager (unmodified), the PyTorch rewrite, onnxruntime unpruned and pruned "
        "(TensorRT where present). Prints one table with each speedup next to the analytical cost model's "
        "ceiling, writes bench.json and bench.png into --out. Default recipe: llava-bench (about 11 minutes "
        "on 2 CPU cores).",
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


def _quiet_libraries() -> None:
    for name in (
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
        "torch._export",
        "torch.export",
        "transformers",
        "onnxscript",
        "torch._dynamo",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _step(i: int, n: int, text: str) -> float:
    print(f"[{i}/{n}] {text}", flush=True)
    return time.perf_counter()


@contextlib.contextmanager
def _heartbeat(label: str, every: float = 30.0):
    """Print a line every ``every`` seconds while a long step runs (a 7B export is silent for minutes)."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            print(f"      ... {label} ({time.perf_counter() - start:.0f}s)", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def cmd_llava(args: argparse.Namespace) -> int:
    from star_export.outputs import check_out_dir

    check_out_dir(args.out)
    if args.engine is not None and args.engine.exists() and args.engine.is_dir():
        raise UsageError(f"--engine {args.engine}: is a directory")
    if args.model is None and args.recipe is None:
        args.recipe = DEFAULT_RECIPE
    _quiet_libraries()

    from star_export import load as load_mod
    from star_export.recipes import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    if args.model is not None:
        load_mod.read_config(args.model)  # fails fast, before any weight is read
        if recipe is not None:
            _check_expectations(args.model, recipe)
    elif recipe is not None and not recipe.embedded:
        raise UsageError(f"recipe {recipe.name!r} needs a checkpoint: pass --model DIR")

    star_defaults = recipe.star if recipe else {}
    keep = args.keep if args.keep is not None else int(star_defaults.get("keep", 64))
    layer = args.layer if args.layer is not None else int(star_defaults.get("layer", 2))

    import torch

    # default precision: the checkpoint's own (fp16/bf16 checkpoints are never widened to an fp32 copy)
    model_dir = load_mod.materialise(recipe) if args.model is None else args.model
    export_dtype = args.dtype or load_mod.checkpoint_dtype(model_dir)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[export_dtype]
    onnx_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[export_dtype]
    n_steps = 3 if args.skip_validation else 4
    from transformers import AutoConfig

    from star_export.star import StarConfig

    # geometry and STAR settings from config.json alone: bad settings fail before weights load
    try:
        model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"--model {model_dir}: cannot read its config: {str(e).splitlines()[0]}") from None
    if (
        args.image_size is None
        and recipe is not None
        and recipe.architecture == "Qwen2VLForConditionalGeneration"
    ):
        args.image_size = recipe.image.get("size")  # the recipe's static resolution
    geo = load_mod.geometry_of(model_config, args.grid, args.image_size)
    cfg = StarConfig.resolve(
        keep=keep, keep1=args.keep1, layer=layer, n_visual=geo.n_visual, num_layers=geo.num_layers
    )
    profile = recipe.profile if recipe and recipe.profile else GENERIC_PROFILE
    b_lo, b_opt, b_hi = profile["batch"]
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    b_opt = args.batch_size
    b_hi = max(b_hi, args.batch_size)
    t_lo, t_opt, t_hi = profile["text_len"]
    if args.text_len < 5 or args.text_len > t_hi:
        raise UsageError(
            f"--text-len must be in 5..{t_hi} (the profile's max text length), got {args.text_len}"
        )
    t0 = _step(1, n_steps, f"loading {'recipe ' + recipe.name if args.model is None else args.model}")
    if args.model is None:
        loaded = load_mod.load(
            model_dir,
            source=f"recipe:{recipe.name}",
            dtype=torch_dtype,
            grid=args.grid,
            image_size=args.image_size,
        )
    else:
        loaded = load_mod.load(args.model, dtype=torch_dtype, grid=args.grid, image_size=args.image_size)
    print(
        f"      {loaded.source}: N={geo.n_visual}, {geo.num_layers} layers, heads {geo.num_heads}/"
        f"{geo.num_kv_heads} kv; keep1={cfg.keep1} keep2={cfg.keep2} K={cfg.layer} "
        f"({time.perf_counter() - t0:.1f}s)"
    )

    from star_export.contract import decode_contract, prefill_contract
    from star_export.export import OPSET, example_decode_inputs, export_onnx
    from star_export.manifest import build_manifest
    from star_export.outputs import staged, write_json
    from star_export.rewrite import decode_module, prefill_module

    max_new = int(profile.get("max_new_tokens", 256))
    text_range = (max(2, t_lo), t_opt, t_hi)
    contract = prefill_contract(geo, cfg, (b_lo, b_opt, b_hi), text_range, dtype=onnx_dtype)
    dcontract = decode_contract(geo, cfg, (b_lo, b_opt, b_hi), text_range, max_new, dtype=onnx_dtype)
    with staged(args.out, owned=LLAVA_OUTPUTS) as stage:
        t0 = _step(
            2, n_steps, f"exporting prefill.onnx and decode.onnx (torch.onnx dynamo exporter, opset {OPSET})"
        )
        onnx_path = stage / "prefill.onnx"
        decode_path = stage / "decode.onnx"
        with _heartbeat("exporting prefill.onnx"):
            export_onnx(
                prefill_module(loaded.model, geo, cfg).eval(), contract, onnx_path, geo.image_token_id
            )
        print(f"      prefill.onnx: batch, text_len dynamic ({time.perf_counter() - t0:.1f}s)")
        t0 = time.perf_counter()
        with _heartbeat("exporting decode.onnx"):
            export_onnx(
                decode_module(loaded.model, geo, cfg).eval(),
                dcontract,
                decode_path,
                example_args=example_decode_inputs(dcontract),
            )
        print(f"      decode.onnx: batch, past_len dynamic ({time.perf_counter() - t0:.1f}s)")
        tokenizer = copy_processor_files(loaded.model_dir, stage / "processor")

        t0 = _step(3, n_steps, "scanning the graphs (static shapes, TensorRT readiness)")
        from star_export.check import check_onnx

        scans = {}
        for path, c in ((onnx_path, contract), (decode_path, dcontract)):
            scans[c.graph] = scan = check_onnx(path, dynamic_inputs=c.dynamic_axes())
            print(
                f"      {path.name}: {'ok' if scan.ok else 'FAIL'}, {sum(scan.op_counts.values())} nodes, "
                f"TopK x{scan.op_counts.get('TopK', 0)} (constant K), {len(scan.errors)} errors"
            )
        scan_ok = all(s.ok for s in scans.values())

        report = None
        if not args.skip_validation and export_dtype != "fp32":
            print(
                f"      {export_dtype}: parity is proven on the fp32 export (CPU) and for {export_dtype} against "
                "TensorRT by `validate --trt` on a GPU host; skipping the CPU checks"
            )
        if not args.skip_validation and export_dtype == "fp32":
            from star_export.validate import validate, validate_generation

            t0 = _step(
                4,
                n_steps,
                f"validating (B={max(2, args.batch_size)}, T={args.text_len}, left padding): "
                "onnxruntime vs torch rewrite vs reference vs unmodified model",
            )
            batch = max(2, args.batch_size)
            report = validate(
                loaded.model,
                geo,
                cfg,
                contract,
                str(onnx_path),
                seed=args.seed,
                batch=batch,
                text_len=args.text_len,
            )
            validate_generation(
                report,
                loaded.model,
                geo,
                cfg,
                contract,
                dcontract,
                str(onnx_path),
                str(decode_path),
                seed=args.seed,
                batch=batch,
                text_len=args.text_len,
            )
            report.graph_check = {"ok": scan_ok, **{name: sc.to_dict() for name, sc in scans.items()}}
            print(report.format())
            print(f"      done ({time.perf_counter() - t0:.1f}s)")
            write_json(stage / "report.json", report.to_dict())

        files = sorted(f for f in stage.iterdir() if f.name.startswith(("prefill.onnx", "decode.onnx")))
        manifest = build_manifest(
            contracts=[contract, dcontract],
            cfg=cfg,
            geo=geo,
            model_dir=loaded.model_dir,
            source=loaded.source,
            files=files,
            opset=OPSET,
            max_new_tokens=max_new,
            dtype=onnx_dtype,
            tokenizer=tokenizer,
        )
        write_json(stage / "manifest.json", manifest)

    written = ", ".join(sorted(f.name for f in args.out.iterdir() if not f.name.startswith(".")))
    print(f"wrote {args.out}/: {written}")
    if not scan_ok:
        for sc in scans.values():
            if not sc.ok:
                print(sc.format(), file=sys.stderr)
        print("star_export: graph scan failed (see above)", file=sys.stderr)
        return 1
    if report is not None and not report.passed:
        print(f"star_export: parity FAILED, see {args.out / 'report.json'}", file=sys.stderr)
        return 1
    if args.engine is not None:
        from star_export.build import run_build

        print("[build] TensorRT engines (prefill + decode)")
        return run_build(args, args.out)
    return 0


LLAVA_OUTPUTS = (
    "prefill.onnx",
    "prefill.onnx.data",
    "decode.onnx",
    "decode.onnx.data",
    "processor",
    "manifest.json",
    "report.json",
)
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)


def copy_processor_files(model_dir: Path, target: Path) -> dict:
    """Copy the checkpoint's tokenizer / processor files so the output directory is self-contained."""
    import shutil

    copied = [name for name in PROCESSOR_FILES if (model_dir / name).is_file()]
    if copied:
        target.mkdir(parents=True, exist_ok=True)
        for name in copied:
            shutil.copy2(model_dir / name, target / name)
    return {"directory": "processor" if copied else None, "files": copied}


def _check_expectations(model_dir: Path, recipe) -> None:
    """A recipe's [expect] table against the directory's config.json."""
    from star_export.load import read_config

    cfg = read_config(model_dir)
    vc, tc = cfg.get("vision_config", {}), cfg.get("text_config", {})
    actual = {
        "image_seq_length": cfg.get("image_seq_length"),
        "vision_image_size": vc.get("image_size"),
        "vision_patch_size": vc.get("patch_size"),
        "text_model_type": tc.get("model_type"),
        "text_num_hidden_layers": tc.get("num_hidden_layers"),
    }
    for key, want in recipe.expect.items():
        if key in actual and actual[key] is not None and actual[key] != want:
            raise UsageError(
                f"--model {model_dir}: {key} is {actual[key]}, recipe {recipe.name!r} expects {want}"
            )


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


from star_export.manifest import read_manifest  # noqa: E402  (light: json + stdlib)


def cmd_build(args: argparse.Namespace) -> int:
    from star_export.build import run_build

    if args.engine is None:
        raise UsageError("build needs --engine PATH (the decode engine goes beside it)")
    read_manifest(args.from_dir)
    return run_build(args, args.from_dir)


def cmd_validate(args: argparse.Namespace) -> int:
    """Parity of an exported directory, from its manifest; --trt adds the engines."""
    import json

    _quiet_libraries()
    from star_export.build import trt_parity, trt_status
    from star_export.contract import contract_from_dict
    from star_export.load import load as load_model
    from star_export.outputs import write_json
    from star_export.star import StarConfig
    from star_export.validate import make_inputs, row_alone, validate, validate_generation

    manifest = read_manifest(args.from_dir)
    st = manifest["star"]
    cfg = StarConfig(keep2=st["keep2"], keep1=st["keep1"], layer=st["layer_K"])
    pc = contract_from_dict(manifest["graphs"]["prefill"])
    dc = contract_from_dict(manifest["graphs"]["decode"])
    engines = manifest.get("engines") or {}
    if args.trt:
        ok, why = trt_status()
        if not ok:
            raise MissingComponent(f"--trt: {why}; run this command on a GPU host with TensorRT")
        if "prefill" not in engines:
            raise UsageError(f"--from {args.from_dir}: no engines in the manifest; run `build` first")
    prefill_path, decode_path = args.from_dir / "prefill.onnx", args.from_dir / "decode.onnx"
    batch = max(2, args.batch_size)
    dtype = manifest["graphs"]["prefill"].get("dtype", "float32")
    if dtype != "float32":
        # reduced precision: no CPU reference of the same dtype; TensorRT vs onnxruntime only
        if not args.trt:
            raise UsageError(
                f"--from {args.from_dir}: a {dtype} export is validated against TensorRT: add --trt"
            )
        from star_export.load import Geometry
        from star_export.validate import ParityReport

        geo = Geometry(**manifest["model"]["geometry"])
        feeds = make_inputs(geo, batch=batch, text_len=args.text_len, seed=args.seed)
        feeds["pixel_values"] = feeds["pixel_values"].astype(dtype if dtype != "bfloat16" else "float32")
        report = ParityReport(inputs={"seed": args.seed, "batch": batch, "text_len": args.text_len})
        report.trt = trt_parity(
            Path(engines["prefill"]["path"]),
            prefill_path,
            pc,
            [feeds],
            engines["prefill"].get("dtype", "fp16"),
        )
        write_json(args.from_dir / "report.json", report.to_dict())
        print(json.dumps(report.trt, indent=1))
        return 0 if report.passed else 1
    loaded = load_model(manifest["model"]["directory"])
    geo = loaded.geometry
    report = validate(
        loaded.model, geo, cfg, pc, str(prefill_path), seed=args.seed, batch=batch, text_len=args.text_len
    )
    validate_generation(
        report,
        loaded.model,
        geo,
        cfg,
        pc,
        dc,
        str(prefill_path),
        str(decode_path),
        seed=args.seed,
        batch=batch,
        text_len=args.text_len,
    )
    if args.trt:
        feeds = make_inputs(geo, batch=batch, text_len=args.text_len, seed=args.seed)
        rows = trt_parity(
            Path(engines["prefill"]["path"]),
            prefill_path,
            pc,
            [feeds, row_alone(feeds, batch - 1)],
            engines["prefill"].get("dtype", "fp32"),
        )
        report.trt = rows
    print(report.format())
    write_json(args.from_dir / "report.json", report.to_dict())
    print(f"wrote {args.from_dir / 'report.json'}")
    return 0 if report.passed else 1


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    images, prompts = args.image, args.prompt
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise UsageError(
            f"{len(images)} --image but {len(prompts)} --prompt: give one image, or one per prompt"
        )
    for image in images:
        if not image.is_file():
            raise UsageError(f"--image {image}: no such file")
    runtime = args.runtime or ("onnxruntime" if args.from_dir else "torch")
    _quiet_libraries()

    from star_export.contract import decode_contract, prefill_contract
    from star_export.load import Geometry
    from star_export.preprocess import Preprocessor
    from star_export.runtime import GenerationConfig, OnnxruntimeBackend, TorchBackend, generate
    from star_export.star import StarConfig

    if args.from_dir is not None:
        manifest = read_manifest(args.from_dir)
        if args.keep or args.keep1 or args.layer:
            raise UsageError("--keep/--keep1/--layer are fixed by the exported graphs of --from")
        geo = Geometry(**manifest["model"]["geometry"])
        st = manifest["star"]
        cfg = StarConfig(keep2=st["keep2"], keep1=st["keep1"], layer=st["layer_K"])
        dims = {d["name"]: d for g in manifest["graphs"].values() for d in g["dynamic_dims"]}
        text_max, past_max = dims["text_len"]["max"], dims["past_len"]["max"]
        pre = Preprocessor.from_dir(args.from_dir / "processor", geometry=geo)
        if runtime == "onnxruntime":
            backend = OnnxruntimeBackend(args.from_dir / "prefill.onnx", args.from_dir / "decode.onnx")
            where = f"{args.from_dir}/ (prefill.onnx + decode.onnx)"
        else:
            from star_export.load import load as load_model

            loaded = load_model(manifest["model"]["directory"])
            backend = _torch_backend(loaded, geo, cfg, manifest)
            where = f"PyTorch rewrite of {loaded.source}"
    else:
        if runtime == "onnxruntime":
            raise UsageError(
                "--runtime onnxruntime needs exported graphs: run `llava --out DIR`, then --from DIR"
            )
        from star_export import load as load_mod
        from star_export.recipes import load_recipe

        if args.model is None:
            loaded = load_mod.load_recipe_model(load_recipe(DEFAULT_RECIPE))
        else:
            loaded = load_mod.load(args.model)
        geo = loaded.geometry
        cfg = StarConfig.resolve(
            keep=args.keep or 64,
            keep1=args.keep1,
            layer=args.layer or 2,
            n_visual=geo.n_visual,
            num_layers=geo.num_layers,
        )
        text_max, past_max = 1 << 30, 1 << 30
        pc = prefill_contract(geo, cfg, (1, 1, 1 << 30), (2, 2, 1 << 30))
        dc = decode_contract(geo, cfg, (1, 1, 1 << 30), (2, 2, 1 << 30), 1 << 20)
        pre = Preprocessor.from_dir(loaded.model_dir, geometry=geo)
        backend = TorchBackend(loaded.model, geo, cfg, pc, dc)
        where = f"PyTorch rewrite of {loaded.source}"

    feeds = pre.encode(images, prompts)
    text_len = feeds["input_ids"].shape[1]
    if text_len > text_max:
        raise UsageError(f"prompt is {text_len} tokens; the exported profile allows at most {text_max}")
    if text_len - 1 + geo.span(cfg.keep2) + args.max_new_tokens - 1 > past_max:
        allowed = past_max - (text_len - 1 + geo.span(cfg.keep2)) + 1
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens} exceeds the exported decode profile "
            f"(at most {allowed} for this prompt)"
        )
    stops = tuple(t for t in (pre.eos_token_id, *(args.stop or [])) if t is not None)
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stops,
        pad_token_id=pre.pad_token_id or 0,
    )
    result = generate(backend, feeds, geo, cfg, gen)
    answers = [pre.decode(t) for t in result.tokens]
    per_token = result.decode_s / max(result.decode_steps, 1)
    if args.json:
        import json

        print(
            json.dumps(
                {
                    "runtime": runtime,
                    "answers": answers,
                    "tokens": result.tokens,
                    "visual_tokens": {
                        "N": geo.n_visual,
                        "keep1": cfg.keep1,
                        "keep2": cfg.keep2,
                        "layer_K": cfg.layer,
                    },
                    "stage2_keep_idx": result.stage2_keep_idx.tolist(),
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
    print(f"runtime: {runtime}, {where}")
    print(
        f"visual tokens: {geo.n_visual} -> {cfg.keep1} (stage 1) -> {cfg.keep2} (stage 2, from layer {cfg.layer})"
        f"{f' + {geo.n_fixed} row newlines' if geo.n_fixed else ''}; "
        f"KV cache per layer after prefill: {result.prefill_present_lengths}"
    )
    for prompt, image, answer in zip(prompts, images, answers, strict=True):
        print(f"[{image.name}] {prompt}\n  -> {answer}")
    print(
        f"prefill {result.prefill_s * 1e3:.1f} ms; decode {result.decode_steps} steps in "
        f"{result.decode_s * 1e3:.1f} ms ({per_token * 1e3:.2f} ms/step, {result.decode_tokens_per_s:.0f} tokens/s)"
    )
    return 0


def _torch_backend(loaded, geo, cfg, manifest):
    from star_export.contract import contract_from_dict
    from star_export.runtime import TorchBackend

    graphs = manifest["graphs"]
    return TorchBackend(
        loaded.model, geo, cfg, contract_from_dict(graphs["prefill"]), contract_from_dict(graphs["decode"])
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (UsageError, MissingComponent) as e:
        print(f"star_export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("star_export: interrupted", file=sys.stderr)
        return 130
