"""Analytical cost of a STAR-pruned LLaVA prefill: FLOPs per stage and KV-cache bytes.

What it predicts is the *ceiling* of what pruning can buy: ``FLOPs(unpruned) / FLOPs(pruned)``
for the prefill graph (the unpruned graph is the same rewrite with ``keep1 = keep2 = N``), and
the KV-cache memory saved. ``bench`` prints the measured speedups next to it.

Conventions (per image row; every number is multiplied by the batch):

* A multiply-add is 2 FLOPs. A matrix product ``(M, K) @ (K, N)`` costs ``2 M K N``; a
  convolution ``2 * outputs * (C_in * kh * kw)``. These are *matmul* FLOPs, counted exactly
  the way ``torch.utils.flop_counter.FlopCounterMode`` counts them (the tests check it).
* Everything else is *other* FLOPs, estimated per element: bias or residual add 1, scale 1,
  mask add 1, softmax 5 (max, subtract, exp, sum, divide), LayerNorm 8, RMSNorm 4, GELU /
  quick-GELU 8, SiLU-gate (``silu(g) * u``) 5, RoPE 3 per rotated element, a mean 1.
  Gathers, reshapes, casts and index arithmetic on ``(B, L)`` tensors cost 0.
* Attention is computed as a full ``L x L`` square (as the exported graph does; the causal
  mask is added, not exploited): scores ``2 H L^2 hd``, weighted sum ``2 H L^2 hd``. With GQA
  the K/V projections have ``Hkv * hd`` outputs; K/V are broadcast to the query heads.
* The vision tower counts the layers up to ``vision_feature_layer`` (hidden state
  ``-2`` of a 24-layer tower needs 23 layers; later layers are dead code in the exported graph).
  ``all_vision_layers=True`` counts every layer, as eager PyTorch and HF run them.
* The projector runs on the ``keep1`` tokens stage 1 kept; the lm_head on the last position.
* STAR scoring: stage 1 ``F F^T`` (matmul ``2 N^2 dv``), scale, softmax and the column mean
  over ``N x N``; stage 2 the head mean over ``H x L1 x L1``, the row mean (a ``(1, L1) @
  (L1, L1)`` product) and the gathers. The rank-based tie rule (``star.topk_sorted``) compares
  every pair: 6 ops per pair (greater, equal, lower-index, and, or, sum) over ``n^2`` pairs.
* KV cache: K and V of every layer, ``B x Hkv x S_i x hd`` elements of the export dtype, with
  ``S_i = L1`` for layers ``< K`` and ``L2`` from ``K`` on.

Build the dimensions from a ``LlavaConfig`` (or its ``config.json`` / recipe dict) with
:meth:`ModelDims.from_config`; every function also accepts the config directly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from star_export.star import StarConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}

# per-element FLOP conventions of the "other" (vector) work; see the module docstring
SOFTMAX, LAYERNORM, RMSNORM, GELU, SILU_GATE, ROPE = 5, 8, 4, 8, 5, 3
PAIR_COMPARE = 6  # star.topk_sorted: greater, equal, lower-index, and, or, sum per (i, j) pair


@dataclass(frozen=True)
class ModelDims:
    """The sizes the cost depends on, read from a LlavaConfig."""

    image_size: int
    patch_size: int
    channels: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    vision_feature_layer: int
    select_strategy: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    projector_bias: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def vision_tokens(self) -> int:
        """Tokens inside the vision tower: patches + CLS."""
        return self.grid * self.grid + 1

    @property
    def n_visual(self) -> int:
        """N: visual tokens handed to the projector (CLS dropped with the "default" strategy)."""
        return self.grid * self.grid + (0 if self.select_strategy == "default" else 1)

    @property
    def vision_layers_needed(self) -> int:
        """Encoder layers up to the selected hidden state (hidden_states[0] is the embedding)."""
        vfl = self.vision_feature_layer
        return vfl if vfl >= 0 else self.vision_layers + 1 + vfl

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """From a ``LlavaConfig``, a ``config.json`` dict, a recipe's ``[config]`` dict or a ModelDims."""
        if isinstance(config, ModelDims):
            return config
        if isinstance(config, dict):
            from transformers import LlavaConfig

            config = LlavaConfig(**config)
        vc, tc = config.vision_config, config.text_config
        vfl = config.vision_feature_layer
        if not isinstance(vfl, int):
            raise ValueError(f"vision_feature_layer {vfl!r}: only a single layer is supported")
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return cls(
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            channels=getattr(vc, "num_channels", 3),
            vision_hidden=vc.hidden_size,
            vision_intermediate=vc.intermediate_size,
            vision_layers=vc.num_hidden_layers,
            vision_heads=vc.num_attention_heads,
            vision_feature_layer=vfl,
            select_strategy=config.vision_feature_select_strategy,
            hidden=tc.hidden_size,
            intermediate=tc.intermediate_size,
            layers=tc.num_hidden_layers,
            heads=tc.num_attention_heads,
            kv_heads=tc.num_key_value_heads,
            head_dim=head_dim,
            vocab=tc.vocab_size,
            projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
            attention_bias=bool(getattr(tc, "attention_bias", False)),
            mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        )

    def decoder_params(self) -> int:
        """Parameters of one decoder layer (weights of the matrix products + norms)."""
        d, hd = self.hidden, self.head_dim
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2
        return attn + 3 * d * self.intermediate + 2 * d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CostItem:
    """One stage of the prefill (``count`` identical blocks), FLOPs for the whole batch."""

    name: str  # "vision.layers", "decoder.layer.3", "star.stage1", ...
    group: str  # vision | projector | decoder | lm_head | star
    tokens: int  # sequence length the stage runs at (per row)
    count: int
    matmul_flops: int
    other_flops: int

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.other_flops

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flops": self.flops}


