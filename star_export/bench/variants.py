"""What is timed: the bench inputs, one runner per runtime, the timed variants and their interleaved rounds.

A ``Runner`` hides a runtime (onnxruntime or the rewrite through a numpy backend, HF eager, a
bare call); a ``Variant`` is one (runtime, configuration, batch) with its runner and its samples;
``interleave`` runs the variants round-robin.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from star_export import cost as cost_mod
from star_export.bench.timing import Log, RssSampler, Stats
from star_export.contract import carried
from star_export.errors import UsageError
from star_export.geometry import Geometry
from star_export.star import StarConfig


def bench_inputs(
    geo: Geometry, batch: int, text_len: int, image_position: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded random images and prompts: every row ``text_len`` tokens, BOS first, the ONE image
    placeholder at ``image_position``, no padding (all rows cost the same)."""
    if not 1 <= image_position <= text_len - 2:
        raise UsageError(f"image position {image_position} must leave a token before and after it")
    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((batch, 3, geo.image_size, geo.image_size), dtype=np.float32)
    ids = rng.integers(3, geo.vocab_size, (batch, text_len), dtype=np.int64)
    ids[ids == geo.image_token_id] = 3
    ids[:, 0] = 1
    ids[:, image_position] = geo.image_token_id
    mask = np.ones((batch, text_len), dtype=np.int64)
    return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}


