"""The timed workload: one ``Case`` per (STAR config, batch) with its inputs and modules on the
device; its ``Variant``s (prefill + decode, eager and accelerated; the STAR scoring alone), set up
within the budget; the interleaved timing rounds."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from star_export import cost as cost_mod
from star_export.bench.exports import StarScoring
from star_export.bench.gpu.accel import Accel
from star_export.bench.gpu.device import Clock, Run, first_line, memory_peak, reset_peak
from star_export.bench.timing import SCORING_CALLS, Stats
from star_export.bench.variants import bench_inputs, scoring_inputs
from star_export.families.llava import FAMILY
from star_export.geometry import Geometry
from star_export.star import StarConfig

SETUP_SHARE = 0.6  # no new accelerated variant is set up after this share of --budget-s


@dataclass
class Case:
    """One (STAR config, batch): its inputs on the device, its modules, its first eager prefill."""

    tag: str
    cfg: StarConfig
    batch: int
    feeds: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    prefill: torch.nn.Module
    decode: torch.nn.Module
    first: tuple[torch.Tensor, ...] = ()  # the first eager prefill's outputs (logits, ..., presents)

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.first[5:])

    def prefill_call(self) -> Any:
        return self.prefill(*self.feeds)

    def step_inputs(self, geo: Geometry) -> tuple[torch.Tensor, ...]:
        """The first decode step's inputs after ``first``: greedy token, its position, masks, caches."""
        ids = self.feeds[1]
        b, t = ids.shape
        one = torch.ones(b, 1, dtype=torch.int64, device=ids.device)
        token = self.first[0].argmax(-1, keepdim=True)
        position = torch.full((b, 1), t - 1 + geo.n_positions, dtype=torch.int64, device=ids.device)
        m1 = torch.ones(b, t - 1 + geo.span(self.cfg.keep1), dtype=torch.int64, device=ids.device)
        m2 = torch.ones(b, t - 1 + geo.span(self.cfg.keep2), dtype=torch.int64, device=ids.device)
        return (token, position, torch.cat([m1, one], 1), torch.cat([m2, one], 1), *self.first[5:])

    def decode_loop(self, geo: Geometry, steps: int) -> int:
        """``steps`` greedy decode steps from ``first``, the caches and masks growing. -> tokens."""
        token, position, m1, m2, *pasts = self.step_inputs(geo)
        one = m1[:, -1:]
        for step in range(steps):
            out = self.decode(token, position + step, m1, m2, *pasts)
            token, pasts = out[0].argmax(-1, keepdim=True), out[1:]
            m1, m2 = torch.cat([m1, one], 1), torch.cat([m2, one], 1)
        return self.batch * steps


@dataclass
class Variant:
    """One timed thing: a prefill (with its decode) or the scoring alone, in one mode and batch."""

    kind: str  # prefill | scoring
    mode: str  # eager | graphs | compile
    tag: str  # unpruned | keep64 ...
    cfg: StarConfig
    batch: int
    call: Callable[[], Any] | None = None
    decode: Callable[[], int] | None = None
    decode_method: str = ""
    calls: int = 1
    skipped: str | None = None
    setup_s: float = 0.0
    peak_mem_bytes: int | None = None
    kv_bytes: int | None = None  # read from the first prefill's caches
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    decode_tokens: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.mode}/b{self.batch}/{self.tag}"

    def sample(self, clock: Clock, timed: bool) -> None:
        assert self.call is not None
        t = clock.time(self.call, self.calls)
        d = clock.time(self.decode) if self.decode is not None else None
        if timed:
            self.prefill_s.append(t)
            if d is not None:
                self.decode_s.append(d)

    def summary(self) -> dict[str, Any]:
        pre = Stats.of(self.prefill_s)
        tps = Stats.of([self.decode_tokens / d for d in self.decode_s if d > 0])
        return {
            "name": self.name,
            "kind": self.kind,
            "mode": self.mode,
            "tag": self.tag,
            "batch": self.batch,
            **self.cfg.to_dict(),
            "skipped": self.skipped,
            "setup_s": self.setup_s,
            "peak_mem_bytes": self.peak_mem_bytes,
            "kv_bytes": self.kv_bytes,
            "calls_per_sample": self.calls,
            "prefill_s": pre.to_dict() if pre else None,
            "prefill_samples_s": self.prefill_s,
            "decode_method": self.decode_method,
            "decode_tokens_per_sample": self.decode_tokens,
            "decode_tokens_per_s": tps.to_dict() if tps else None,
            "decode_samples_s": self.decode_s,
        }


