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


def test_checkpoints_of_one_run_are_that_run_at_those_steps():
    """The adapter kept at step k of a run equals the factors the same run holds after k steps (read by
    stopping a twin run there), and a run of `steps` takes exactly that many optimizer steps."""
    from peft import get_peft_model

    def model():
        _, student = _pair()
        torch.manual_seed(0)
        return get_peft_model(student, lora_init.lora_config(["q", "v"], 2, 2.0, 0.0))

    params = finetune.TrainParams(lr=1e-2, steps=5, checkpoints=(2, 5), batch_size=4, micro_batch=4, seed=1)
    m, kept = model(), {}
    log = finetune.finetune(m, random_samples(8), params, pad_id=0, progress=False,
                            on_checkpoint=lambda s: kept.__setitem__(s, {k: v.clone() for k, v in
                                                                         get_peft_model_state_dict(m).items()}))
    assert log.steps == 5 and sorted(kept) == [2, 5]
    assert all(torch.equal(kept[5][k], v) for k, v in get_peft_model_state_dict(m).items())
    assert any(not torch.equal(kept[2][k], kept[5][k]) for k in kept[2])
    # the twin: the same run's loop stopped after 2 steps (its schedule is still the 5-step one's)
    twin, stopped = model(), {}

    class Stop(Exception):
        pass

    def stop(s):
        stopped.update({k: v.clone() for k, v in get_peft_model_state_dict(twin).items()})
        raise Stop

    try:
        finetune.finetune(twin, random_samples(8), finetune.TrainParams(**{**params.__dict__, "checkpoints": (2,)}),
                          pad_id=0, progress=False, on_checkpoint=stop)
    except Stop:
        pass
    assert all(torch.equal(kept[2][k], stopped[k]) for k in stopped)


def test_new_train_fields_leave_old_keys_alone():
    assert finetune.TrainParams().as_dict().keys() == {f for f in finetune.TrainParams.__dataclass_fields__} - {
        "steps", "checkpoints"}
    d = finetune.TrainParams(steps=8, checkpoints=(4, 8)).as_dict()
    assert d["steps"] == 8 and d["checkpoints"] == [4, 8]
    assert finetune.TrainParams.from_dict(d) == finetune.TrainParams(steps=8, checkpoints=(4, 8))