@dataclass(frozen=True)
class Cost:
    """FLOPs of one prefill and the KV cache it leaves, for one recipe/keep/layer/batch."""

    batch: int
    text_len: int
    keep1: int
    keep2: int
    layer: int
    n_visual: int
    dtype: str
    items: tuple[CostItem, ...]
    kv_bytes_per_layer: tuple[int, ...]
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def l1(self) -> int:
        return self.text_len - 1 + self.keep1

    @property
    def l2(self) -> int:
        return self.text_len - 1 + self.keep2

    @property
    def flops(self) -> int:
        return sum(i.flops for i in self.items)

    @property
    def matmul_flops(self) -> int:
        return sum(i.matmul_flops for i in self.items)

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)

    def group_flops(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self.items:
            out[i.group] = out.get(i.group, 0) + i.flops
        return out

    def share(self, group: str) -> float:
        return self.group_flops().get(group, 0) / self.flops

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "text_len": self.text_len,
            "keep1": self.keep1,
            "keep2": self.keep2,
            "layer": self.layer,
            "n_visual": self.n_visual,
            "l1": self.l1,
            "l2": self.l2,
            "dtype": self.dtype,
            "flops": self.flops,
            "matmul_flops": self.matmul_flops,
            "group_flops": self.group_flops(),
            "kv_bytes": self.kv_bytes,
            "kv_bytes_per_layer": list(self.kv_bytes_per_layer),
            "items": [i.to_dict() for i in self.items],
            "model": self.model,
        }


# ------------------------------------------------------------------------------ blocks (one row)


def vision_layer_flops(dims: ModelDims) -> tuple[int, int]:
    """(matmul, other) FLOPs of one CLIP encoder layer over the tower's S = N + 1 tokens."""
    s, d, i, h = dims.vision_tokens, dims.vision_hidden, dims.vision_intermediate, dims.vision_heads
    mm = 4 * 2 * s * d * d  # q, k, v, out projections
    mm += 2 * 2 * s * s * d  # scores q k^T and the weighted sum, all heads (h * hd = d)
    mm += 2 * 2 * s * d * i  # fc1, fc2
    other = 4 * s * d + s * i + s * d  # biases of q/k/v/o, fc1, fc2
    other += h * s * s * (1 + SOFTMAX)  # scale + softmax
    other += 2 * LAYERNORM * s * d + 2 * s * d  # two layer norms, two residual adds
    other += GELU * s * i
    return mm, other


def vision_embed_flops(dims: ModelDims) -> tuple[int, int]:
    """Patch-embedding convolution (no bias in CLIP), + position embedding, pre-LayerNorm."""
    patches = dims.grid * dims.grid
    mm = 2 * patches * dims.vision_hidden * dims.channels * dims.patch_size**2
    other = dims.vision_tokens * dims.vision_hidden * (1 + LAYERNORM)
    return mm, other


def projector_flops(dims: ModelDims, tokens: int) -> tuple[int, int]:
    """linear_1 (dv -> D), GELU, linear_2 (D -> D) over ``tokens`` visual tokens."""
    d, dv = dims.hidden, dims.vision_hidden
    mm = 2 * tokens * dv * d + 2 * tokens * d * d
    other = GELU * tokens * d + (2 * tokens * d if dims.projector_bias else 0)
    return mm, other


