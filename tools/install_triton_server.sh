#!/usr/bin/env bash
# The real `tritonserver` used by tests/test_triton.py, for the active virtual environment.
#
# nvidia-pytriton's wheel carries a tritonserver binary with the Python backend. It pins numpy<2,
# so it is installed without its dependencies (only the binary is used; --no-warn-conflicts keeps
# pip from reporting the deliberately missing ones as an ERROR), and the Python-backend
# stub gets numpy 1.26 in a separate folder (the stub mis-reads tensors under numpy 2; see
# tests/test_triton.py). Run inside the venv: bash tools/install_triton_server.sh
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python -m pip install -q --no-warn-conflicts -c "$here/constraints.txt" --no-deps nvidia-pytriton
python -m pip install -q --no-warn-conflicts --target "$(python -c 'import sys; print(sys.prefix)')/triton-stub-site" "numpy==1.26.4"
