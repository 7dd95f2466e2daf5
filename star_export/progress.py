"""Progress lines for long steps: numbered stages and a heartbeat while one step is silent; the
libraries' own chatter silenced."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

Log = Callable[[str], None]


def quiet(_line: str) -> None:
    """A ``log`` that prints nothing (the Python API's default)."""


class Steps:
    """``[i/n] text`` lines and the time each stage took."""

    def __init__(self, total: int, log: Log):
        self.total, self.log, self.i = total, log, 0
        self.start = time.perf_counter()

    def step(self, text: str) -> float:
        self.i += 1
        self.log(f"[{self.i}/{self.total}] {text}")
        self.start = time.perf_counter()
        return self.start

    def done(self, text: str, since: float | None = None) -> None:
        self.log(f"      {text} ({time.perf_counter() - (since or self.start):.1f}s)")


@contextlib.contextmanager
def heartbeat(label: str, log: Log, every: float = 30.0) -> Iterator[None]:
    """Log a line every ``every`` seconds while a long step runs (a 7B export is silent for minutes)."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            log(f"      ... {label} ({time.perf_counter() - start:.0f}s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def quiet_libraries() -> None:
    """Silence the exporters' and transformers' chatter (warnings stay for real problems)."""
    for name in (
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
        "torch._export",
        "torch.export",
        "transformers",
        "onnxscript",
        "torch._dynamo",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
