#!/usr/bin/env bash
# The GPU check of jas-prune, for a person with one CUDA GPU (about 8 minutes on an H100):
#
#   bash benchmarks/gpu_check.sh OUT_DIR                      # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --device cpu --dry-run   # rehearsal on any CPU (CI-sized)
#
# No network is needed: packages the machine lacks (torch-pruning, pydantic and its helpers) are
# installed from the wheels in .whl/ (see docs/gpu.md "GPU check"), the project itself from this
# checkout without dependencies. Everything lands in OUT_DIR:
#   gpu_check.json / gpu_check.md   builtin paths on the device vs CPU; exact-JAS images/s on ViT-B/16
#                                   in fp32 / TF32 / bf16 (picks vs fp32, peak memory, internal_batch_size)
#   pytest-cuda.log                 the test suite's CUDA-marked tests
#   quickstart/ , quickstart.log    recipes/quickstart.yaml end to end on the device
#   environment.txt                 versions, GPU, what ran where
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR [--device cuda|cpu] [--dry-run]}
shift
DEVICE=cuda
DRY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --dry-run) DRY=(--dry-run); shift ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"

# carried wheels, only where the packages are missing: installed without network or dependencies
if ! "$PY" -c "import torch_pruning, pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/jas-prune-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/jas-prune-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the project itself, without its pinned dependencies
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u +%FT%TZ)"; echo "device: $DEVICE ${DRY[*]:-}"
  "$PY" -c "import torch, timm, onnxruntime as ort, torch_pruning as tp, pydantic; print('python', __import__('sys').version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print('timm', timm.__version__, 'onnxruntime', ort.__version__, ort.get_available_providers()); print('torch-pruning', tp.__version__, 'pydantic', pydantic.VERSION)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
status=0

echo "== 1/3 measurements"
"$PY" benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT" "${DRY[@]}" 2>&1 | tee "$OUT/gpu_check.log" || status=1

echo "== 2/3 CUDA-marked tests"
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/pytest-cuda.log" 2>&1
rc=$?
tail -3 "$OUT/pytest-cuda.log"
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=1   # 5: none collected (all deselected) is not a failure here

echo "== 3/3 quickstart end to end on $DEVICE"
QS=(--set runtime.device="$DEVICE")
if [ ${#DRY[@]} -gt 0 ]; then
  QS+=(--set data.images_per_class=2 --set attribution.steps=2 --set prune.methods=[jas,magnitude]
       --set evaluate.intervention=false --set evaluate.protocols=[structured] --set export=null)
fi
"$PY" -m jas_prune recipe run recipes/quickstart.yaml --out "$OUT/quickstart" "${QS[@]}" > "$OUT/quickstart.log" 2>&1 || status=1
tail -2 "$OUT/quickstart.log"
echo "gpu_check: done (status $status); results in $OUT"
exit $status
