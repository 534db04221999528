#!/usr/bin/env bash
# One short GPU check (at most ~8 minutes): the GPU-marked tests, then the sensitivity benchmark on a
# ~1B-parameter synthetic Llama in bf16, with tokens/s and achieved TFLOP/s (6 x params x tokens/s)
# against the card's bf16 peak. Exits 0 with a message where no CUDA GPU exists.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to do"
  exit 0
fi
"$PY" - <<'PY'
import torch
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
timeout 180 "$PY" -m pytest -q -m gpu tests || echo "gpu tests: exit $?"
# ~1.1B params: hidden 2048, 20 layers, vocab 32000; 16 samples x 512 tokens
timeout 300 "$PY" bench/sensitivity.py --hidden 2048 --layers 20 --seq 512 --samples 16 --device cuda \
  --dtype bfloat16 | tee /tmp/pkt_gpu_bench.txt
"$PY" - <<'PY'
import re, torch
text = open("/tmp/pkt_gpu_bench.txt").read()
params = float(re.search(r"([\d.]+)M params", text).group(1)) * 1e6
tps = float(re.search(r"pkt\s+(\d+) tokens/s", text).group(1))
name = torch.cuda.get_device_name(0)
peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
card = next((v for k, v in peak.items() if k in name), None)
achieved = 6 * params * tps
print(f"achieved {achieved / 1e12:.1f} TFLOP/s (6 x params x tokens/s)"
      + (f" = {achieved / card:.1%} of {name}'s dense bf16 peak {card / 1e12:.0f} TFLOP/s" if card else ""))
PY