def set_up_case(case: Case, geo: Geometry, args: argparse.Namespace, accel: Accel, run: Run) -> list[Variant]:
    """The first eager prefill (its caches feed decode), then the eager and the accelerated variant."""
    device = case.feeds[0].device
    steps = args.decode_steps
    reset_peak(device)
    t0 = time.perf_counter()
    case.first = case.prefill_call()
    eager = Variant("prefill", "eager", case.tag, case.cfg, case.batch, call=case.prefill_call)
    eager.decode = lambda: case.decode_loop(geo, steps)
    eager.decode_method = f"{steps} greedy StarDecode steps, caches growing from L1/L2"
    eager.decode_tokens = case.batch * steps
    eager.decode()
    eager.setup_s, eager.peak_mem_bytes = time.perf_counter() - t0, memory_peak(device)
    eager.kv_bytes = case.kv_bytes
    if accel.mode is None:
        return [eager]
    fast = Variant("prefill", accel.mode, case.tag, case.cfg, case.batch, kv_bytes=case.kv_bytes)
    if run.elapsed() > SETUP_SHARE * run.budget_s:
        fast.skipped = f"not set up: {run.elapsed():.0f} s of --budget-s {run.budget_s:.0f} spent"
        return [eager, fast]
    reset_peak(device)
    t0 = time.perf_counter()
    try:
        fast.call = accel.make(case.prefill, case.feeds)
    except Exception as e:  # recorded; the run goes on
        if accel.mode is None:  # every candidate failed: eager only, ``modes`` says why
            return [eager]
        fast.skipped = f"set-up failed: {first_line(e)}"
        return [eager, fast]
    fast.mode = accel.mode or fast.mode
    fast.decode_tokens = case.batch * steps
    try:
        step = accel.make(case.decode, case.step_inputs(geo))

        def replay_steps() -> int:
            for _ in range(steps):
                step()
            return case.batch * steps

        fast.decode = replay_steps
        fast.decode_method = f"the first decode step ({fast.mode}) replayed {steps} times (same past length)"
    except Exception as e:  # recorded in the variant
        fast.decode_method = f"not timed: {first_line(e)}"
    fast.setup_s, fast.peak_mem_bytes = time.perf_counter() - t0, memory_peak(device)
    return [eager, fast]


def scoring_variants(
    case: Case, geo: Geometry, dims: cost_mod.ModelDims, dtype: torch.dtype, accel: Accel, seed: int
) -> list[Variant]:
    """The STAR scoring alone on tensors of the prefill's shapes (features in the model's dtype,
    stage-2 attention probabilities in float32, as inside the prefill), eager and accelerated."""
    device = case.feeds[0].device
    feeds = {"input_ids": case.feeds[1].cpu().numpy()}
    example = scoring_inputs(geo, dims, case.cfg, feeds, seed=seed)
    args = (
        torch.from_numpy(example["features"]).to(device, dtype),
        torch.from_numpy(example["probs"]).to(device),
        case.feeds[1],
    )
    module = StarScoring(case.cfg, geo.image_token_id).eval()
    out = [
        Variant(
            "scoring",
            "eager",
            case.tag,
            case.cfg,
            case.batch,
            call=lambda: module(*args),
            calls=SCORING_CALLS,
        )
    ]
    if accel.mode is not None and accel.fixed:
        fast = Variant("scoring", accel.mode, case.tag, case.cfg, case.batch, calls=SCORING_CALLS)
        try:
            fast.call = accel.make(module, args)
        except Exception as e:  # recorded in the variant
            fast.skipped = f"set-up failed: {first_line(e)}"
        out.append(fast)
    return out


def make_cases(
    model: Any, geo: Geometry, cfgs: dict[str, StarConfig], args: argparse.Namespace, device: torch.device
) -> list[Case]:
    """One case per (batch, config): the bench's seeded prompts (no padding), on the device."""
    dtype = next(model.parameters()).dtype
    cases = []
    for batch in args.batch:
        feeds = bench_inputs(geo, batch, args.text_len, args.image_position, seed=args.seed)
        tensors = (
            torch.from_numpy(feeds["pixel_values"]).to(device, dtype),
            torch.from_numpy(feeds["input_ids"]).to(device),
            torch.from_numpy(feeds["attention_mask"]).to(device),
        )
        for tag, cfg in cfgs.items():
            prefill = FAMILY.prefill_module(model, geo, cfg).eval()
            decode = FAMILY.decode_module(model, geo, cfg).eval()
            cases.append(Case(tag, cfg, batch, tensors, prefill, decode))
    return cases


def interleave(
    variants: list[Variant], clock: Clock, args: argparse.Namespace, run: Run, snapshot: Callable[[], None]
) -> None:
    """Warm-up rounds, then timed rounds, round-robin in an order rotated by one per round; stops
    starting rounds once the next would end past --budget-s (at least one timed round runs).
    ``snapshot`` updates the run's data after every round (then saved)."""
    active = [v for v in variants if v.call is not None and v.skipped is None]
    if not active:
        return
    total = args.warmup + args.repeats
    timing = run.data.setdefault("timing", {})
    last = 0.0
    for r in range(total):
        timed = r >= args.warmup
        if timed and r > args.warmup and run.elapsed() + last > run.budget_s:
            timing["stopped"] = f"--budget-s {run.budget_s:g} reached after {r - args.warmup} timed rounds"
            run.log(f"      {timing['stopped']}")
            run.save()
            break
        k = r % len(active)
        t0 = time.perf_counter()
        gc.collect()
        gc.disable()
        try:
            for v in active[k:] + active[:k]:
                v.sample(clock, timed)
        finally:
            gc.enable()
        last = time.perf_counter() - t0
        timing["rounds_done"] = max(0, r + 1 - args.warmup)
        snapshot()
        run.save(f"timing ({r + 1}/{total} rounds)")
        label = "timed" if timed else "warm-up"
        run.log(f"      round {r + 1}/{total} ({label}, {len(active)} variants, {last:.2f} s)")
