import json
import os

import pkt.core  # noqa: F401  (before torch: its OMP_WAIT_POLICY, pkt_core/__init__.py)
import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

# Prefect binds its console log handler to sys.stderr when logging is first set up: do it now,
# before pytest's capsys swaps (and later closes) the stream of whichever test got there first
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()

FAMILIES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
}


def tiny_config(model_type="llama", layers=2, hidden=32, intermediate=48, heads=4, kv_heads=None, vocab=64,
                head_dim=None, tie=False):
    import transformers

    cls = getattr(transformers, FAMILIES[model_type])
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=128,
              tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if head_dim:
        kw["head_dim"] = head_dim
    return cls(**kw)


def tiny_model(seed=0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**kw), dtype=torch.float32)
    # random init gives near-zero logits; scale up so tests see real differences
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def random_samples(n, vocab=64, length=12, answer=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (1, length), generator=g)
        labels = ids.clone()
        labels[:, : length - answer] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Entering the Prefect API (the step before any flow) or starting a process fails the test: the input
    must be refused before any work."""
    import contextlib
    import subprocess

    from pkt.flows import server

    @contextlib.contextmanager
    def refuse():
        raise AssertionError("work started before the input was refused")
        yield

    monkeypatch.setattr(server, "prefect_api", refuse)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("started")))


@pytest.fixture
def tmp_store(tmp_path):
    return tmp_path / "store"


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    """Real Prefect runs against an isolated database, home and result storage."""
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect_home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "storage")
    with prefect_test_harness(server_startup_timeout=180):
        yield home


@pytest.fixture(scope="session")
def mini_family(tmp_path_factory):
    """The test-size miniature family, built once per session with pkt_core directly."""
    from pkt.core.mini.family import build_family

    root = tmp_path_factory.mktemp("family")
    stats = build_family(root, "test", log=lambda *_: None, progress=False)
    (root / "family_stats.json").write_text(json.dumps(stats))  # as the family node writes it
    return root
