"""One parity comparison, the unit every check is made of (``validate``, ``engines.parity``,
``bench.gpu.parity``): seeded inputs (a left-padded batch, a row alone, pixels cast to the export's
dtype), the PyTorch rewrite as a runner (``Rewrite``: its scores and forced selections as numpy), and
one side's outputs against the rewrite (``check_side``: selections by the margin rule, then logits and
caches directly, or forced to that side's selection where they differ).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from star_export import selection
from star_export.contract import KEEP_INPUT
from star_export.geometry import Geometry
from star_export.parity import ParityReport
from star_export.runtime import keep_slots
from star_export.star import StarConfig

SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def make_inputs(
    geo: Geometry, batch: int = 2, text_len: int = 24, pad: int = 5, seed: int = 0, keep: int | None = None
) -> OrderedDict[str, np.ndarray]:
    """Seeded random images and prompts: row 0 full length, the other rows left padded by ``pad``.

    Each row holds one image placeholder with at least 2 real tokens before it and 2 after.
    ``keep``: also ``keep_slots`` [batch, keep] (a keep range's graph reads only its length).
    """
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, *geo.pixel_shape, generator=g)
    low = 3
    ids = torch.randint(low, geo.vocab_size, (batch, text_len), generator=g)
    ids[ids == geo.image_token_id] = low
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    for b in range(batch):
        n_pad = 0 if b == 0 else min(pad, text_len - 5)
        mask[b, :n_pad] = 0
        ids[b, :n_pad] = 0
        p = int(torch.randint(n_pad + 2, text_len - 2, (1,), generator=g))
        ids[b, p] = geo.image_token_id
    out = OrderedDict(pixel_values=pixel_values.numpy(), input_ids=ids.numpy(), attention_mask=mask.numpy())
    if keep is not None:
        out[KEEP_INPUT] = keep_slots(batch, keep)
    return out


def row_alone(feeds: OrderedDict[str, np.ndarray], b: int) -> OrderedDict[str, np.ndarray]:
    """Row b with its padding stripped, as a batch of one."""
    keep = feeds["attention_mask"][b].astype(bool)
    out = OrderedDict(
        pixel_values=feeds["pixel_values"][b : b + 1],
        input_ids=feeds["input_ids"][b : b + 1, keep],
        attention_mask=feeds["attention_mask"][b : b + 1, keep],
    )
    if KEEP_INPUT in feeds:
        out[KEEP_INPUT] = feeds[KEEP_INPUT][b : b + 1]
    return out


def cast_pixels(feeds: dict[str, np.ndarray], dtype: str) -> OrderedDict[str, np.ndarray]:
    """The feeds with pixel_values in ``dtype`` (``encoding.cast_inputs``, as every runtime casts; numpy
    has no bfloat16: float32 stays, the bf16 backends cast it themselves)."""
    from star_export.encoding import cast_inputs

    return OrderedDict(cast_inputs(feeds, {} if dtype == "bfloat16" else {"pixel_values": dtype}))


# ---------------------------------------------------------------------------- one side vs the rewrite


class Rewrite:
    """The PyTorch rewrite in one dtype, run with its scores (and forced selections) as numpy.

    ``device``: where the module's weights live (the feeds go there, the outputs come back as numpy).
    """

    def __init__(self, module: Any, dtype: str, device: str | torch.device = "cpu"):
        self.module, self.dtype, self.device = module, dtype, torch.device(device)

    def run(self, feeds: dict[str, np.ndarray], force1=None, force2=None) -> dict[str, Any]:
        tdtype = getattr(torch, self.dtype)
        args = [
            torch.from_numpy(np.ascontiguousarray(feeds[k])).to(self.device)
            for k in ("pixel_values", "input_ids", "attention_mask")
        ]
        args[0] = args[0].to(tdtype)
        force = [
            None if f is None else torch.from_numpy(np.asarray(f, dtype=np.int64)).to(self.device)
            for f in (force1, force2)
        ]
        with torch.no_grad():
            out = self.module.run(*args, force1=force[0], force2=force[1])
        flat = {k: _np(v) for k, v in out.items() if k != "presents"}
        for i, kv in enumerate(zip(out["presents"][0::2], out["presents"][1::2], strict=True)):
            flat[f"present.{i}.key"], flat[f"present.{i}.value"] = _np(kv[0]), _np(kv[1])
        return flat


def _np(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.is_floating_point() else t).cpu().numpy()


def _worst_present(got: dict, ref: dict) -> tuple[np.ndarray, np.ndarray]:
    """The present tensor pair with the largest relative difference."""
    best, best_rel = (np.zeros(1), np.zeros(1)), -1.0
    for name in ref:
        if not name.startswith("present."):
            continue
        g, r = got[name], ref[name]
        rel = float(np.abs(g.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30))
        if rel > best_rel:
            best, best_rel = (g, r), rel
    return best


def check_side(
    report: ParityReport,
    check: str,
    got: dict[str, np.ndarray],
    ref: Rewrite,
    feeds: dict[str, np.ndarray],
    margins: tuple[float, float],
    tolerance: float,
    presents: bool = True,
    rows: slice | None = None,
) -> None:
    """``got`` (a graph's outputs on ``feeds``) against the rewrite ``ref`` on the same feeds: both
    selections by the margin rule (stage 2 scored by the rewrite forced to ``got``'s stage 1), then
    logits (and presents) directly where the selections are identical, else forced to ``got``'s."""
    rows = rows or slice(None)
    g1, g2 = got["stage1_keep_idx"][rows], got["stage2_keep_idx"][rows]
    base = ref.run(feeds)
    a1 = selection.compare(g1, base["stage1_keep_idx"], base["stage1_scores"], margins[0])
    report.add_selection(check, "stage1_keep_idx", a1)
    scored = base if a1.identical else ref.run(feeds, force1=g1)
    a2 = selection.compare(g2, scored["stage2_keep_idx"], scored["stage2_scores"], margins[1])
    report.add_selection(check, "stage2_keep_idx", a2)
    same = a1.identical and a2.identical
    target = base if same else ref.run(feeds, force1=g1, force2=g2)
    rule = "tol" if same else "forced"
    report.add(check, "logits", got["logits"][rows], target["logits"], tolerance, rule)
    if presents:
        sub = {k: v[rows] for k, v in got.items() if k.startswith("present.")}
        report.add(check, "present.* (worst)", *_worst_present(sub, target), tolerance, rule)


def generation_rows(
    report: ParityReport,
    name: str,
    got_backend: Any,
    ref_backend: Any,
    feeds: dict[str, np.ndarray],
    geo: Geometry,
    cfg: StarConfig,
    steps: int,
    dtype: str,
    fp32_tolerance: float,
) -> None:
    """``got_backend`` (graphs or engines) vs the rewrite ``ref_backend`` (``runtime.TorchBackend``),
    ``steps`` greedy tokens. fp32: tokens identical, logits of every step within ``fp32_tolerance``,
    cache lengths L1/L2 + steps. Half precision: the rewrite is forced to the checked side's
    selection and fed its tokens (teacher forcing); every step's logits within the dtype's
    tolerance, and each chosen token within that tolerance of the rewrite's best logit."""
    from star_export.runtime import GenerationConfig, generate

    gen = GenerationConfig(max_new_tokens=steps)
    cast = dict(cast_pixels(feeds, dtype))
    got = generate(got_backend, cast, geo, cfg, gen, keep_logits=True)
    if dtype == "float32":
        check = f"generate {name} vs torch ({steps} greedy)"
        ref = generate(ref_backend, feeds, geo, cfg, gen, keep_logits=True)
        report.add(check, "tokens", np.array(got.tokens), np.array(ref.tokens), 0)
        report.add(
            check, "logits (every step)", np.stack(got.step_logits), np.stack(ref.step_logits), fp32_tolerance
        )
    else:
        check = f"generate {name} vs torch {SHORT[dtype]} ({steps} steps, teacher-forced)"
        ref_backend.forced = (got.stage1_keep_idx, got.stage2_keep_idx)
        ref = generate(ref_backend, cast, geo, cfg, gen, keep_logits=True, teacher=np.array(got.tokens))
        ref_backend.forced = None
        tol = selection.logits_tolerance(dtype, fp32_tolerance)
        r_logits = np.stack(ref.step_logits).astype(np.float64)  # (steps, B, V)
        report.add(check, "logits (every step)", np.stack(got.step_logits), r_logits, tol, "forced")
        chosen = np.take_along_axis(r_logits, np.array(got.tokens).T[:, :, None], axis=-1)[
            ..., 0
        ]  # (steps, B)
        shortfall = (r_logits.max(axis=-1) - chosen) / np.abs(r_logits).max(
            axis=-1
        )  # 0: the rewrite's argmax
        report.add(check, "tokens (logit shortfall)", np.array([shortfall.max()]), np.zeros(1), tol, "forced")
    text_len = feeds["input_ids"].shape[1]
    expect = [
        text_len - 1 + geo.span(cfg.keep1 if i < cfg.layer else cfg.keep2) + steps - 1
        for i in range(geo.num_layers)
    ]
    report.add(check, "cache lengths L1/L2+t", np.array(got.final_present_lengths), np.array(expect), 0)


# ---------------------------------------------------------------------------- an export, a directory
