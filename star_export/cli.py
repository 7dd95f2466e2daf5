"""Command line: ``python -m star_export <command>``.

User mistakes (UsageError) exit 2 with one line on stderr, a missing component (TensorRT, a
GPU) exits 3 with one line, a failed parity check exits 1 after writing its report.
"""

from __future__ import annotations

import argparse
import logging
import sys
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

writes into --out: prefill.onnx (+ prefill.onnx.data for large models), manifest.json (every
tensor name, dtype and shape; STAR settings; pre-processing; versions), report.json (parity).
exit codes: 0 ok, 1 parity failed (report written), 2 usage error, 3 missing TensorRT/GPU.
"""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


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
        help="export a STAR-pruned LLaVA prefill to ONNX and validate it",
        description="Rewrite a LLaVA prefill with STAR pruning (static shapes: TopK with constant K + "
        "Gather), export prefill.onnx, check it (graph scan, onnxruntime vs PyTorch vs reference vs "
        "the unmodified model) and write manifest.json + report.json.",
        epilog=EPILOG_LLAVA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--keep",
        type=_positive,
        default=None,
        metavar="K2",
        help="visual tokens kept by stage 2 (keep2), 1..N; default from the recipe (64)",
    )
    p.add_argument(
        "--keep1",
        type=_positive,
        default=None,
        metavar="K1",
        help="visual tokens kept by stage 1, keep..N; default min(N, 2*keep)",
    )
    p.add_argument(
        "--layer",
        type=_positive,
        default=None,
        metavar="K",
        help="first decoder layer that sees the stage-2 sequence, 1..layers-1; default 2",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="a LLaVA checkpoint directory (HF layout); default: the embedded llava-tiny",
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
        type=_positive,
        default=2,
        metavar="B",
        help="batch of the validation inputs and the profile's opt batch (default 2)",
    )
    p.add_argument(
        "--text-len",
        type=_positive,
        default=24,
        metavar="T",
        help="prompt length of the validation inputs (default 24)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs")
    p.add_argument("--skip-validation", action="store_true", help="export only, no parity checks")
    p.set_defaults(func=cmd_llava)

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

    n_steps = 3 if args.skip_validation else 4
    t0 = _step(1, n_steps, f"loading {'recipe ' + recipe.name if args.model is None else args.model}")
    if args.model is None:
        loaded = load_mod.load_recipe_model(recipe)
    else:
        loaded = load_mod.load(args.model)
    geo = loaded.geometry

    from star_export.star import StarConfig

    cfg = StarConfig.resolve(
        keep=keep, keep1=args.keep1, layer=layer, n_visual=geo.n_visual, num_layers=geo.num_layers
    )
    profile = recipe.profile if recipe and recipe.profile else GENERIC_PROFILE
    b_lo, b_opt, b_hi = profile["batch"]
    b_opt = args.batch_size
    b_hi = max(b_hi, args.batch_size)
    t_lo, t_opt, t_hi = profile["text_len"]
    if args.text_len < 5 or args.text_len > t_hi:
        raise UsageError(
            f"--text-len must be in 5..{t_hi} (the profile's max text length), got {args.text_len}"
        )
    print(
        f"      {loaded.source}: N={geo.n_visual}, {geo.num_layers} layers, heads {geo.num_heads}/"
        f"{geo.num_kv_heads} kv; keep1={cfg.keep1} keep2={cfg.keep2} K={cfg.layer} "
        f"({time.perf_counter() - t0:.1f}s)"
    )

    from star_export.contract import prefill_contract
    from star_export.export import OPSET, export_onnx
    from star_export.manifest import build_manifest
    from star_export.outputs import staged, write_json
    from star_export.rewrite import StarPrefill

    contract = prefill_contract(geo, cfg, (b_lo, b_opt, b_hi), (max(2, t_lo), t_opt, t_hi))
    with staged(args.out) as stage:
        t0 = _step(
            2,
            n_steps,
            f"exporting prefill.onnx (torch.onnx dynamo exporter, opset {OPSET}; batch and text_len dynamic)",
        )
        onnx_path = stage / "prefill.onnx"
        export_onnx(StarPrefill(loaded.model, geo, cfg).eval(), contract, onnx_path, geo.image_token_id)
        print(f"      done ({time.perf_counter() - t0:.1f}s)")

        t0 = _step(3, n_steps, "scanning the graph (static shapes, TensorRT readiness)")
        from star_export.check import check_onnx

        scan = check_onnx(onnx_path, dynamic_inputs=contract.dynamic_axes())
        print(
            f"      {'ok' if scan.ok else 'FAIL'}: {sum(scan.op_counts.values())} nodes, "
            f"TopK x{scan.op_counts.get('TopK', 0)} with constant K, {len(scan.errors)} errors"
        )

        report = None
        if not args.skip_validation:
            from star_export.validate import validate

            t0 = _step(
                4,
                n_steps,
                f"validating (B={args.batch_size}, T={args.text_len}, left padding): "
                "onnxruntime vs torch rewrite vs reference vs unmodified model",
            )
            report = validate(
                loaded.model,
                geo,
                cfg,
                contract,
                str(onnx_path),
                seed=args.seed,
                batch=max(2, args.batch_size),
                text_len=args.text_len,
            )
            report.graph_check = scan.to_dict()
            print(report.format())
            print(f"      done ({time.perf_counter() - t0:.1f}s)")
            write_json(stage / "report.json", report.to_dict())

        files = sorted(f for f in stage.iterdir() if f.name.startswith("prefill.onnx"))
        manifest = build_manifest(
            contract=contract,
            cfg=cfg,
            geo=geo,
            model_dir=loaded.model_dir,
            source=loaded.source,
            files=files,
            opset=OPSET,
        )
        write_json(stage / "manifest.json", manifest)

    written = ", ".join(sorted(f.name for f in args.out.iterdir() if not f.name.startswith(".")))
    print(f"wrote {args.out}/: {written}")
    if not scan.ok:
        print(scan.format(), file=sys.stderr)
        print("star_export: graph scan failed (see above)", file=sys.stderr)
        return 1
    if report is not None and not report.passed:
        print(f"star_export: parity FAILED, see {args.out / 'report.json'}", file=sys.stderr)
        return 1
    if args.engine is not None:
        raise MissingComponent(
            f"--engine {args.engine}: TensorRT engine building is not available in this version yet; "
            f"the ONNX graph, manifest and report are in {args.out}/"
        )
    return 0


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