def decoder_layer_flops(dims: ModelDims, length: int, past: int = 0) -> tuple[int, int]:
    """One Llama-family layer over ``length`` new tokens attending to ``past + length`` keys."""
    d, hd, h, hkv, i = dims.hidden, dims.head_dim, dims.heads, dims.kv_heads, dims.intermediate
    keys = past + length
    mm = 2 * length * d * h * hd * 2  # q and o projections
    mm += 2 * length * d * hkv * hd * 2  # k and v projections (GQA: kv heads)
    mm += 2 * 2 * h * length * keys * hd  # scores and weighted sum, full square
    mm += 3 * 2 * length * d * i  # gate, up, down
    other = h * length * keys * (2 + SOFTMAX)  # scale, mask add, softmax
    other += ROPE * length * (h + hkv) * hd
    other += 2 * RMSNORM * length * d + 2 * length * d  # two RMSNorms, two residual adds
    other += SILU_GATE * length * i
    if dims.attention_bias:
        other += length * (h + 2 * hkv) * hd
    if dims.mlp_bias:
        other += length * (2 * i + d)
    return mm, other


def lm_head_flops(dims: ModelDims) -> tuple[int, int]:
    """Final RMSNorm and lm_head at the last position only."""
    return 2 * dims.hidden * dims.vocab, RMSNORM * dims.hidden


def topk_sorted_flops(n: int) -> int:
    """``star.topk_sorted``: every pair compared (the explicit tie rule), O(n^2)."""
    return PAIR_COMPARE * n * n + 2 * n


def stage1_flops(dims: ModelDims, keep1: int) -> tuple[int, int]:
    """r1 = column mean of softmax(F F^T / sqrt(dv)) over N x N, then the top keep1."""
    n, dv = dims.n_visual, dims.vision_hidden
    mm = 2 * n * n * dv
    other = n * n * (1 + SOFTMAX + 1) + topk_sorted_flops(n)  # scale, softmax, column mean
    del keep1  # the rank test is over all n entries whatever k is
    return mm, other


def stage2_flops(dims: ModelDims, keep1: int, length1: int) -> tuple[int, int]:
    """r2 = mean over heads and over the rows after the image of P[K-1], then the top keep2."""
    mm = 2 * length1 * length1  # (1, L1) row weights @ (L1, L1) head mean
    other = dims.heads * length1 * length1 + 2 * length1  # head mean, row weights
    other += topk_sorted_flops(keep1)
    return mm, other


# ------------------------------------------------------------------------------ the prefill


def _dims(model: Any) -> ModelDims:
    if isinstance(model, ModelDims):
        return model
    if hasattr(model, "config") and hasattr(model.config, "vision_config"):  # a loaded model
        return ModelDims.from_config(model.config)
    return ModelDims.from_config(model)


def prefill_cost(
    model: Any,
    cfg: StarConfig,
    text_len: int,
    batch: int = 1,
    dtype: str = "float32",
    *,
    scoring: bool = True,
    all_vision_layers: bool = False,
) -> Cost:
    """FLOPs of the STAR prefill graph and the KV bytes it leaves.

    ``model``: ModelDims, LlavaConfig, config dict or a loaded LLaVA. ``text_len`` counts the
    prompt's tokens including the ONE image placeholder (the graph's T). ``scoring=False`` drops
    the STAR scoring (the unmodified model); ``cfg.keep1 == cfg.keep2 == N`` is the unpruned graph.
    """
    dims = _dims(model)
    n = dims.n_visual
    if not (1 <= cfg.keep2 <= cfg.keep1 <= n and 1 <= cfg.layer <= dims.layers - 1):
        raise ValueError(f"invalid STAR config {cfg} for N={n}, {dims.layers} layers")
    if text_len < 2:
        raise ValueError("text_len counts the image placeholder and at least one more token")
    l1, l2 = text_len - 1 + cfg.keep1, text_len - 1 + cfg.keep2
    b = batch

    def item(name, group, tokens, count, flops):
        mm, other = flops
        return CostItem(name, group, tokens, count, b * count * mm, b * count * other)

    n_vis = dims.vision_layers if all_vision_layers else dims.vision_layers_needed
    items = [
        item("vision.patch_embed", "vision", dims.vision_tokens, 1, vision_embed_flops(dims)),
        item("vision.layers", "vision", dims.vision_tokens, n_vis, vision_layer_flops(dims)),
    ]
    if scoring:
        items.append(item("star.stage1", "star", n, 1, stage1_flops(dims, cfg.keep1)))
    items.append(item("projector", "projector", cfg.keep1, 1, projector_flops(dims, cfg.keep1)))
    for i in range(dims.layers):
        length = l1 if i < cfg.layer else l2
        items.append(item(f"decoder.layer.{i}", "decoder", length, 1, decoder_layer_flops(dims, length)))
        if scoring and i == cfg.layer - 1:
            items.append(item("star.stage2", "star", l1, 1, stage2_flops(dims, cfg.keep1, l1)))
    items.append(item("lm_head", "lm_head", 1, 1, lm_head_flops(dims)))
    return Cost(
        batch=batch,
        text_len=text_len,
        keep1=cfg.keep1,
        keep2=cfg.keep2,
        layer=cfg.layer,
        n_visual=n,
        dtype=dtype,
        items=tuple(items),
        kv_bytes_per_layer=tuple(
            kv_bytes(dims, l1 if i < cfg.layer else l2, batch, dtype) for i in range(dims.layers)
        ),
        model=dims.to_dict(),
    )


