"""Function-preserving growth (pkt_core/grow.py): the grown model computes the student's function at
the expansion step, on Llama and Qwen2 (biases), grouped-query attention included."""
import pytest
import torch

from pkt.core import grow
from tests.conftest import tiny_config, tiny_model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("m, layers, kv", [(2, 5, 2), (3, 2, 1), (1, 4, 2)])
def test_grown_teacher_computes_the_students_logits(model_type, m, layers, kv):
    student = tiny_model(model_type=model_type, layers=2, hidden=32, intermediate=48, heads=4, kv_heads=kv, seed=3)
    with torch.no_grad():  # non-trivial biases and norm gains, so a wrong tiling of them shows
        for name, p in student.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    cfg = tiny_config(model_type, layers=layers, hidden=32 * m, intermediate=48 * m, heads=4 * m, kv_heads=kv * m,
                      head_dim=8)
    teacher = grow.grow(student, cfg)
    assert teacher.config.num_hidden_layers == layers and teacher.config.hidden_size == 32 * m
    ids = torch.randint(3, 64, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as the scorer batches
    with torch.no_grad():
        want = student(input_ids=ids, attention_mask=mask).logits
        got = teacher(input_ids=ids, attention_mask=mask).logits
    assert want.abs().max() > 1.0  # logits of a real spread, not a zero function
    assert (got - want).abs().max() <= 1e-4
    # the grown model is a different model: wider weights, and the copies' output projections are zero
    if layers > 2:
        copy = next(j for j, (_, c) in enumerate(grow.layer_plan(2, layers)) if c)
        assert teacher.model.layers[copy].self_attn.o_proj.weight.abs().max() == 0
        assert teacher.model.layers[copy].self_attn.q_proj.weight.abs().max() > 0


def test_growth_refuses_a_config_that_is_not_a_whole_multiple():
    student = tiny_model(layers=2, hidden=32, intermediate=48, heads=4)
    with pytest.raises(grow.NotAGrowth, match="intermediate_size 100 \\(needs 96\\)"):
        grow.grow(student, tiny_config(layers=2, hidden=64, intermediate=100, heads=8, head_dim=8))
    with pytest.raises(grow.NotAGrowth, match="num_attention_heads 4 \\(needs 8\\)"):
        grow.grow(student, tiny_config(layers=2, hidden=64, intermediate=96, heads=4))
    with pytest.raises(grow.NotAGrowth, match="tie_word_embeddings"):
        grow.grow(student, tiny_config(layers=2, hidden=64, intermediate=96, heads=8, head_dim=8, tie=True))


def test_layer_plan_keeps_the_students_layers_in_order_with_copies_after_them():
    assert grow.layer_plan(2, 6) == [(0, False), (0, True), (0, True), (1, False), (1, True), (1, True)]
    assert grow.layer_plan(2, 2) == [(0, False), (1, False)]
    assert grow.layer_plan(3, 4) == [(0, False), (1, False), (2, False), (2, True)]
