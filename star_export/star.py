"""The STAR math (arXiv 2505.12359) exactly as ``STAR_SPEC.md`` defines it, as static-shape ops.

Every function here is written with ops that export to ONNX with static shapes: the keep
counts are Python ints (constants in the graph), selection is ``TopK`` with a literal K and
everything else is arithmetic, comparisons and ``Gather``/``GatherElements``. No ``nonzero``,
no boolean indexing, no Python loops over the batch.

Shapes in comments: B batch, T text length (one image placeholder), N visual tokens before
pruning, dv vision width, D text width, H heads, L1 = T - 1 + keep1, L2 = T - 1 + keep2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from star_export.errors import UsageError

# What ranks the visual tokens. "star" is the method; the others are the baselines it is measured
# against (``compare``), exported the same static way (the same TopK with a literal K):
# "random" / "stride" rank by a constant prior that ignores the image (``prior_scores``) and choose at
# stage 1 alone (keep1 = keep2, stage 2 keeps everything); "inverted" keeps the LOWEST STAR scores at
# both stages (a deliberately wrong selection: what a flipped sign or axis would do).
SELECTIONS = ("star", "random", "stride", "inverted")
PRIOR_SEED = 0  # the seed of the "random" prior

# TensorRT's ITopKLayer: "Values larger than 3840 will result in a runtime error" (NvInfer.h 10.0-11.1)
TOPK_MAX_K = 3840


def keep1_rule(keep2, n_visual: int):
    """Stage 1's keep of a keep range: ``min(N, 2 * keep2)``. ``keep2`` is an int, or (inside an
    export) a SymInt read from ``keep_slots``' shape: the cap is then ``torch.sym_min``, so K stays a
    shape-derived scalar (Shape -> Gather -> Mul -> Min) and never a value read from data."""
    return torch.sym_min(n_visual, 2 * keep2)


def parse_keep_range(text: str) -> tuple[int, int | None, int]:
    """``--keep MIN:MAX`` or ``MIN:OPT:MAX`` -> (min, opt or None, max); a UsageError otherwise."""
    try:
        values = [int(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) not in (2, 3):
        raise UsageError(f"--keep {text}: a keep range is MIN:MAX or MIN:OPT:MAX, e.g. 16:128")
    return values[0], (values[1] if len(values) == 3 else None), values[-1]


@dataclass(frozen=True)
class StarConfig:
    """STAR's three knobs. ``keep1`` defaults to ``min(N, 2 * keep2)``. ``selection``: SELECTIONS.

    ``keep_range`` (min, max) marks a keep range (``--keep 16:128``): one prefill graph takes keep2
    from the shape of its input ``keep_slots`` [B, keep2] and keep1 by ``keep1_rule``; ``keep2`` /
    ``keep1`` are then the range's opt (the default keep). ``at(k)`` is the fixed level k of the range.
    """

    keep2: int
    keep1: int
    layer: int  # K: the first decoder layer that sees the stage-2 sequence
    selection: str = "star"
    keep_range: tuple[int, int] | None = None
    n_visual: int = 0  # N, keep1's cap in a keep range (0 for a fixed level)

    def at(self, keep: int) -> StarConfig:
        """The level ``keep`` of a keep range (constants keep1/keep2, what a request at ``keep`` runs)."""
        return StarConfig(
            keep2=keep, keep1=int(self.keep1_of(keep)), layer=self.layer, selection=self.selection
        )

    def keep1_of(self, keep2):
        """keep1 at ``keep2`` (an int or a SymInt) under this range's rule."""
        return keep1_rule(keep2, self.n_visual)

    def covers(self, keep: int) -> bool:
        return self.keep_range is not None and self.keep_range[0] <= keep <= self.keep_range[1]

    @classmethod
    def resolve_range(
        cls, *, keep: tuple[int, int, int], keep1: int | None, layer: int, n_visual: int, num_layers: int
    ) -> StarConfig:
        """A keep range ``(min, opt, max)`` checked by the spec's rules (``resolve`` at both ends);
        keep1 follows ``keep1_rule`` (a ``--keep1`` with a range is a UsageError)."""
        lo, opt, hi = keep
        if keep1 is not None:
            raise UsageError(f"--keep1 with a keep range: keep1 follows min(N, 2 * keep) ({n_visual} = N)")
        if not 1 <= lo < hi:
            raise UsageError(f"--keep {lo}:{hi}: a range needs 1 <= min < max")
        if not lo <= opt <= hi:
            raise UsageError(f"--keep {lo}:{hi}: the default keep {opt} lies outside the range")
        for k in (lo, hi):
            cls.resolve(keep=k, keep1=None, layer=layer, n_visual=n_visual, num_layers=num_layers)
        if min(n_visual, 2 * hi) + 1 > TOPK_MAX_K:
            raise UsageError(f"--keep {lo}:{hi}: TensorRT's TopK takes K <= {TOPK_MAX_K}")
        return cls(
            keep2=opt, keep1=min(n_visual, 2 * opt), layer=layer, keep_range=(lo, hi), n_visual=n_visual
        )

    @classmethod
    def resolve(
        cls,
        *,
        keep: int,
        keep1: int | None,
        layer: int,
        n_visual: int,
        num_layers: int,
        selection: str = "star",
    ) -> StarConfig:
        """Apply the defaults and the spec's validity rules; a violation is a `UsageError`."""
        if not 1 <= keep <= n_visual:
            raise UsageError(f"--keep must be in 1..{n_visual} (N visual tokens), got {keep}")
        if selection not in SELECTIONS:
            raise UsageError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if selection in ("random", "stride"):  # the prior chooses at stage 1 alone
            if keep1 is not None and keep1 != keep:
                raise UsageError(f"selection {selection!r} keeps its tokens at stage 1: keep1 must be keep")
            keep1 = keep
        k1 = min(n_visual, 2 * keep) if keep1 is None else keep1
        if not 1 <= k1 <= n_visual:
            raise UsageError(f"--keep1 must be in 1..{n_visual} (N visual tokens), got {k1}")
        if k1 < keep:
            raise UsageError(f"--keep1 ({k1}) must be >= --keep ({keep})")
        if not 1 <= layer <= num_layers - 1:
            raise UsageError(
                f"--layer must be in 1..{num_layers - 1} (decoder has {num_layers} layers), got {layer}"
            )
        return cls(keep2=keep, keep1=k1, layer=layer, selection=selection)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.keep_range is None:
            del d["keep_range"], d["n_visual"]
        else:
            d["keep_range"] = list(self.keep_range)
        return d


