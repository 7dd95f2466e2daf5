"""What fp16 (and bf16) do to STAR's selections and logits, on the embedded tiny recipes.

For each recipe: ``python -m star_export llava --recipe R --dtype fp16`` (the export and its CPU
validation: onnxruntime fp16 vs the PyTorch rewrite in fp16 and in fp32), then the numbers the
README quotes are read back from report.json: per comparison, the selection overlap |A & B| / k and
the largest score gap of a disagreeing token (relative to the cut) next to the margin, the score
noise near the cut (the dtype's rounding emulated on the fp32 path, which sets the margin, and the
half-precision rewrite's own), and the logits error (with the selection forced where the selections differ). bf16 cannot run in
onnxruntime's CPU provider; ``--bf16`` adds the PyTorch bf16-vs-fp32 rows (``validate_half``).

    python tools/precision_report.py                      # llava-tiny, llava-next-tiny, qwen2-vl-tiny
    python tools/precision_report.py --recipes llava-tiny --bf16 --json bench/results/precision.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RECIPES = ("llava-tiny", "llava-next-tiny", "qwen2-vl-tiny")
CHECKS = (
    "torch fp16 vs torch fp32 (batch)",
    "onnxruntime fp16 vs torch fp16 (batch)",
    "onnxruntime fp16 vs torch fp32 (batch)",
)


def noise_figures(inputs: dict) -> dict:
    """The score noise near the cut (``precision_noise``): the dtype's rounding emulated on fp32, and
    the half-precision rewrite's own, per stage."""
    n = inputs.get("score_noise") or {}
    if not n:
        return {}
    return {"noise_emulated": n["emulated"], "noise_measured": n["measured"], "noise_cap": n["cap"]}


def summarise(rows: list[dict], checks: tuple[str, ...], inputs: dict | None = None) -> list[dict]:
    """One line per comparison: stage-1/2 overlap and gap vs margin, logits error and its rule (and
    the score noise near the cut from ``inputs``)."""
    extra = noise_figures(inputs or {})
    noise_ok = all(r["passed"] for r in rows if r.get("rule") == "noise")
    out = []
    for check in checks:
        got = {r["output"]: r for r in rows if r["check"] == check}
        if not got:
            continue
        s1, s2, lg = got["stage1_keep_idx"], got["stage2_keep_idx"], got["logits"]
        out.append(
            {
                "check": check,
                "stage1_overlap": s1["overlap"],
                "stage1_gap": s1["gap"],
                "stage1_margin": s1["tolerance"],
                "stage2_overlap": s2["overlap"],
                "stage2_gap": s2["gap"],
                "stage2_margin": s2["tolerance"],
                "logits_max_rel": lg["max_rel"],
                "logits_rule": lg["rule"],
                "logits_tolerance": lg["tolerance"],
                "passed": noise_ok and all(r["passed"] for r in got.values()),
                **extra,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="validation inputs")
    p.add_argument("--bf16", action="store_true", help="also the PyTorch bf16 vs fp32 rows")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from star_export import api
    from star_export.validate import validate_directory

    results = []
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            api.export(recipe=recipe, keep=args.keep, dtype="fp16", out=out, validate=False)
            for seed in args.seeds:
                report = validate_directory(out, seed=seed)
                for line in summarise([r.to_dict() for r in report.rows], CHECKS, report.inputs):
                    results.append({"recipe": recipe, "seed": seed, **line})
        if args.bf16:
            results += bf16_rows(recipe, args.keep, args.seeds)
    print(
        f"{'recipe':<16} {'seed':>4} {'comparison':<40} {'s1 ovl':>6} {'s1 gap/margin':>15} "
        f"{'s2 ovl':>6} {'s2 gap/margin':>15} {'logits rel':>10} {'noise s1/s2 (emulated; rewrite)':>34} rule"
    )
    for r in results:
        print(
            f"{r['recipe']:<16} {r['seed']:>4} {r['check']:<40} {r['stage1_overlap']:>6.3f} "
            f"{r['stage1_gap']:>7.1e}/{r['stage1_margin']:<7.1e} {r['stage2_overlap']:>6.3f} "
            f"{r['stage2_gap']:>7.1e}/{r['stage2_margin']:<7.1e} {r['logits_max_rel']:>10.2e} "
            f"{noise_cell(r):>34} {r['logits_rule']}" + ("" if r["passed"] else "  FAIL")
        )
    if args.json:
        args.json.write_text(json.dumps({"keep": args.keep, "rows": results}, indent=2) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


def noise_cell(r: dict) -> str:
    if "noise_emulated" not in r:
        return ""
    e, m = r["noise_emulated"], r["noise_measured"]
    return f"{e[0]:.1e}/{e[1]:.1e}; {m[0]:.1e}/{m[1]:.1e}"


def bf16_rows(recipe: str, keep: int, seeds: list[int]) -> list[dict]:
    """The bf16 rewrite against fp32 (no onnxruntime: its CPU provider has no bfloat16 kernels)."""
    import torch

    from star_export.contract import prefill_contract
    from star_export.load import load_recipe_model
    from star_export.recipes import load_recipe
    from star_export.star import StarConfig
    from star_export.validate import validate_half

    rec = load_recipe(recipe)
    low, full = load_recipe_model(rec, dtype=torch.bfloat16), load_recipe_model(rec)
    geo = low.geometry
    cfg = StarConfig.resolve(keep=keep, keep1=None, layer=2, n_visual=geo.n_visual, num_layers=geo.num_layers)
    contract = prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128), dtype="bfloat16")
    rows = []
    for seed in seeds:
        report = validate_half(low.model, full.model, geo, cfg, contract, None, "bfloat16", seed=seed)
        for line in summarise(
            [r.to_dict() for r in report.rows], ("torch bf16 vs torch fp32 (batch)",), report.inputs
        ):
            rows.append({"recipe": recipe, "seed": seed, **line})
    return rows
