"""Generation: prefill (pruning) + decode steps with per-layer pasts, over onnxruntime or PyTorch.

The loop is the same for every backend and is written with numpy only, so it reads as the
recipe a C++ or Triton user follows with the exported graphs (all names from the manifest):

1. ``prefill(pixel_values, input_ids, attention_mask)`` -> logits, kept indices, presents
   (layers < K hold L1 = T - 1 + keep1 slots, layers >= K hold L2 = T - 1 + keep2).
2. Masks of the cached slots: padding is on the left, so in both layouts the first
   ``T - real`` slots are padding (0) and the rest are real text or visual tokens (1).
3. The first new token sits at original position ``real - 1 + N`` (the unpruned count).
4. Each decode step feeds the chosen token, its position, both masks with a 1 appended, and
   the previous presents as pasts (every output named ``present*`` feeds the input ``past*``:
   the caches and, where the family carries them, the slots' original positions); every layer's
   cache grows by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from star_export.contract import FLOAT_DTYPES, KEEP_INPUT, GraphContract, carried
from star_export.encoding import cast_inputs, declared_dtypes
from star_export.geometry import Geometry
from star_export.star import StarConfig, check_prompts

if TYPE_CHECKING:
    from star_export.weights import SharedWeights


class Backend(Protocol):
    name: str

    def prefill(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def decode(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxruntimeBackend:
    """A prefill graph + decode.onnx in onnxruntime (CPU provider unless told otherwise). ``decode``:
    an existing decode session to share (every keep level of an export uses the same decode graph);
    ``weights``: the export's initializers read once for every session (``weights.SharedWeights``)."""

    name = "onnxruntime"

    def __init__(
        self,
        prefill_path: Path,
        decode_path: Path,
        threads: int | None = None,
        providers=None,
        decode: Any = None,
        weights: SharedWeights | None = None,
    ):
        import onnxruntime as ort

        def options(path: Path) -> Any:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if threads:
                opts.intra_op_num_threads = threads
            return opts if weights is None else weights.options(path, opts)

        providers = providers or ["CPUExecutionProvider"]
        self._prefill = ort.InferenceSession(
            str(prefill_path), sess_options=options(prefill_path), providers=providers
        )
        self.decode_session = decode or ort.InferenceSession(
            str(decode_path), sess_options=options(decode_path), providers=providers
        )
        self.weights = weights
        self._prefill_out = [o.name for o in self._prefill.get_outputs()]
        self._decode_out = [o.name for o in self.decode_session.get_outputs()]
        # the graphs' declared input dtypes: float32 pixels become fp16 for an fp16 export
        self._prefill_in = declared_dtypes(self._prefill.get_inputs())
        self._decode_in = declared_dtypes(self.decode_session.get_inputs())

    def prefill(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fed = cast_inputs({k: v for k, v in feeds.items() if k in self._prefill_in}, self._prefill_in)
        return dict(zip(self._prefill_out, self._prefill.run(self._prefill_out, fed), strict=True))

    def decode(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fed = cast_inputs(feeds, self._decode_in)
        return dict(zip(self._decode_out, self.decode_session.run(self._decode_out, fed), strict=True))


def as_bfloat16(value: Any) -> Any:
    """A float array or tensor as a torch bfloat16 tensor (numpy has no bfloat16): ``cast_inputs``'
    converter for the PyTorch rewrite and TensorRT."""
    import torch

    t = value if torch.is_tensor(value) else torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return t.to(torch.bfloat16)


class TorchBackend:
    """The PyTorch static rewrite (``StarPrefill`` / ``StarDecode``) driven by the same loop."""

    name = "torch"

    def __init__(
        self, model: Any, geo: Geometry, cfg: StarConfig, prefill: GraphContract, decode: GraphContract
    ):
        import torch

        from star_export.families import family_of

        family = family_of(geo)
        self._torch = torch
        self._dtype = next(model.parameters()).dtype  # float inputs (pixels, pasts) are cast to it
        self._float = str(self._dtype).removeprefix("torch.")
        self._prefill = family.prefill_module(model, geo, cfg).eval()
        self._decode = family.decode_module(model, geo, cfg).eval()
        self._pc, self._dc = prefill, decode
        self.forced: tuple[np.ndarray, np.ndarray] | None = None  # (stage1, stage2) indices to force

    def _args(self, contract: GraphContract, feeds: dict[str, np.ndarray]) -> list:
        torch = self._torch
        declared = {t.name: (self._float if t.dtype in FLOAT_DTYPES else t.dtype) for t in contract.inputs}
        fed = cast_inputs({n: feeds[n] for n in contract.input_names}, declared, as_bfloat16)
        return [v if torch.is_tensor(v) else torch.as_tensor(np.ascontiguousarray(v)) for v in fed.values()]

    @staticmethod
    def _numpy(t) -> np.ndarray:
        import torch

        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16

    def _run(self, module, contract: GraphContract, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.no_grad():
            outs = module(*self._args(contract, feeds))
        return {n: self._numpy(o) for n, o in zip(contract.output_names, outs, strict=True)}

    def prefill(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.forced is None:
            return self._run(self._prefill, self._pc, feeds)
        torch = self._torch
        force1, force2 = (torch.from_numpy(np.asarray(f, dtype=np.int64)) for f in self.forced)
        with torch.no_grad():
            out = self._prefill.run(*self._args(self._pc, feeds), force1=force1, force2=force2)
        names = ("logits", "stage1_keep_idx", "stage2_keep_idx", "stage1_margin", "stage2_margin")
        flat = (*(out[n] for n in names), *out["presents"])
        flat += tuple(out[n] for n in self._pc.output_names[len(flat) :])  # present_positions_*
        return {n: self._numpy(o) for n, o in zip(self._pc.output_names, flat, strict=True)}

    def decode(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(self._decode, self._dc, feeds)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy (argmax, ties to the lower id)
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # EOS and any other stop tokens
    pad_token_id: int = 0  # fed (and reported) for rows that have stopped


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row, generated ids up to and including a stop token
    step_logits: list[np.ndarray] = field(default_factory=list)  # (B, V) per step
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    stage1_keep_idx: np.ndarray | None = None
    stage2_keep_idx: np.ndarray | None = None
    stage1_margin: np.ndarray | None = None  # (B,) the keep1-th score minus the next
    stage2_margin: np.ndarray | None = None  # (B,) the keep2-th score minus the next
    prefill_present_lengths: list[int] = field(default_factory=list)
    final_present_lengths: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        rows = len(self.tokens)
        return rows * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def _choose(logits: np.ndarray, gen: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: greedy, or temperature + nucleus (top-p) sampling."""
    if gen.temperature <= 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    z = logits.astype(np.float64) / gen.temperature
    z -= z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.empty(len(probs), dtype=np.int64)
    for b, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = int(np.searchsorted(cum, gen.top_p) + 1)  # smallest prefix with mass >= top_p
        keep = order[:cut]
        out[b] = rng.choice(keep, p=p[keep] / p[keep].sum())
    return out


def generate(
    backend: Backend,
    feeds: dict[str, np.ndarray],
    geo: Geometry,
    cfg: StarConfig,
    gen: GenerationConfig,
    keep_logits: bool = False,
    teacher: np.ndarray | None = None,
) -> GenerationResult:
    """Prefill then decode up to ``gen.max_new_tokens`` tokens per row. ``teacher`` (B, steps): feed
    these tokens instead of the chosen ones (teacher forcing: parity of another backend's run)."""
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    check_prompts(ids, mask, geo.image_token_id)
    batch, text_len = ids.shape
    rng = np.random.default_rng(gen.seed)

    start = time.perf_counter()
    fed = {k: feeds[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    fed[KEEP_INPUT] = keep_slots(batch, cfg.keep2)  # read (its length) only by a keep range's graph
    out = backend.prefill(fed)
    prefill_s = time.perf_counter() - start

    n_layers = geo.num_layers
    real = mask.sum(axis=1).astype(np.int64)  # (B,) real prompt tokens
    pad = text_len - real  # (B,) left padding
    l1, l2 = text_len - 1 + geo.span(cfg.keep1), text_len - 1 + geo.span(cfg.keep2)
    mask_l1 = (np.arange(l1)[None] >= pad[:, None]).astype(np.int64)  # (B, L1)
    mask_l2 = (np.arange(l2)[None] >= pad[:, None]).astype(np.int64)  # (B, L2)
    position = real - 1 + geo.n_positions  # (B,) original position of the first new token
    pasts = _pasts(out)

    result = GenerationResult(
        tokens=[[] for _ in range(batch)],
        prefill_s=prefill_s,
        stage1_keep_idx=out["stage1_keep_idx"],
        stage2_keep_idx=out["stage2_keep_idx"],
        stage1_margin=out.get("stage1_margin"),
        stage2_margin=out.get("stage2_margin"),
        prefill_present_lengths=[out[f"present.{i}.key"].shape[2] for i in range(n_layers)],
    )
    logits = out["logits"]
    finished = np.zeros(batch, dtype=bool)
    one = np.ones((batch, 1), dtype=np.int64)
    decode_start = time.perf_counter()
    for step in range(gen.max_new_tokens):
        if keep_logits:
            result.step_logits.append(logits.copy())
        chosen = _choose(logits, gen, rng) if teacher is None else np.asarray(teacher)[:, step]
        token = np.where(finished, gen.pad_token_id, chosen)
        for b in np.flatnonzero(~finished):
            result.tokens[b].append(int(token[b]))
        finished |= np.isin(token, gen.stop_token_ids)
        if finished.all() or step == gen.max_new_tokens - 1:
            break
        mask_l1 = np.concatenate([mask_l1, one], axis=1)
        mask_l2 = np.concatenate([mask_l2, one], axis=1)
        out = backend.decode(
            {
                "input_ids": token[:, None],
                "position_ids": (position + step)[:, None],
                "attention_mask_l1": mask_l1,
                "attention_mask_l2": mask_l2,
                **pasts,
            }
        )
        result.decode_steps += 1
        logits = out["logits"]
        pasts = _pasts(out)
    result.decode_s = time.perf_counter() - decode_start
    result.final_present_lengths = [pasts[f"past.{i}.key"].shape[2] for i in range(n_layers)]
    return result


def keep_slots(batch: int, keep: int) -> np.ndarray:
    """The ``keep_slots`` input of a keep range's prefill at ``keep``: [batch, keep] zeros (the graph
    reads its length, never its values)."""
    return np.zeros((batch, keep), dtype=np.int64)


def _pasts(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The next decode step's carried inputs from a step's outputs (``contract.carried``)."""
    return {carried(n): v for n, v in out.items() if carried(n)}
