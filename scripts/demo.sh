#!/usr/bin/env bash
# The main job on the embedded defaults: builds (or reuses) the miniature family and runs the demo sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec pkt demo "$@"
