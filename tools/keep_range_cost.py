"""What a keep range costs on llava-bench: a thin script over ``star_export.bench.keep_range`` (its
docstring has the details).

python tools/keep_range_cost.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # star_export from this checkout

from star_export.bench.keep_range import main

if __name__ == "__main__":
    sys.exit(main())
