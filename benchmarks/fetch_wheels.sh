#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels benchmarks/gpu_check.sh installs on a GPU
# machine without network: the packages jas-prune needs that a typical CUDA image lacks
# (torch-pruning, pydantic and its helpers), for CPython 3.12 on x86-64 Linux. They land in .whl/
# (git-ignored); carry that folder next to the checkout.
#
#   bash benchmarks/fetch_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${platforms[@]}" -d .whl \
  "torch-pruning==1.6.1" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types>=0.6" "typing-inspection>=0.4"
ls -1 .whl
