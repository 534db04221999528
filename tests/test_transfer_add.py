"""transfer-add: the extracted piece added to the student (not subtracted), then the same LoRA training."""
import pytest
import torch
from peft import PeftModel

from conftest import random_samples
from pkt.core import finetune, lora_init
from test_core_method import _extract, _pair


def _init(tmp_path, teacher, student, scale, rank=4, alpha=8):
    state = lora_init.init_state_dict(_extract(teacher, student), student.config, rank, alpha=alpha, scale=scale)
    return lora_init.save_adapter(tmp_path / f"init-{scale}", state, student.config, rank, alpha)


def _params(**kw):
    return finetune.TrainParams(rank=4, alpha=8, dropout=0.0, lr=1e-2, batch_size=8, micro_batch=4, seed=3, **kw)


def test_at_scale_zero_it_is_loras_step_zero(tmp_path):
    teacher, student = _pair()
    _, twin = _pair()
    init = _init(tmp_path, teacher, student, scale=0.0)
    added, _, _ = finetune.peft_model(student, _params(), "added", init)
    lora, _, _ = finetune.peft_model(twin, _params(), "lora")
    a, b = added.state_dict(), lora.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights, LoRA factors included


@pytest.mark.slow  # trains twice; ~45 s on 2 cores under a load of 20-30
@pytest.mark.ci
def test_the_piece_is_added_and_the_folded_adapter_is_the_trained_function(tmp_path):
    teacher, student = _pair()
    original = {k: v.clone() for k, v in student.state_dict().items()}
    init = _init(tmp_path, teacher, student, scale=1.0)
    ids = torch.randint(3, 64, (2, 10))
    before = student(ids).logits.detach().clone()
    with_piece = PeftModel.from_pretrained(_pair()[1], str(init)).eval()  # stock peft: W + (alpha/r) B A
    expected = with_piece(ids).logits.detach()
    assert not torch.allclose(before, expected, atol=1e-3)  # the piece moves the function
    model, _, _ = finetune.peft_model(student, _params(), "added", init)
    assert torch.allclose(model.eval()(ids).logits, expected, atol=1e-5)  # step 0 = student + piece

    samples = random_samples(16, seed=3)
    result = finetune.train_adapter(_pair()[1], samples, _params(epochs=3), 0, "added", init, progress=False)
    fresh = _pair()[1]
    fresh.load_state_dict(original)
    lora_init.save_adapter(tmp_path / "adapter", result.state, fresh.config, result.rank, result.alpha)
    stock = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    retrained, _, _ = finetune.peft_model(_pair()[1], _params(epochs=3), "added", init)
    finetune.finetune(retrained, samples, _params(epochs=3), 0, progress=False)
    assert torch.allclose(stock(ids).logits, retrained.eval()(ids).logits, atol=1e-4)
    assert result.init_size["top_sv"] > 0
