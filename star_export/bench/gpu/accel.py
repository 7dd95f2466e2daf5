"""The faster mode besides eager: CUDA graphs (captured once per shape, replayed), else
``torch.compile``, else none; each failure recorded with its reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from star_export.bench.gpu.device import first_line

_KEEP: list[Any] = []  # captured CUDA graphs and their static outputs, alive for the whole run


def capture_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured into a CUDA graph (two warm-up calls on a side stream first); -> replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    _KEEP.append((graph, outputs, fn))  # fn holds the static inputs: freed, their memory would be reused
    return graph.replay


def compile_call(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    """``module(*args)`` through torch.compile (static shapes), compiled by a first call."""
    import torch._dynamo

    config = torch._dynamo.config  # one compiled graph per shape: 8 recompilations would fall back to eager
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, the older one
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    compiled = torch.compile(module, dynamic=False)

    def call() -> Any:
        return compiled(*args)

    call()
    return call


class Accel:
    """The faster mode besides eager: candidates tried in order until one sets a variant up; a
    failure before that is recorded (``notes``) and the next candidate tried; after that, the mode
    is fixed and a failing variant is skipped with its reason."""

    def __init__(self, requested: str, device: torch.device):
        self.notes: dict[str, str] = {"eager": "ok"}
        if requested == "eager":
            self.order: list[str] = []
            self.notes.update(graphs="not asked (--mode eager)", compile="not asked (--mode eager)")
        elif requested in ("graphs", "compile"):
            self.order = [requested]
        elif device.type == "cuda":
            self.order = ["graphs", "compile"]
        else:
            self.order = []
            self.notes["graphs"] = "skipped: CUDA graphs need --device cuda"
            self.notes["compile"] = (
                "skipped: not tried on CPU under --mode auto (inductor compiles C++ for minutes); "
                "--mode compile asks for it"
            )
        self.fixed = False

    @property
    def mode(self) -> str | None:
        return self.order[0] if self.order else None

    def make(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        """A call of ``module(*args)`` in the current mode; raises once the mode is fixed."""
        while self.order:
            mode = self.order[0]
            try:
                call = (
                    capture_graph(lambda: module(*args)) if mode == "graphs" else compile_call(module, args)
                )
            except Exception as e:  # any failure: record it, fall back
                if self.fixed:
                    raise
                self.notes[mode] = f"failed: {first_line(e)}"
                self.order.pop(0)
                for later in self.order:
                    self.notes.setdefault(later, f"tried because {mode} failed")
                continue
            self.fixed = True
            self.notes[mode] = "ok"
            return call
        raise RuntimeError("no accelerated mode left")