def scoring_inputs(
    geo: Geometry, dims: cost_mod.ModelDims, cfg: StarConfig, feeds: dict[str, np.ndarray], seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs of the shapes the scoring sees inside the pruned prefill (values: seeded random)."""
    batch, text_len = feeds["input_ids"].shape
    l1 = text_len - 1 + cfg.keep1
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, geo.n_visual, dims.vision_hidden, generator=g)
    probs = torch.softmax(torch.randn(batch, geo.num_heads, l1, l1, generator=g), dim=-1)
    return {"features": features.numpy(), "probs": probs.numpy(), "input_ids": feeds["input_ids"]}


def decode_numpy(
    backend: Any,
    first: dict[str, np.ndarray],
    feeds: dict[str, np.ndarray],
    geo: Geometry,
    cfg: StarConfig,
    steps: int,
) -> int:
    """``steps`` greedy decode steps from a prefill's outputs (the loop of ``runtime.generate``).
    Returns the tokens produced (batch x steps)."""
    mask = feeds["attention_mask"]
    batch, text_len = mask.shape
    real = mask.sum(axis=1).astype(np.int64)
    pad = text_len - real
    m1 = (np.arange(text_len - 1 + cfg.keep1)[None] >= pad[:, None]).astype(np.int64)
    m2 = (np.arange(text_len - 1 + cfg.keep2)[None] >= pad[:, None]).astype(np.int64)
    position = real - 1 + geo.n_visual
    pasts = {carried(n): v for n, v in first.items() if carried(n)}  # caches (+ slot positions)
    logits = first["logits"]
    one = np.ones((batch, 1), dtype=np.int64)
    for step in range(steps):
        token = np.argmax(logits, axis=-1).astype(np.int64)
        m1 = np.concatenate([m1, one], axis=1)
        m2 = np.concatenate([m2, one], axis=1)
        out = backend.decode(
            {
                "input_ids": token[:, None],
                "position_ids": (position + step)[:, None],
                "attention_mask_l1": m1,
                "attention_mask_l2": m2,
                **pasts,
            }
        )
        logits = out["logits"]
        pasts = {carried(n): v for n, v in out.items() if carried(n)}
    return batch * steps


class Runner:
    """One timed variant: ``load`` (sessions, modules; may be shared), ``start`` (the first,
    untimed prefill, whose cache starts every decode), then ``prefill`` / ``decode`` as asked."""

    has_decode = True
    calls_per_sample = 1

    def load(self) -> None: ...

    def start(self) -> None: ...

    def prefill(self) -> None:
        raise NotImplementedError

    def before_decode(self) -> None: ...

    def decode(self, steps: int) -> int:
        raise NotImplementedError

    def kv_bytes(self) -> int | None:
        return None

    def close(self) -> None: ...


class Shared:
    """One backend per graph, shared by the variants of every batch (as a server would)."""

    def __init__(self) -> None:
        self._items: dict[Any, Any] = {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._items:
            self._items[key] = make()
        return self._items[key]

    def clear(self) -> None:
        self._items.clear()


class NumpyBackendRunner(Runner):
    """A backend with ``prefill(feeds)`` / ``decode(feeds)`` dicts (onnxruntime, the rewrite)."""

    def __init__(self, get_backend: Callable[[], Any], feeds, geo: Geometry, cfg: StarConfig):
        self._get = get_backend
        self.backend: Any = None
        self.feeds, self.geo, self.cfg = feeds, geo, cfg
        self.first: dict[str, np.ndarray] = {}

    def load(self) -> None:
        self.backend = self._get()

    def start(self) -> None:
        self.first = self.backend.prefill(self.feeds)

    def prefill(self) -> None:
        self.backend.prefill(self.feeds)

    def decode(self, steps: int) -> int:
        return decode_numpy(self.backend, self.first, self.feeds, self.geo, self.cfg, steps)

    def kv_bytes(self) -> int:
        return sum(v.nbytes for k, v in self.first.items() if k.startswith("present."))

    def close(self) -> None:
        self.backend = None
        self.first = {}


class HFEagerRunner(Runner):
    """The unmodified LlavaForConditionalGeneration (eager attention) on the expanded prompt."""

    def __init__(self, model: Any, geo: Geometry, feeds: dict[str, np.ndarray]):
        self.model = model
        ids = feeds["input_ids"]
        p = int(np.argmax(ids[0] == geo.image_token_id))
        if not (ids[:, p] == geo.image_token_id).all():
            raise UsageError("hf-eager needs the image placeholder at the same index in every row")
        fill = np.full((ids.shape[0], geo.n_visual), geo.image_token_id)
        expanded = np.concatenate([ids[:, :p], fill, ids[:, p + 1 :]], 1)
        self.length = expanded.shape[1]
        b = ids.shape[0]
        self.args = {
            "pixel_values": torch.from_numpy(feeds["pixel_values"]),
            "input_ids": torch.from_numpy(expanded),
            "attention_mask": torch.ones(b, self.length, dtype=torch.int64),
            "position_ids": torch.arange(self.length).unsqueeze(0).expand(b, -1),
        }
        self.batch = b
        self.first_cache: Any = None
        self.first_logits: torch.Tensor | None = None
        self.cache: Any = None

    def _prefill(self):
        with torch.no_grad():
            return self.model(**self.args, use_cache=True, logits_to_keep=1)

    def start(self) -> None:
        out = self._prefill()
        self.first_cache, self.first_logits = out.cache, out.logits[:, -1]

    def prefill(self) -> None:
        self._prefill()

    def before_decode(self) -> None:
        self.cache = copy.deepcopy(self.first_cache)

    def decode(self, steps: int) -> int:
        logits = self.first_logits
        with torch.no_grad():
            for step in range(steps):
                token = logits.argmax(-1)
                out = self.model(
                    input_ids=token[:, None],
                    attention_mask=torch.ones(self.batch, self.length + step + 1, dtype=torch.int64),
                    position_ids=torch.full((self.batch, 1), self.length + step, dtype=torch.int64),
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                logits = out.logits[:, -1]
        self.cache = None
        return self.batch * steps

    def kv_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.first_cache.layers)

    def close(self) -> None:
        self.first_cache = self.cache = None


class CallRunner(Runner):
    """A prefill-only call (the scoring subgraph, an ablation session): ``make`` returns it.

    ``calls`` back-to-back calls make one sample (its time is divided by ``calls``): a call of a
    few ms on its own pays thread wake-up and cold caches that the same ops inside a prefill do not.
    """

    has_decode = False

    def __init__(self, make: Callable[[], Callable[[], Any]], calls: int = 1):
        self._make = make
        self._run: Callable[[], Any] | None = None
        self.calls_per_sample = calls

    def load(self) -> None:
        self._run = self._make()

    def start(self) -> None:
        self.prefill()

    def prefill(self) -> None:
        assert self._run is not None
        for _ in range(self.calls_per_sample):
            self._run()

    def close(self) -> None:
        self._run = None


@dataclass
class Variant:
    name: str
    runtime: str  # hf-eager | torch-rewrite | onnxruntime | tensorrt | onnxruntime-scoring | torch-scoring
    batch: int
    keep1: int
    keep2: int
    layer: int
    pruned: bool
    rounds: int
    runner: Runner | None = None
    skipped: str | None = None
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    decode_tokens: int = 0
    load_s: float = 0.0
    first_call_s: float = 0.0
    peak_rss: int = 0
    peak_delta: int = 0
    kv_bytes: int | None = None
    kv_bytes_model: int | None = None
    flops: int | None = None

    @property
    def kind(self) -> str:
        return "scoring" if self.runtime.endswith("-scoring") else "prefill"

    def first_call(self, steps: int) -> None:
        """The untimed first prefill + decode: the warm-up, and the memory it takes."""
        runner = self.runner
        assert runner is not None
        with RssSampler() as s:
            t0 = time.perf_counter()
            runner.start()
            if runner.has_decode and steps > 0:
                runner.before_decode()
                runner.decode(steps)
            self.first_call_s = time.perf_counter() - t0
        self.peak_rss, self.peak_delta = s.peak, s.delta
        self.kv_bytes = runner.kv_bytes()

    def run_once(self, steps: int, timed: bool) -> None:
        runner = self.runner
        assert runner is not None
        sampler = contextlib.nullcontext() if timed else RssSampler()
        with sampler as s:
            t0 = time.perf_counter()
            runner.prefill()
            t1 = time.perf_counter()
            if runner.has_decode and steps > 0:
                runner.before_decode()
                t2 = time.perf_counter()
                tokens = runner.decode(steps)
                t3 = time.perf_counter()
        if timed:
            self.prefill_s.append((t1 - t0) / runner.calls_per_sample)
            if runner.has_decode and steps > 0:
                self.decode_s.append(t3 - t2)
                self.decode_tokens = tokens
        else:
            self.peak_rss = max(self.peak_rss, s.peak)
            self.peak_delta = max(self.peak_delta, s.delta)

    def summary(self) -> dict[str, Any]:
        pre = Stats.of(self.prefill_s)
        tps = Stats.of([self.decode_tokens / d for d in self.decode_s if d > 0])
        return {
            "name": self.name,
            "runtime": self.runtime,
            "kind": self.kind,
            "batch": self.batch,
            "keep1": self.keep1,
            "keep2": self.keep2,
            "layer": self.layer,
            "pruned": self.pruned,
            "skipped": self.skipped,
            "rounds": self.rounds,
            "load_s": self.load_s,
            "first_call_s": self.first_call_s,
            "prefill_s": pre.to_dict() if pre else None,
            "prefill_samples_s": list(self.prefill_s),
            "decode_steps_per_round": self.decode_tokens // self.batch if self.decode_tokens else 0,
            "decode_tokens_per_s": tps.to_dict() if tps else None,
            "decode_samples_s": list(self.decode_s),
            "peak_rss_bytes": self.peak_rss,
            "peak_rss_delta_bytes": self.peak_delta,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_model": self.kv_bytes_model,
            "flops_model": self.flops,
        }


def interleave(
    variants: Sequence[Variant], steps: int, rounds: int, timed: bool, log: Log, label: str
) -> None:
    """Round-robin: every round runs each active variant once, in an order rotated by one per round."""
    start = time.perf_counter()
    for r in range(rounds):
        active = [v for v in variants if v.runner is not None and (not timed or r < v.rounds)]
        if not active:
            break
        k = r % len(active)
        gc.collect()
        gc.disable()
        try:
            for v in active[k:] + active[:k]:
                v.run_once(steps, timed)
                time.sleep(0.01)  # let the previous runtime's spinning threads park
        finally:
            gc.enable()
        log(
            f"      {label} round {r + 1}/{rounds}: {len(active)} variants ({time.perf_counter() - start:.0f}s)"
        )
