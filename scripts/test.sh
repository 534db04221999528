#!/usr/bin/env bash
# The test command: installs what it needs, then runs the default (fast) test suite and the slow
# tests marked `ci` (the wheel installed into a throwaway venv, the server's slow start, signals).
# Extra arguments go to pytest instead, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q
exec python -m pytest -q -m ci
