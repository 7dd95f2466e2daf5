#!/usr/bin/env python
"""STAR's prefill speedup at LLaVA-1.5-7B scale on one CUDA GPU, measured (issue #16): the command
line of ``star_export.bench.gpu`` (what it measures, its phases, its outputs and its time: that
package's docstring). Needs only PyTorch and transformers (plus numpy; matplotlib for the plot).

    python tools/gpu_bench.py --device cuda --out gpu_bench_out        # on the GPU host
    python tools/gpu_bench.py --device cpu --tiny --out /tmp/gb        # the same script, tiny, on CPU

Exit 0 when the run finished and parity passed, 1 when a parity row failed, 2 for a bad flag (one
line), 3 when the device is missing (one line).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # star_export from this tree

from star_export.bench.gpu.run import main

if __name__ == "__main__":
    sys.exit(main())
