"""The half-precision margin, from a model of the dtype's rounding that the half-precision code cannot move.

A margin measured as "half-precision rewrite minus fp32 rewrite" vouches for itself: a bug confined
to the half-precision path (a wrong scale, layer or norm) moves the scores, widens its own margin and
passes. Here the margin comes from the **fp32 path** (itself checked against the dynamic reference
and the unmodified model) run with the dtype's rounding **emulated** where a half-precision graph
rounds: every submodule's weights, floating inputs and floating outputs are rounded through the
dtype and carried on in float32 (the ``rounded`` context). The computation is fp32 code on fp32
tensors, so nothing that runs only in fp16/bf16 takes part in it.

* **noise near the cut**: |emulated - fp32| / |cut| over the tokens the fp32 side ranks around the
  cut (ranks k - w .. k + w - 1, ``WINDOW``), not a max over all tokens, which a high-scoring token
  (an attention sink) dominates; those are the tokens a rounding can move across the cut.
* **the margin**: ``SAFETY`` times that noise, at least ``selection.MARGIN_EPS`` epsilons of the
  dtype, at most ``CAP_EPS`` epsilons. An emulated noise above the cap is not a wider margin: it is
  a failing row (the checkpoint does not survive the dtype's rounding).
* **the half-precision rewrite's own noise near the cut** must lie within that margin (a row of the
  report): a scale, layer or norm error moves scores by far more than rounding does, and fails
  here even where the two selections happen to agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from star_export import selection

SAFETY = 4.0  # the margin: 4x the emulated rounding noise near the cut ...
CAP_EPS = 64  # ... at most 64 epsilons of the dtype (fp16 6.3e-2, bf16 0.5); above: a failing row
WINDOW = 0.25  # the tokens ranked within max(4, k/4) of the cut, on either side


# ---------------------------------------------------------------------------- emulated rounding


def _round(x: Any, dtype: torch.dtype) -> Any:
    """A float32 tensor rounded through ``dtype`` (values that would overflow it stay: masks)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    r = x.to(dtype).to(torch.float32)
    return torch.where(torch.isinf(r) & torch.isfinite(x), x, r)


def _round_tree(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return _round(x, dtype)
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_round_tree(v, dtype) for v in x)
    if isinstance(x, list):
        return [_round_tree(v, dtype) for v in x]
    if isinstance(x, dict) and type(x) is dict:
        return {k: _round_tree(v, dtype) for k, v in x.items()}
    return x


@contextlib.contextmanager
def rounded(model: nn.Module, dtype: str) -> Iterator[None]:
    """Inside: every submodule of the float32 ``model`` runs with its own parameters, its floating
    inputs and its floating outputs rounded through ``dtype`` ("float16"/"bfloat16"), in float32.
    The parameters are swapped per call and restored after it (one module's copy at a time)."""
    low = getattr(torch, dtype)
    saved: list[list[tuple[nn.Parameter, torch.Tensor]]] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple:
        own = [(p, p.data) for p in mod.parameters(recurse=False) if p.dtype == torch.float32]
        for p, data in own:
            p.data = _round(data, low)
        saved.append(own)
        return _round_tree(args, low), _round_tree(kwargs, low)

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        for p, data in saved.pop():
            p.data = data
        return _round_tree(out, low)

    handles = []
    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while saved:  # an exception inside a forward: put every swapped parameter back
            for p, data in saved.pop():
                p.data = data


# ---------------------------------------------------------------------------- noise near the cut


def near_cut(scores: np.ndarray, reference: np.ndarray, k: int) -> float:
    """max |scores - reference| / |cut| over the tokens ``reference`` ranks within w of the cut (ranks
    k - w .. k + w - 1 among its candidates, NaN = not a candidate; w = max(4, WINDOW * k))."""
    worst = 0.0
    w = max(4, int(np.ceil(WINDOW * k)))
    for s, r in zip(scores.astype(np.float64), reference.astype(np.float64), strict=True):
        idx = np.flatnonzero(~np.isnan(r))
        order = idx[np.argsort(-r[idx], kind="stable")]
        cut = abs(r[order[k - 1]])
        near = order[max(0, k - w) : k + w]
        diff = np.abs(s[near] - r[near])
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = max(worst, float(diff.max()) / max(cut, 1e-30))
    return worst


def margin_from(dtype: str, emulated: float) -> float:
    """The relative margin of a half-precision selection: SAFETY x the emulated noise near the cut,
    within [MARGIN_EPS, CAP_EPS] epsilons of ``dtype``."""
    eps = selection.EPS[dtype]
    return float(min(max(selection.MARGIN_EPS * eps, SAFETY * emulated), CAP_EPS * eps))


def measure(low: Any, full: Any, feeds: dict[str, np.ndarray], keeps: tuple[int, int]) -> dict[str, Any]:
    """The noise model of ``low.dtype`` on ``feeds``, and the half-precision rewrite's own noise.

    ``low`` / ``full``: ``validate.Rewrite`` in the half dtype and in float32. Stage 2 is scored with
    stage 1 forced to fp32's choice on every side. Returns {"dtype", "emulated": [s1, s2],
    "measured": [s1, s2], "cap", "margins": [s1, s2], "runs": {"fp32", "low"}} (noises relative to
    the cut, near it)."""
    r32 = full.run(feeds)
    with rounded(full.module, low.dtype):
        emu = full.run(feeds, force1=r32["stage1_keep_idx"])
    rlow = low.run(feeds)
    forced = low.run(feeds, force1=r32["stage1_keep_idx"])
    emulated = [
        near_cut(emu["stage1_scores"], r32["stage1_scores"], keeps[0]),
        near_cut(emu["stage2_scores"], r32["stage2_scores"], keeps[1]),
    ]
    measured = [
        near_cut(rlow["stage1_scores"], r32["stage1_scores"], keeps[0]),
        near_cut(forced["stage2_scores"], r32["stage2_scores"], keeps[1]),
    ]
    return {
        "dtype": low.dtype,
        "emulated": emulated,
        "measured": measured,
        "cap": CAP_EPS * selection.EPS[low.dtype],
        "margins": [margin_from(low.dtype, e) for e in emulated],
        "runs": {"fp32": r32, "low": rlow},
    }


def add_rows(report: Any, noise: dict[str, Any], label: str) -> None:
    """Two rows per stage (rule ``noise``; max_rel = the noise, tolerance = its bound), checks named
    ``<label>: ...``: the emulated rounding noise within the dtype's cap, and the half-precision
    rewrite's own noise within the margin."""
    from star_export.parity import ParityRow

    for i, stage in enumerate(("stage1_scores", "stage2_scores")):
        for check, value, bound in (
            (f"{label}: rounding model vs cap", noise["emulated"][i], noise["cap"]),
            (f"{label}: score noise vs margin", noise["measured"][i], noise["margins"][i]),
        ):
            row = ParityRow(check, stage, value, value, bound, bool(value <= bound), rule="noise")
            row.detail = "|a - b| / |cut|, tokens ranked near the cut"
            report.rows.append(row)