def kv_bytes(model: Any, slots: int, batch: int = 1, dtype: str = "float32") -> int:
    """Bytes of one layer's K and V for ``slots`` cached positions."""
    dims = _dims(model)
    return 2 * batch * dims.kv_heads * slots * dims.head_dim * DTYPE_BYTES[dtype]


def unpruned(cfg: StarConfig, n_visual: int) -> StarConfig:
    """The same layer with keep1 = keep2 = N: the graph whose logits equal the unmodified model's."""
    return StarConfig(keep2=n_visual, keep1=n_visual, layer=cfg.layer)


@dataclass(frozen=True)
class Ceiling:
    """What the cost model predicts pruning can buy, for one keep / layer / prompt / batch."""

    keep1: int
    keep2: int
    layer: int
    text_len: int
    batch: int
    flops_unpruned: int
    flops_pruned: int
    speedup_ceiling: float  # flops_unpruned / flops_pruned
    scoring_share: float  # STAR scoring FLOPs / pruned prefill FLOPs
    vision_share_unpruned: float
    kv_bytes_unpruned: int
    kv_bytes_pruned: int
    kv_bytes_saved: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ceiling(model: Any, cfg: StarConfig, text_len: int, batch: int = 1, dtype: str = "float32") -> Ceiling:
    """The prefill speedup ceiling FLOPs(keep1 = keep2 = N) / FLOPs(pruned) and the KV saved."""
    dims = _dims(model)
    full = prefill_cost(dims, unpruned(cfg, dims.n_visual), text_len, batch, dtype)
    pruned = prefill_cost(dims, cfg, text_len, batch, dtype)
    return Ceiling(
        keep1=cfg.keep1,
        keep2=cfg.keep2,
        layer=cfg.layer,
        text_len=text_len,
        batch=batch,
        flops_unpruned=full.flops,
        flops_pruned=pruned.flops,
        speedup_ceiling=full.flops / pruned.flops,
        scoring_share=pruned.group_flops().get("star", 0) / pruned.flops,
        vision_share_unpruned=full.share("vision"),
        kv_bytes_unpruned=full.kv_bytes,
        kv_bytes_pruned=pruned.kv_bytes,
        kv_bytes_saved=full.kv_bytes - pruned.kv_bytes,
    )


def speedup_ceiling(model: Any, cfg: StarConfig, text_len: int, batch: int = 1) -> float:
    """FLOPs(unpruned, keep1 = keep2 = N) / FLOPs(pruned) of the prefill."""
    return ceiling(model, cfg, text_len, batch).speedup_ceiling


# ------------------------------------------------------------------------------ decode


@dataclass(frozen=True)
class DecodeStepCost:
    """One decode step: FLOPs and the bytes it must read (weights once + the whole KV cache)."""

    batch: int
    past_l1: int
    past_l2: int
    flops: int
    matmul_flops: int
    weight_bytes: int
    kv_bytes: int

    @property
    def bytes_read(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_read": self.bytes_read}


def decode_step_cost(
    model: Any, cfg: StarConfig, text_len: int, batch: int = 1, step: int = 0, dtype: str = "float32"
) -> DecodeStepCost:
    """Decode step ``step`` (0 = the first after prefill): pasts of L1 + step / L2 + step slots."""
    dims = _dims(model)
    p1, p2 = text_len - 1 + cfg.keep1 + step, text_len - 1 + cfg.keep2 + step
    mm = other = 0
    for i in range(dims.layers):
        m, o = decoder_layer_flops(dims, 1, p1 if i < cfg.layer else p2)
        mm, other = mm + m, other + o
    m, o = lm_head_flops(dims)
    mm, other = mm + m, other + o
    size = DTYPE_BYTES[dtype]
    weights = (dims.layers * dims.decoder_params() + dims.vocab * dims.hidden + dims.hidden) * size
    kv = sum(kv_bytes(dims, p1 if i < cfg.layer else p2, batch, dtype) for i in range(dims.layers))
    return DecodeStepCost(batch, p1, p2, batch * (mm + other), batch * mm, weights, kv)


def format_flops(flops: float) -> str:
    """1.23 GFLOP style."""
    if flops <= 0:
        return "0 FLOP"
    unit = min(int(math.log10(flops) // 3), 4)
    return f"{flops / 1000**unit:.3g} {['', 'k', 'M', 'G', 'T'][unit]}FLOP"
