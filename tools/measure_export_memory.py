"""Export memory and disk at 7B widths: a thin script over ``star_export.bench.memory`` (its docstring has the details).

python tools/measure_export_memory.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # star_export from this checkout

from star_export.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
