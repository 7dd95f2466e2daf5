"""``export`` (and ``llava``, the same command under its headline name): export a STAR-pruned model
to ONNX, validate it, and with ``--engine`` build its TensorRT engines."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from star_export.commands.argtypes import grid, image_size, integer, integers, keeps
from star_export.errors import UsageError
from star_export.families import FAMILIES, option_families

NAME = "export"
HELP = f"the same as llava, for every family ({', '.join(f.name for f in FAMILIES)})"
DESCRIPTION = (
    "Rewrite a vision-language model's prefill with STAR pruning (static shapes: TopK with "
    "constant K + Gather), export prefill.onnx and decode.onnx, check them (graph scan, "
    "onnxruntime vs PyTorch vs the dynamic reference vs the unmodified model, greedy decoding) "
    "and write processor/, manifest.json and report.json."
)
EPILOG = """\
examples:
  python -m star_export llava --keep 64
      tiny embedded LLaVA (random weights): export star_out/, validate, report
  python -m star_export llava --keep 64 --keep1 192 --layer 3 --out run1/
  python -m star_export llava --keep 16:128 --out star_range   # one prefill graph, any keep 16..128
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


def _takers(option: str) -> str:
    """The families that take a family-specific option, for its help."""
    return ", ".join(option_families(option))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``llava`` / ``export``."""
    p.add_argument(
        "--keep",
        type=keeps,
        default=None,
        metavar="K2[,K2...]|MIN:MAX",
        help="visual tokens kept by stage 2 (keep2), 1..N; default from the recipe (64). Several levels "
        "(32,64,128): one prefill graph each, the first the default, one decode graph and the weights "
        "shared; a request picks its level (generate --keep, the Triton pipeline's keep input). A range "
        "(16:128, or 16:64:128 to name the default): ONE prefill graph whose TopK K comes from the "
        "length of its input keep_slots [B, keep2], keep1 = min(N, 2*keep2); any keep in the range per request",
    )
    p.add_argument(
        "--keep1",
        type=integers,
        default=None,
        metavar="K1[,K1...]",
        help="visual tokens kept by stage 1, keep..N, one per keep level; default min(N, 2*keep)",
    )
    p.add_argument(
        "--layer",
        type=integer,
        default=None,
        metavar="K",
        help="first decoder layer that sees the stage-2 sequence, 1..layers-1; default 2",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR|ORG/NAME|demo:NAME",
        help="a checkpoint directory (Hugging Face layout), a hub id resolved in the local Hugging Face "
        "cache, or a shipped trained demo (demo:llava-demo, demo:qwen3-vl-demo); default: "
        "demo:llava-demo, or with "
        "--recipe that recipe's embedded random model",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="NAME|FILE",
        help="recipe name in recipes/ or a .toml path (profile ranges, expectations); without --model, "
        "its embedded random model (llava-tiny: the fast tests' model)",
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
        type=integer,
        default=2,
        metavar="B",
        help="batch of the validation inputs and the profile's opt batch (default 2)",
    )
    p.add_argument(
        "--text-len",
        type=integer,
        default=24,
        metavar="T",
        help="prompt length of the validation inputs (default 24)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs")
    p.add_argument("--skip-validation", action="store_true", help="export only, no parity checks")
    p.add_argument(
        "--grid",
        type=grid,
        default=None,
        metavar="RxC",
        help=f"the fixed anyres tile grid, rows x cols, one of the checkpoint's image_grid_pinpoints "
        f"(default 2x2 when listed); families: {_takers('grid')}. Static shapes need one grid per export",
    )
    p.add_argument(
        "--image-size",
        type=image_size,
        default=None,
        metavar="PX|HxW",
        help=f"the static image resolution, PX (square) or HxW (height x width: keep your images' aspect "
        f"ratio, e.g. 336x448 for 3:4), multiples of the checkpoint's patch size x merge size, within its "
        f"processor's min/max pixels; default: the family's; images are resized to it; families: "
        f"{_takers('image_size')}",
    )
    from star_export.engines import add_build_arguments
    from star_export.flags import describe_export_flags

    add_build_arguments(p, include_engine=False)
    describe_export_flags(p)  # --dtype and the profile flags are the export's too


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


def run(args: argparse.Namespace) -> int:
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
