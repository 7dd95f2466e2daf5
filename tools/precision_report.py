"""fp16 / bf16 against fp32 on the tiny recipes: a thin script over ``star_export.bench.precision`` (its docstring has the details).

python tools/precision_report.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # star_export from this checkout

from star_export.bench.precision import main

if __name__ == "__main__":
    sys.exit(main())
