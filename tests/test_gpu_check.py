"""bench/gpu_check.sh where no GPU exists (issue 20, item 4): one sentence, exit 0. Its GPU path is run by
hand on a lent GPU (bench/README.md)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this is the no-GPU path")
def test_gpu_check_without_a_gpu_says_so_in_one_sentence_and_exits_0():
    out = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and lines[0].endswith("."), out.stdout
    assert out.stderr == ""


def test_only_gpu_marked_tests_touch_cuda():
    """Nothing else in the suite needs a GPU: only the gpu-marked file names a CUDA device."""
    for path in (ROOT / "tests").glob("test_*.py"):
        text = path.read_text()
        if path.name == Path(__file__).name:
            continue
        if '"cuda"' in text or ".cuda()" in text:
            assert path.name == "test_gpu.py" and "pytest.mark.gpu" in text, path.name
