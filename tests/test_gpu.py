"""GPU path (run by bench/gpu_check.sh with -m gpu): bf16 weights, fp32 accumulators, on CUDA."""
import pytest
import torch

from conftest import random_samples, tiny_model
from pkt.core import align, lora_init, sensitivity

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_cuda_sensitivity_matches_fp32_cpu():
    cpu = tiny_model(hidden=64, intermediate=128)
    gpu = tiny_model(hidden=64, intermediate=128).to("cuda", torch.bfloat16)
    samples = random_samples(4)
    ref = sensitivity.compute_sensitivity(cpu, samples, progress=False)
    got = sensitivity.compute_sensitivity(gpu, [{k: v.cuda() for k, v in s.items()} for s in samples], progress=False)
    for name in ref:
        assert got[name].dtype == torch.float32 and got[name].device.type == "cuda"
        rel = (got[name].cpu() - ref[name]).norm() / ref[name].norm()
        assert rel < 0.05, (name, float(rel))


def test_window_search_and_svd_on_cuda_match_cpu():
    sens = torch.rand(300, 200)
    assert align.max_sum_window(sens.cuda(), 120, 90) == align.max_sum_window(sens, 120, 90)
    w = torch.randn(128, 96)
    b, a = lora_init.svd_factors(w.cuda(), 8)
    b_cpu, a_cpu = lora_init.svd_factors(w, 8)
    assert torch.allclose((b @ a).cpu(), b_cpu @ a_cpu, atol=1e-3)
