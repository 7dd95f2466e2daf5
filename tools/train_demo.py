"""Train a demo checkpoint on the synthetic question set (star_export/demo): seeded, resumable.

    python tools/train_demo.py --out star_export/data/demo/llava-demo            # the shipped LLaVA
    python tools/train_demo.py --recipe llava-demo --steps 200 --out /tmp/probe  # a short probe

Interrupt it and run the same command again to resume from OUT/.train/state.pt. Writes the
checkpoint (safetensors, tokenizer, chat template, image processor), training.json (settings,
validation and test exact match per question kind) and training.png (loss and accuracy curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from star_export.demo.train import TrainConfig, train


def _boolean(text: str) -> bool:
    """``--code-place false``: argparse's ``bool`` would read any non-empty word as True."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", required=True, help="checkpoint directory to write (resumed when it holds .train/)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=_boolean if isinstance(getattr(defaults, f.name), bool) else type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"default {getattr(defaults, f.name)}",
        )
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        card = train(args.out, cfg)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume from {args.out}/.train", file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"train_demo: {e}", file=sys.stderr)
        return 2
    print(json.dumps(card["test_exact_match"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
