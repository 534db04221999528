"""Injection: training moves the adapter, lowers the loss, and the folded adapter loads in stock peft."""
import torch
from peft import PeftModel, get_peft_model_state_dict

from conftest import random_samples, tiny_model
from pkt.core import finetune, lora_init
from test_core_method import _init_dir, _pair


def test_training_from_the_transfer_init(tmp_path):
    teacher, student = _pair()
    original = {k: v.clone() for k, v in student.state_dict().items()}
    init_dir, _ = _init_dir(tmp_path, teacher, student, rank=4, alpha=4)
    model = lora_init.trainable_from_init(student, init_dir)
    init_state = {k: v.clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    samples = random_samples(16, seed=3)
    before = finetune.answer_loss(model, samples, pad_id=0).mean()
    params = finetune.TrainParams(rank=4, alpha=4, lr=1e-2, epochs=10, batch_size=8, micro_batch=4, seed=0)
    log = finetune.finetune(model, samples, params, pad_id=0, progress=False)
    after = finetune.answer_loss(model, samples, pad_id=0).mean()
    assert after < before and log.losses[-1] < log.losses[0]
    trained = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert any(not torch.equal(trained[k], init_state[k]) for k in trained)

    folded = lora_init.fold_init(trained, init_state)
    lora_init.save_adapter(tmp_path / "adapter", folded, student.config, 8, 8)
    fresh = tiny_model(seed=2, layers=2, hidden=32, intermediate=48, heads=4)
    fresh.load_state_dict(original)
    stock = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()  # no pkt code needed
    ids = samples[0]["input_ids"]
    assert torch.allclose(stock(ids).logits, model(ids).logits, atol=1e-4)


def test_training_is_deterministic_per_seed():
    def run(seed):
        _, student = _pair()
        from peft import get_peft_model

        model = get_peft_model(student, lora_init.lora_config(["q", "v"], 2, 2.0, 0.0))
        log = finetune.finetune(model, random_samples(8), finetune.TrainParams(lr=1e-2, epochs=2, batch_size=4,
                                                                               micro_batch=4, seed=seed),
                                pad_id=0, progress=False)
        return log.losses

    assert run(0) == run(0) and run(0) != run(1)
