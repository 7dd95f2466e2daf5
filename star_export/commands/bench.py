"""``bench``: pruned vs unpruned latency next to the cost model; its flags, help text and runner are
the bench package's own (:mod:`star_export.bench.cli`, shared with ``bench/run.py``)."""

from __future__ import annotations

from star_export.bench import DESCRIPTION, EPILOG
from star_export.bench import add_bench_arguments as add_arguments
from star_export.bench import run_bench_cli as run

NAME = "bench"
HELP = "measure prefill latency and decode tokens/s, pruned vs unpruned, next to the cost model"

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "NAME", "add_arguments", "run"]
