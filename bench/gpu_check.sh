#!/usr/bin/env bash
# The GPU path in one short check (under 8 minutes on one GPU): the GPU-marked tests, then
# bench/gpu_pipeline.py: `pkt extract` on a ~1B synthetic Llama pair in bf16 (sensitivity, extraction,
# the exact LoRA init), 300 LoRA steps and an evaluation, with each node's seconds, peak GPU memory and
# achieved TFLOP/s against the card's dense bf16 peak. Where no CUDA GPU exists it says so in one
# sentence and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False), so there is nothing to check."
  exit 0
fi
"$PY" - <<'PY'
import torch
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
timeout 120 "$PY" -m pytest -q -m gpu tests || echo "gpu tests: exit $?"
timeout 360 "$PY" bench/gpu_pipeline.py --device cuda
rc=$?
[ $rc -eq 0 ] || echo "gpu_pipeline: exit $rc (124: past its 6-minute limit)"
exit $rc