def prior_scores(n: int, k: int, selection: str) -> torch.Tensor:
    """(n,) float32 constant scores of an image-blind baseline that keeps ``k`` of ``n`` (the top k).

    "random": seeded uniform noise (``PRIOR_SEED``). "stride": 1 at the k indices
    floor((i + 1/2) n / k), i < k, 0 elsewhere: a uniform stride over the patches in raster order
    (on a g x g grid a lattice that shifts by n/k mod g from row to row).
    """
    if selection == "random":  # numpy, not torch.rand: a constant for the exporter, not an op to trace
        import numpy as np

        return torch.tensor(np.random.default_rng(PRIOR_SEED).random(n), dtype=torch.float32)
    if selection != "stride":
        raise ValueError(f"no prior for selection {selection!r}")
    scores = torch.zeros(n, dtype=torch.float32)
    scores[[(2 * i + 1) * n // (2 * k) for i in range(k)]] = 1.0
    return scores


def selection_scores(scores: torch.Tensor, k: int, selection: str) -> torch.Tensor:
    """The scores a selection of ``k`` ranks by: STAR's own, their negation ("inverted") or a
    constant prior broadcast over the batch.  (B, n) -> (B, n)"""
    if selection == "star":
        return scores
    if selection == "inverted":
        return -scores
    prior = prior_scores(scores.shape[-1], k, selection).to(scores.device)
    return prior.unsqueeze(0).expand_as(scores).contiguous()


# ---------------------------------------------------------------------------- selection


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, ties to the lower index, sorted ascending.

    scores: (B, n) float  ->  (B, k) int64

    The tie rule is made explicit instead of trusting a backend's TopK: the rank of j is the
    number of entries that beat it (greater, or equal with a lower index). Ranks are a
    permutation of 0..n-1, so exactly k entries have rank < k. A second TopK with a literal K
    over unique keys (j for kept, n + j for dropped) lists the kept ones in ascending order.
    """
    n = scores.shape[-1]
    ar = torch.arange(n, device=scores.device)  # (n,)
    s_j = scores.unsqueeze(-1)  # (B, n, 1)  the entry j being ranked
    s_i = scores.unsqueeze(-2)  # (B, 1, n)  the challenger i
    lower = (ar.unsqueeze(0) < ar.unsqueeze(-1)).unsqueeze(0)  # (1, n, n)  [j, i]: i < j
    beats = (s_i > s_j) | ((s_i == s_j) & lower)  # (B, n, n)  [b, j, i]: i beats j
    # counted over the contiguous last axis, in float32 (exact below 2**24): same indices as an
    # int32 sum over the middle axis, 3.5-5x faster in onnxruntime at n = 576 (0.5 vs 2.8 ms)
    rank = beats.to(torch.float32).sum(dim=-1)  # (B, n)
    key = torch.where(rank < k, ar, ar + n).to(torch.float32)  # (B, n) unique keys
    return torch.topk(key, k, dim=-1, largest=False, sorted=True).indices  # (B, k)


def cut_margin(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest score minus the (k+1)-th: how close the selection was.  (B, n) -> (B,)

    +inf when nothing is dropped (k == n); 0 at an exact tie across the cut (the tie rule decided).
    """
    padded = torch.cat([scores, torch.full_like(scores[:, :1], float("-inf"))], dim=1)  # (B, n + 1)
    top = torch.topk(padded, k + 1, dim=-1).values  # (B, k + 1) descending, a literal K
    return top[:, k - 1] - top[:, k]


# ---------------------------------------------------------------------------- stage 1


def column_means(a: torch.Tensor) -> torch.Tensor:
    """Mean of every column of (B, M, n) over its M rows -> (B, n), tie-preserving.

    Bit-equal columns must give bit-equal means in every backend, so the sum runs over the
    CONTIGUOUS last axis of the transposed tensor: each column becomes a row reduced by the same
    code path as every other row. A reduction over a strided axis (``a.mean(dim=1)``) or a
    matrix-vector product vectorises across columns and treats the tail columns (n not a multiple
    of the vector width) differently, so equal columns can round differently there.
    """
    return a.transpose(1, 2).contiguous().sum(dim=-1) / a.shape[1]


def stage1_scores(features: torch.Tensor) -> torch.Tensor:
    """r1_j = mean_i softmax(F F^T / sqrt(dv))[i, j], in float32.  (B, N, dv) -> (B, N)"""
    f = features.to(torch.float32)
    attn = torch.softmax(f @ f.transpose(1, 2) / math.sqrt(f.shape[-1]), dim=-1)  # (B, N, N)
    return column_means(attn)  # (B, N): attention each token RECEIVES


# ---------------------------------------------------------------------------- sequence layout


def image_position(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Index p of the single image placeholder per row.  (B, T) -> (B,)"""
    return torch.argmax((input_ids == image_token_id).to(torch.int32), dim=1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, s], ...] for 2-D or 3-D x.  index: (B, S)"""
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def clip_index(x: torch.Tensor, low: int, high: int | None = None) -> torch.Tensor:
    """Clamp an integer index tensor with Where (TensorRT's Clip takes floating types only)."""
    x = torch.where(x < low, torch.full_like(x, low), x)
    if high is not None:
        x = torch.where(x > high, torch.full_like(x, high), x)
    return x


def splice(
    text: torch.Tensor,
    visual: torch.Tensor,
    p: torch.Tensor,
) -> torch.Tensor:
    """Replace the placeholder at p by the visual span: [text[:p], visual, text[p+1:]].

    text: (B, T[, D]), visual: (B, n[, D]), p: (B,)  ->  (B, T - 1 + n[, D])
    """
    n = visual.shape[1]
    length = text.shape[1] - 1 + n
    s = torch.arange(length, device=p.device).unsqueeze(0)  # (1, L)
    start = p.unsqueeze(1)  # (B, 1)
    is_vis = (s >= start) & (s < start + n)  # (B, L)
    text_src = clip_index(torch.where(s < start, s, s - n + 1), 0)  # (B, L)
    vis_src = clip_index(s - start, 0, n - 1)  # (B, L)
    from_text = gather_rows(text, text_src)
    from_vis = gather_rows(visual, vis_src)
    if text.dim() == 3:
        is_vis = is_vis.unsqueeze(-1)
    return torch.where(is_vis, from_vis, from_text)


def original_positions(
    attention_mask: torch.Tensor, p: torch.Tensor, span_offsets: torch.Tensor, n_positions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of the spliced sequence, as if nothing were pruned and padding absent.

    attention_mask: (B, T), p: (B,), span_offsets: (B, n) offset of each kept visual-span token
    within the unpruned span (LLaVA-1.5: its patch index)  ->  (B, L) int64, and the
    key-validity of every sequence slot (B, L) bool (False only at padding).
      text before the image: cumsum(mask) - 1;  visual token at offset o: s + o with
      s = sum(mask[:p]);  text at t > p: s + n_positions + (t - p - 1).
    """
    mask = attention_mask.to(torch.int64)
    # CumSum in float32 (exact below 2**24 tokens): TensorRT's CumSum takes floating types only
    c = attention_mask.to(torch.float32).cumsum(dim=1).to(torch.int64)  # (B, T)
    t = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)  # (1, T)
    after = (t > p.unsqueeze(1)).to(torch.int64)  # (B, T)
    text_pos = c - 1 + after * (n_positions - 1)  # (B, T)
    s = torch.gather(c, 1, p.unsqueeze(1)) - 1  # (B, 1) real tokens before the image
    vis_pos = s + span_offsets  # (B, n)
    pos = splice(text_pos, vis_pos, p)  # (B, L)
    valid = splice(mask, torch.ones_like(span_offsets), p).to(torch.bool)  # (B, L)
    return pos, valid


def merge_fixed(
    embeds: torch.Tensor,
    offsets: torch.Tensor,
    fixed_embed: torch.Tensor,
    fixed_offsets: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interleave always-kept structural tokens (LLaVA-NeXT row newlines) with the kept tokens.

    embeds: (B, k, D) kept visual tokens, offsets: (B, k) their offsets in the unpruned span
    (ascending), fixed_embed: (D,), fixed_offsets: the structural tokens' offsets (constants)
    -> span (B, k + R, D), span offsets (B, k + R) ascending, and ``order`` (B, k + R): the
    source of every span slot (< k: kept token ``order``; >= k: a structural token). The merge
    is a TopK with the literal K = k + R over the unique offsets.
    """
    b, k, d = embeds.shape
    r = len(fixed_offsets)
    fixed = torch.tensor(fixed_offsets, dtype=offsets.dtype, device=offsets.device).expand(b, r)
    all_off = torch.cat([offsets, fixed], dim=1)  # (B, k + R), unique
    order = torch.topk(all_off.to(torch.float32), k + r, dim=-1, largest=False, sorted=True).indices
    all_emb = torch.cat([embeds, fixed_embed.to(embeds.dtype).expand(b, r, d)], dim=1)
    return gather_rows(all_emb, order), torch.gather(all_off, 1, order), order


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Causal over sequence order AND padding keys masked, as an additive mask.

    valid: (B, L) bool  ->  (B, 1, L, L), 0 where allowed and finfo.min elsewhere (finite, so
    fully padded query rows stay finite).
    """
    length = valid.shape[1]
    ar = torch.arange(length, device=valid.device)
    causal = (ar.unsqueeze(1) >= ar.unsqueeze(0)).unsqueeze(0)  # (1, L, L)
    allowed = causal & valid.unsqueeze(1)  # (B, L, L)
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=valid.device)
    return torch.where(allowed, zero, neg).unsqueeze(1)


def decode_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of one new token over its past + itself.  (B, P + 1) 0/1 -> (B, 1, 1, P + 1)"""
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask.to(torch.bool), zero, neg)[:, None, None, :]


# ---------------------------------------------------------------------------- stage 2


def stage2_scores(probs: torch.Tensor, p: torch.Tensor, keep1: int) -> torch.Tensor:
    """r2_v = mean over heads and over rows q in [p + keep1, L1) of P[b, h, q, p + v].

    probs: (B, H, L1, L1) post-softmax attention of layer K-1, p: (B,), keep1: the length of
    the visual span after stage 1  ->  (B, keep1) float32

    Tie-preserving like ``column_means``: the span's columns are gathered, the rows before the
    image zeroed by a 0/1 weight (exact), and each column's H * L1 values summed over the
    contiguous last axis, then divided by the same count for every column.
    """
    b, heads, length, _ = probs.shape
    vis_cols = p.unsqueeze(1) + torch.arange(keep1, device=p.device).unsqueeze(0)  # (B, keep1)
    index = vis_cols[:, None, None, :].expand(b, heads, length, keep1)
    cols = torch.gather(probs.to(torch.float32), 3, index)  # (B, H, L1, keep1)
    q = torch.arange(length, device=p.device).unsqueeze(0)  # (1, L1)
    after = (q >= (p + keep1).unsqueeze(1)).to(torch.float32)  # (B, L1) rows after the image
    cols = cols * after[:, None, :, None]  # rows before the image contribute exact zeros
    rows = cols.permute(0, 3, 1, 2).contiguous().reshape(b, keep1, heads * length)  # a copy: reshape alone
    total = rows.sum(dim=-1)  # (B, keep1)                                     # may keep a strided view
    count = after.sum(dim=1, keepdim=True) * heads  # (B, 1) >= H: the runtime guarantees a query
    return total / count


def stage2_select(
    scores: torch.Tensor, is_visual: torch.Tensor | None, keep2: int, n_fixed: int = 0
) -> torch.Tensor:
    """Span slots kept by stage 2: the ``keep2`` best-scored visual tokens plus every structural
    token (``is_visual`` False; LLaVA-NeXT row newlines), ascending.

    scores, is_visual: (B, n) over the stage-1 span  ->  (B, keep2 + n_fixed) slot positions.
    Structural slots get the score 2 (attention means are <= 1), so the TopK always takes them.
    """
    if not n_fixed:
        return topk_sorted(scores, keep2)
    scores = torch.where(is_visual, scores, torch.full_like(scores, 2.0))
    return topk_sorted(scores, keep2 + n_fixed)


def stage2_layout(p: torch.Tensor, selected: torch.Tensor, keep1: int, length1: int) -> torch.Tensor:
    """Source slot in the L1 sequence of every slot of the L2 sequence.

    p: (B,), selected: (B, keep2) ascending positions within the visual span  ->  (B, L2) int64
    Text slots keep their order; the visual span keeps only the selected tokens, in order.
    """
    keep2 = selected.shape[1]
    length2 = length1 - keep1 + keep2
    s = torch.arange(length2, device=p.device).unsqueeze(0)  # (1, L2)
    start = p.unsqueeze(1)  # (B, 1)
    in_vis = (s >= start) & (s < start + keep2)
    vis_src = start + torch.gather(selected, 1, clip_index(s - start, 0, keep2 - 1))
    text_src = torch.where(s < start, s, s - keep2 + keep1)
    return torch.where(in_vis, vis_src, text_src)


# ---------------------------------------------------------------------------- input rules


def check_prompts(input_ids, attention_mask, image_token_id: int) -> None:
    """The spec's prompt rules, checked before any graph runs (UsageError on a violation).

    Exactly one placeholder per row, padding on the left only, the placeholder not on padding,
    at least one token after it. Accepts numpy arrays or tensors of shape (B, T).
    """
    ids = torch.as_tensor(input_ids)
    mask = torch.as_tensor(attention_mask)
    if ids.dim() != 2 or ids.shape != mask.shape:
        raise UsageError(
            f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must both be [B, T]"
        )
    bad = mask[(mask != 0) & (mask != 1)]
    if bad.numel():
        raise UsageError(
            f"attention_mask must hold only 0 (left padding) and 1 (real tokens), found {int(bad[0])}"
        )
    for b in range(ids.shape[0]):
        row, m = ids[b], mask[b]
        count = int((row == image_token_id).sum())
        if count != 1:
            raise UsageError(
                f"prompt row {b}: expected exactly one image placeholder ({image_token_id}), found {count}"
            )
        real = torch.nonzero(m).flatten()
        if real.numel() == 0 or bool((m[int(real[0]) :] == 0).any()):
            raise UsageError(f"prompt row {b}: padding must be on the left only (attention_mask 0...0 1...1)")
        p = int(torch.nonzero(row == image_token_id)[0])
        if m[p] == 0:
            raise UsageError(f"prompt row {b}: the image placeholder sits on a padding position")
        if p == ids.shape[1] - 1:
            raise UsageError(f"prompt row {b}: at least one token must follow the image placeholder")
