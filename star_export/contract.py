"""The exported I/O contract, declared once, as frozen data.

Everything that names a tensor reads it from here: the exporter (input/output names, dynamic
shapes), the manifest, the parity checks, TensorRT optimization profiles and Triton configs.
Dims are ints (static) or strings: a symbol (``batch``, ``text_len``) or an expression of
them (``text_len + 127``) for derived lengths such as L1 = T - 1 + keep1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from star_export.errors import UsageError
from star_export.geometry import Geometry
from star_export.star import StarConfig

Dim = int | str
KEEP_INPUT = "keep_slots"  # a keep range's prefill input: its length is keep2, its values are never read

# numpy-style dtype names; ONNX / TensorRT / Triton names are mapped where they are needed.
FLOAT_DTYPES = {"float32", "float16", "bfloat16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]
    doc: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "doc": self.doc}

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Shape with every symbol/expression evaluated for the given symbol sizes."""
        return tuple(
            d if isinstance(d, int) else int(eval(d, {"__builtins__": {}, "Min": min}, dict(sizes)))
            for d in self.shape
        )


@dataclass(frozen=True)
class DynamicDim:
    """A dynamic input dim with its optimization-profile range."""

    name: str
    min: int
    opt: int
    max: int

    def to_dict(self) -> dict[str, int | str]:
        return {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class GraphContract:
    graph: str  # "prefill"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[DynamicDim, ...]
    tolerances: dict[str, float] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dim(self, name: str) -> DynamicDim:
        return next(d for d in self.dims if d.name == name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{input name: {axis: symbol}} for the inputs' symbolic dims."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in self.inputs
            if any(isinstance(d, str) for d in t.shape)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dynamic_dims": [d.to_dict() for d in self.dims],
            "tolerances": dict(self.tolerances),
        }


# Parity tolerances (fp32): logits max|diff| relative to max|logit|.
TOLERANCES = {
    "onnx_vs_torch_logits_rel": 1e-4,
    "rewrite_vs_reference_logits_rel": 1e-5,
    "rewrite_vs_hf_logits_rel": 1e-5,
    "padded_vs_alone_logits_rel": 1e-5,
}


def prefill_contract(
    geo: Geometry,
    cfg: StarConfig,
    batch: tuple[int, int, int],
    text_len: tuple[int, int, int],
    dtype: str = "float32",
    pixel_doc: str = "image pixels as the checkpoint's image processor lays them out",
) -> GraphContract:
    """The prefill graph's I/O, exactly the table of docs/star.md (``pixel_doc``: the family's words).
    A keep range (``cfg.keep_range``) adds the input ``keep_slots`` [batch, keep] and the dynamic dim
    ``keep`` (min, opt, max); keep1, the stage-1 span and L1/L2 are then expressions of ``keep``."""
    keep1, keep2 = keep_dims(geo, cfg)
    l1, l2 = (present_length(geo, k) for k in (keep1, keep2))
    inputs = (
        TensorSpec(
            "pixel_values",
            dtype,
            ("batch", *geo.pixel_shape),
            pixel_doc,
        ),
        TensorSpec(
            "input_ids",
            "int64",
            ("batch", "text_len"),
            f"prompt ids with exactly ONE image placeholder ({geo.image_token_id}) per row, left padded",
        ),
        TensorSpec("attention_mask", "int64", ("batch", "text_len"), "1 for real tokens, 0 for left padding"),
    )
    if cfg.keep_range is not None:
        inputs += (
            TensorSpec(
                KEEP_INPUT,
                "int64",
                ("batch", "keep"),
                "its LENGTH is keep2 (values never read): TopK's K comes from this input's shape",
            ),
        )
    outputs = [
        TensorSpec("logits", "float32", ("batch", geo.vocab_size), "next-token logits at the last position"),
        TensorSpec("stage1_keep_idx", "int64", ("batch", keep1), "patch indices kept by stage 1, ascending"),
        TensorSpec("stage2_keep_idx", "int64", ("batch", keep2), "patch indices kept by stage 2, ascending"),
        TensorSpec(
            "stage1_margin",
            "float32",
            ("batch",),
            "stage 1's cut: the keep1-th score minus the next (0: an exact tie decided by index; inf: none dropped)",
        ),
        TensorSpec(
            "stage2_margin",
            "float32",
            ("batch",),
            "stage 2's cut: the keep2-th score minus the next, over content tokens (inf: none dropped)",
        ),
    ]
    for i in range(geo.num_layers):
        length = l1 if i < cfg.layer else l2
        for kind in ("key", "value"):
            outputs.append(
                TensorSpec(
                    f"present.{i}.{kind}",
                    dtype,
                    ("batch", geo.num_kv_heads, length, geo.head_dim),
                    f"layer {i} {kind}s{' after RoPE' if kind == 'key' else ''}, "
                    f"{'L1' if i < cfg.layer else 'L2'} = {length} slots",
                )
            )
    if slot_positions(geo):
        for group, length in (("l1", l1), ("l2", l2)):
            outputs.append(
                TensorSpec(
                    f"present_positions_{group}",
                    "int64",
                    ("batch", length),
                    f"original position of each {group.upper()} slot (-1 at left padding): the decode "
                    f"graph's past_positions_{group}",
                )
            )
    dims = (DynamicDim("batch", *batch), DynamicDim("text_len", *text_len))
    if cfg.keep_range is not None:
        dims += (DynamicDim("keep", cfg.keep_range[0], cfg.keep2, cfg.keep_range[1]),)
    return GraphContract("prefill", inputs, tuple(outputs), dims, dict(TOLERANCES))


def keep_dims(geo: Geometry, cfg: StarConfig) -> tuple[Dim, Dim]:
    """(keep1, keep2) as the prefill contract writes them: ints for a fixed level; for a keep range
    ``keep`` and keep1 by ``star.keep1_rule``, ``Min(N, 2*keep)`` (as the exporter writes it)."""
    if cfg.keep_range is None:
        return cfg.keep1, cfg.keep2
    return f"Min({geo.n_visual}, 2*keep)", "keep"


def present_length(geo: Geometry, keep: Dim) -> str:
    """The cache length ``text_len - 1 + span(keep)`` of a prefill output, written as the exporter
    writes a derived dim (``text_len + 127``; a keep range's ``keep + text_len - 1``, sympy's order)."""
    if isinstance(keep, int):
        return f"text_len + {geo.span(keep) - 1}"
    import sympy

    return str(sympy.sympify(f"text_len + {keep} + {geo.n_fixed - 1}"))


def slot_positions(geo: Geometry) -> bool:
    """Whether the family's graphs carry each cached slot's original position (``Family.slot_positions``:
    the prefill outputs ``present_positions_l1/_l2``, the decode step takes ``past_positions_l1/_l2`` and
    returns them with the new token's position appended, like the key/value caches)."""
    return geo.slot_positions  # set by the family (``Family.slot_positions``) in its geometry


def carried(name: str) -> str | None:
    """The decode input that an output ``name`` (of the prefill or of a decode step) feeds at the next
    step: ``present.{i}.key`` -> ``past.{i}.key``, ``present_positions_l1`` -> ``past_positions_l1``;
    None for every other output."""
    return "past" + name[len("present") :] if name.startswith("present") else None


def decode_contract(
    geo: Geometry,
    cfg: StarConfig | Sequence[StarConfig],
    batch: tuple[int, int, int],
    text_len: tuple[int, int, int],
    max_new_tokens: int,
    dtype: str = "float32",
) -> GraphContract:
    """One decode step, shared by every keep level of an export (``cfg``: one level or several, all
    with the same K). Layers < K hold ``past_len_l1`` past slots (P1), layers >= K hold
    ``past_len_l2`` (P2): two independent dynamic lengths, so no keep count is baked in. After a
    prefill of level (keep1, keep2): P1 = L1 = T - 1 + span1 and P2 = L2 = T - 1 + span2; each step
    adds one to both. The ranges cover every level's prompts and ``max_new_tokens`` answers."""
    levels = [cfg] if isinstance(cfg, StarConfig) else list(cfg)
    # a keep range's past lengths span its ends (its default level first: the opt lengths)
    levels = [
        e
        for c in levels
        for e in ((c,) if c.keep_range is None else (c.at(c.keep2), *map(c.at, c.keep_range)))
    ]
    layer = levels[0].layer
    if any(c.layer != layer for c in levels):
        raise UsageError("every keep level of one export uses the same --layer K")
    inputs = [
        TensorSpec("input_ids", "int64", ("batch", 1), "the token chosen at the previous step"),
        TensorSpec(
            "position_ids",
            "int64",
            ("batch", 1),
            f"its original position: (real prompt tokens) - 1 + {geo.n_positions} + (tokens generated before it)",
        ),
        TensorSpec(
            "attention_mask_l1",
            "int64",
            ("batch", "past_len_l1 + 1"),
            f"layers 0..{layer - 1}: 1 per valid past slot (0 at left padding), then 1 for the new token",
        ),
        TensorSpec(
            "attention_mask_l2",
            "int64",
            ("batch", "past_len_l2 + 1"),
            f"layers {layer}..{geo.num_layers - 1}: 1 per valid past slot (0 at left padding), then 1",
        ),
    ]
    outputs = [TensorSpec("logits", "float32", ("batch", geo.vocab_size), "next-token logits")]
    for i in range(geo.num_layers):
        past = "past_len_l1" if i < layer else "past_len_l2"
        for kind in ("key", "value"):
            inputs.append(
                TensorSpec(
                    f"past.{i}.{kind}",
                    dtype,
                    ("batch", geo.num_kv_heads, past, geo.head_dim),
                    f"present.{i}.{kind} of the previous step (prefill or decode)",
                )
            )
            outputs.append(
                TensorSpec(
                    f"present.{i}.{kind}",
                    dtype,
                    ("batch", geo.num_kv_heads, f"{past} + 1", geo.head_dim),
                    f"layer {i} {kind}s with the new token appended",
                )
            )
    if slot_positions(geo):
        for group in ("l1", "l2"):
            past = f"past_len_{group}"
            inputs.append(
                TensorSpec(
                    f"past_positions_{group}",
                    "int64",
                    ("batch", past),
                    f"present_positions_{group} of the previous step (prefill or decode): each past slot's "
                    "original position (sliding layers mask slots >= sliding_window positions behind)",
                )
            )
            outputs.append(
                TensorSpec(
                    f"present_positions_{group}",
                    "int64",
                    ("batch", f"{past} + 1"),
                    f"past_positions_{group} with position_ids appended",
                )
            )
    dims = [DynamicDim("batch", *batch)]
    for name, keeps in (
        ("past_len_l1", [c.keep1 for c in levels]),
        ("past_len_l2", [c.keep2 for c in levels]),
    ):
        spans = [geo.span(k) for k in keeps]
        lo = max(2, text_len[0]) - 1 + min(spans)
        hi = text_len[2] - 1 + max(spans) + max_new_tokens - 1
        opt = text_len[1] - 1 + spans[0] + 16  # the default level's typical length
        dims.append(DynamicDim(name, lo, min(max(opt, lo), hi), hi))
    return GraphContract("decode", tuple(inputs), tuple(outputs), tuple(dims), dict(TOLERANCES))


def max_new_tokens(dims: Mapping[str, Mapping[str, Any]], text_len: int, span1: int, span2: int) -> int:
    """The longest answer the decode graph's ranges allow after a prompt of ``text_len`` tokens
    (``dims``: {name: {"max": ...}} of the decode graph's dynamic dims)."""
    room1 = int(dims["past_len_l1"]["max"]) - (text_len - 1 + span1) + 1
    room2 = int(dims["past_len_l2"]["max"]) - (text_len - 1 + span2) + 1
    return min(room1, room2)


def contract_from_dict(d: Mapping[str, Any]) -> GraphContract:
    """Inverse of ``GraphContract.to_dict()`` (extra keys such as ``file``/``opset`` are ignored)."""

    def spec(t: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t.get("doc", ""))

    try:
        return GraphContract(
            graph=d["graph"],
            inputs=tuple(spec(t) for t in d["inputs"]),
            outputs=tuple(spec(t) for t in d["outputs"]),
            dims=tuple(
                DynamicDim(x["name"], int(x["min"]), int(x["opt"]), int(x["max"])) for x in d["dynamic_dims"]
            ),
            tolerances=dict(d.get("tolerances", {})),
        )
    except (KeyError, TypeError) as e:
        raise UsageError(f"manifest graph entry is not a contract (missing {e})") from None
