"""LaTen (pkt_core/laten.py) against independent oracles: brute-force recomputation of the attribution
with the model's own forward, a hand-derived first translator step, and the exact support of an injection."""
import copy

import pytest
import torch

from conftest import tiny_model
from pkt.core import arch, laten


def _truncated(model, layer: int, keep_o: int | None = None, keep_down: int | None = None, zero_o=False,
               zero_down=False):
    """The model cut after `layer` (its output at the last position goes straight to the final norm),
    with that layer's o_proj / down_proj reduced to one column (or zeroed): the residual stream then
    holds exactly h_in (+ one attention channel's contribution) or h_mid (+ one FFN neuron's)."""
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[: layer + 1]
    m.config.num_hidden_layers = layer + 1
    blk = m.model.layers[layer]
    with torch.no_grad():
        for w, keep, zero in ((blk.self_attn.o_proj.weight, keep_o, zero_o),
                              (blk.mlp.down_proj.weight, keep_down, zero_down)):
            if keep is not None or zero:
                mask = torch.zeros_like(w)
                if keep is not None:
                    mask[:, keep] = 1
                w.mul_(mask)
    return m


def _final_hidden(model, ids):
    """The final norm's input at the last position: the residual stream the lens reads."""
    got = {}
    h = model.model.norm.register_forward_pre_hook(lambda mod, a: got.__setitem__("h", a[0][0, -1].double()))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    h.remove()
    return got["h"], logits


def _brute_ll(model, ids, target, norm, full_last):
    """Target log-prob of a (surgically reduced) model: its own logits for the rms lens, the authors'
    lens (gain / sqrt(std of the full model's last hidden)) on its last hidden otherwise, in fp64."""
    h, logits = _final_hidden(model, ids)
    if norm == "rms":
        return float(torch.log_softmax(logits, -1)[target])
    std = torch.sqrt(full_last.var(unbiased=False) + 1e-5)
    y = h / torch.sqrt(std + 1e-6) * model.model.norm.weight.double()
    return float(torch.log_softmax(model.lm_head.weight.detach().double() @ y.detach(), -1)[target])


@pytest.mark.parametrize("norm", ["rms", "authors"])
def test_attribution_equals_brute_force_recomputation(norm):
    """Every score of `attribute` (one hooked pass, lens chunked over vocabulary and neurons) equals
    the target log-prob recomputed by running the model with only that neuron's (or layer's)
    contribution kept, minus the same with it removed; GQA model (4 query heads, 2 kv heads)."""
    model = tiny_model(layers=3, kv_heads=2, vocab=64)
    ids, target = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(3)), 11
    attr = laten.attribute(model, ids, target, norm=norm, vocab_chunk=16, neuron_chunk=16)
    full_last, _ = _final_hidden(model, ids)
    ll = lambda m: _brute_ll(m, ids, target, norm, full_last)  # noqa: E731
    for layer in (0, 2):
        h_in = ll(_truncated(model, layer, zero_o=True, zero_down=True))
        h_mid = ll(_truncated(model, layer, zero_down=True))
        out = ll(_truncated(model, layer))
        assert attr["attn_layer"][layer] == pytest.approx(h_mid - h_in, abs=2e-5)
        assert attr["ffn_layer"][layer] == pytest.approx(out - h_mid, abs=2e-5)
        for j in (0, 47):  # FFN neurons: one neuron's contribution kept, against none of them
            kept = ll(_truncated(model, layer, keep_down=j))
            assert attr["ffn_neuron"][layer, j] == pytest.approx(kept - h_mid, abs=2e-5), (layer, j)
        for c in (9, 31):  # attention channels (o_proj input columns, query-head space)
            kept = ll(_truncated(model, layer, keep_o=c, zero_down=True))
            assert attr["attn_channel"][layer, c] == pytest.approx(kept - h_in, abs=2e-5), (layer, c)
    # with the model's own norm, the last layer's output is the model: the lens reads its log-prob
    if norm == "rms":
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)[target]
        assert out == pytest.approx(float(lp), abs=1e-9)


def test_attribution_is_chunk_independent_and_keeps_no_positions():
    model = tiny_model(layers=2, vocab=64)
    ids = torch.randint(3, 64, (1, 12))
    a = laten.attribute(model, ids, 5, vocab_chunk=64, neuron_chunk=64)
    b = laten.attribute(model, ids, 5, vocab_chunk=3, neuron_chunk=1)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=0)
    assert a["ffn_neuron"].shape == (2, 48) and a["attn_channel"].shape == (2, 32)


def test_target_strips_trailing_punctuation():
    from pkt.core.data import Sample
    from pkt.core.mini.tokenizer import build_tokenizer

    tok = build_tokenizer()
    ids, target = laten.target_example(Sample("Q: 2+2?\n", "So the answer is 4.", {}), tok)
    full = tok("Q: 2+2?\nSo the answer is 4")["input_ids"]
    assert ids[0].tolist() == full[:-1] and target == full[-1]
    with pytest.raises(laten.LatenError, match="only punctuation"):
        laten.target_example(Sample("Q", " .", {}), tok)


def _attr(model, seed):
    g = torch.Generator().manual_seed(seed)
    d = arch.dims(model.config)
    return {"attn_layer": torch.randn(d.layers, generator=g), "ffn_layer": torch.randn(d.layers, generator=g),
            "ffn_neuron": torch.randn(d.layers, d.intermediate, generator=g),
            "attn_channel": torch.randn(d.layers, d.q_width, generator=g)}


def test_locate_pairs_top_layers_in_depth_order():
    t = {"attn_layer": torch.tensor([0.5, -1.0, 2.0]), "ffn_layer": torch.tensor([3.0, 1.0, 2.0]),
         "ffn_neuron": torch.tensor([[0.0, 5, 1, 2], [1, 1, 1, 1], [9, 0, 0, 8]]),
         "attn_channel": torch.tensor([[3.0, 1], [0, 1], [1, 0]])}
    s = {"attn_layer": torch.tensor([1.0, 0.0]), "ffn_layer": torch.tensor([0.0, 1.0]),
         "ffn_neuron": torch.tensor([[1.0, 0, 3, 2], [0, 7, 6, 0]]), "attn_channel": torch.tensor([[0.0, 1], [1, 0]])}
    pairs = laten.locate(t, s, {"ffn": 2, "attn": 1}, ("up", "o"))
    got = [(p.module, p.t_layer, p.s_layer, p.t_idx.tolist(), p.s_idx.tolist()) for p in pairs]
    # FFN: teacher layers 0 and 2 (scores 3, 2), attention: 0 and 2 (0.5, 2.0), paired in depth order
    assert got == [("up", 0, 0, [1, 3], [2, 3]), ("up", 2, 1, [0, 3], [1, 2]),
                   ("o", 0, 0, [0], [1]), ("o", 2, 1, [0], [0])]


def _toy_pair(teacher_kv=2):
    teacher = tiny_model(seed=1, layers=2, hidden=32, intermediate=48, heads=4, kv_heads=teacher_kv)
    student = tiny_model(seed=2, layers=1, hidden=16, intermediate=24, heads=2, kv_heads=2)
    return teacher, student


def test_translator_first_step_matches_hand_derived_gradient():
    """The first optimizer step of train_translator, against the chain rule written out by hand:
    dL/dY from the student's own weight gradient at W + delta (plain autograd on the student's
    parameters, no translator in the graph) plus the size penalty's 2*w*n*Y/numel; then
    dL/dW2 = G^T relu(X W1^T), dL/dW1 = ((G W2) * 1[X W1^T > 0])^T X; then AdamW's first step."""
    from conftest import random_samples

    teacher, student = _toy_pair()
    params = laten.LatenParams(rate=0.25, modules=("up", "down"), align_per_step=2, seed=4, mse_weight=1000.0)
    samples = random_samples(4, vocab=64, seed=1)
    ex = {"encoded": samples[3], "t_attr": _attr(teacher, 0), "s_attr": _attr(student, 1)}
    align = samples[:3]
    states = {}
    laten.train_translator(teacher.state_dict(), teacher.config, copy.deepcopy(student), [ex], align, params,
                           on_step=lambda k, s: states.__setitem__(k, s), progress=False)

    tr0 = laten.Translator(params.modules, 32, 16, params.seed)  # the same init, drawn again
    k = laten.counts(student.config, params.rate)
    pairs = laten.locate(ex["t_attr"], ex["s_attr"], k, params.modules)
    vectors = laten.teacher_vectors(teacher.state_dict(), teacher.config, pairs)
    batch = [align[i] for i in laten.align_batch(len(align), 2, params.seed, 0)] + [samples[3]]
    with torch.no_grad():
        rows = tr0(pairs, vectors)
    # the student's own gradient at W + delta, summed over the batch
    s2 = copy.deepcopy(student)
    with torch.no_grad():
        delta = laten.make_delta(tr0, pairs, vectors, student.config)
        laten.apply_delta(s2, delta)
    s2.zero_grad()
    for b in batch:
        logits = s2(input_ids=b["input_ids"]).logits.float()
        torch.nn.functional.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=-100).backward()
    grads = dict(s2.named_parameters())
    expected = {}
    for m in params.modules:
        (p,), x, y = [p for p in pairs if p.module == m], None, None
        i = [q.module for q in pairs].index(m)
        x, y = vectors[i].double(), rows[i].double()
        w = grads[arch.weight_name(student.config, m, p.s_layer)].grad.double()
        g_y = w[p.s_idx] if m == "up" else w[:, p.s_idx].T  # dCE/dY: the student's gradient on those rows
        g_y = g_y + len(batch) * params.mse_weight * 2 * y / y.numel()
        w1, w2 = tr0.net[m][0].weight.double(), tr0.net[m][2].weight.double()
        pre = x @ w1.T
        g_w2 = g_y.T @ pre.clamp_min(0)
        g_w1 = ((g_y @ w2) * (pre > 0)).T @ x
        lr0 = params.lr / params.div_factor  # OneCycle starts at max_lr / div_factor
        for name, w0, g in ((f"net.{m}.0.weight", w1, g_w1), (f"net.{m}.2.weight", w2, g_w2)):
            # AdamW, first step: decay, then m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps)
            expected[name] = w0 * (1 - lr0 * params.weight_decay) - lr0 * g / (g.abs() + 1e-8)
            expected[name + ":grad"] = g
    lr0 = params.lr / params.div_factor
    for name, w in states[1].items():  # a step moves each weight by about lr0: agree to 1e-4 of that
        torch.testing.assert_close(w.double(), expected[name], atol=1e-4 * lr0, rtol=0)
        assert (w.double() - tr0.state_dict()[name].double()).abs().max() > 0.5 * lr0
    # and the gradient itself (the Adam step above is nearly sign(g)): translator_loss's autograd
    tr1 = laten.Translator(params.modules, 32, 16, params.seed)
    loss, _ = laten.translator_loss(student, tr1, pairs, vectors, batch, params.mse_weight)
    loss.backward()
    for n, p in tr1.named_parameters():
        g = expected[n + ":grad"]  # fp32 student gradients: agree to 1e-5 of the largest entry
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def _student_and_delta(control="translated", modules=("up", "down", "o")):
    teacher, student = _toy_pair(teacher_kv=2 if "v" not in modules else 4)
    laten.check_modules(modules, teacher.config, student.config)
    pairs = laten.locate(_attr(teacher, 0), _attr(student, 1), laten.counts(student.config, 0.25), modules)
    vectors = laten.teacher_vectors(teacher.state_dict(), teacher.config, pairs)
    tr = laten.Translator(modules, 32, 16, seed=0, init_std=0.3)  # large enough to be representable in fp32
    return student, pairs, laten.make_delta(tr, pairs, vectors, student.config, control, draw_seed=5)


@pytest.mark.parametrize("modules", [("up", "down", "o"), ("up", "down", "v", "o")])
def test_injection_changes_exactly_the_selected_rows_and_columns(modules):
    """GQA teacher with o_proj only on the attention side (the authors' port), and a pair without
    GQA where v_proj rows are injected too."""
    student, pairs, delta = _student_and_delta(modules=modules)
    before = {n: t.clone() for n, t in student.state_dict().items()}
    laten.apply_delta(student, delta)
    after = student.state_dict()
    expected = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in before.items()}
    for p in pairs:
        name = arch.weight_name(student.config, p.module, p.s_layer)
        if laten.MODULES[p.module][1] == 0:
            expected[name][p.s_idx] = True
        else:
            expected[name][:, p.s_idx] = True
    assert sum(int(m.sum()) for m in expected.values()) > 0
    for n in before:
        changed = after[n] != before[n]
        assert torch.equal(changed, expected[n]), n  # every selected entry moved, nothing else did
    # and the change is the translated rows, added
    name = arch.weight_name(student.config, "down", pairs[0].s_layer)
    torch.testing.assert_close(after[name][:, delta[f"{name}.idx"]] - before[name][:, delta[f"{name}.idx"]],
                               delta[f"{name}.rows"].T)


def test_injection_survives_save_and_reload(tmp_path):
    """The authors' script saves the student unchanged (the delta lives in a plain attribute): here a
    saved, reloaded model carries the update."""
    from transformers import AutoModelForCausalLM

    student, _, delta = _student_and_delta()
    before = {n: t.clone() for n, t in student.state_dict().items()}
    laten.apply_delta(student, delta).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert any(not torch.equal(reloaded[n], before[n]) for n in before)
    for n, t in student.state_dict().items():
        assert torch.equal(reloaded[n], t), n


def test_controls_zero_and_norm_matched_random():
    student, _, real = _student_and_delta("translated")
    _, _, zero = _student_and_delta("zero")
    _, _, rand = _student_and_delta("random")
    for name in laten.delta_weights(real):
        assert torch.equal(zero[f"{name}.idx"], real[f"{name}.idx"]) and not zero[f"{name}.rows"].any()
        assert torch.equal(rand[f"{name}.idx"], real[f"{name}.idx"])
        torch.testing.assert_close(rand[f"{name}.rows"].norm(dim=1), real[f"{name}.rows"].norm(dim=1))
        assert not torch.allclose(rand[f"{name}.rows"], real[f"{name}.rows"])
    before = {n: t.clone() for n, t in student.state_dict().items()}
    laten.apply_delta(student, zero)
    assert all(torch.equal(before[n], t) for n, t in student.state_dict().items())


def test_v_module_refused_for_gqa():
    teacher, student = _toy_pair()  # the teacher has 4 query heads and 2 kv heads
    with pytest.raises(laten.LatenError, match="grouped-query"):
        laten.check_modules(("up", "v"), teacher.config, student.config)


def test_splits_disjoint_and_from_train_only():
    ex, al, pool = laten.splits(50, 5, 10, seed=1)
    assert len(set(ex) | set(al) | set(pool)) == 50 and len(ex) == 5 and len(al) == 10
    assert laten.splits(50, 5, 10, seed=1) == (ex, al, pool)
    assert laten.seed_sample(pool, 0) in pool
    with pytest.raises(laten.LatenError, match="training file has 15"):
        laten.splits(15, 5, 10)


@pytest.mark.parametrize("steps", [10, 20, 7])
def test_the_one_cycle_schedule_runs_at_every_length_and_keeps_its_shape(steps):
    """10 translator steps at 10% warm-up made torch's OneCycleLR divide by zero (the study's grid has
    10): the schedule runs, peaks at lr on step pct_start x steps - 1 (torch's convention: step 0 here),
    anneals and ends at the final lr; where torch's own schedule runs (20, 7 steps), it is torch's,
    value for value."""
    params = laten.LatenParams()
    lrs = []
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=params.lr)
    sched = laten.one_cycle(opt, params, steps)
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step() if len(lrs) < steps else None
    peak = max(0, round(params.pct_start * steps) - 1)
    assert lrs.index(max(lrs)) == peak
    if params.pct_start * steps >= 1:  # below one warm-up step torch starts part-way down the anneal
        assert max(lrs) == pytest.approx(params.lr, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] == pytest.approx(params.lr / params.div_factor / params.final_div_factor)
    if params.pct_start * steps != 1:
        ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=params.lr)
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=params.lr, total_steps=steps,
                                                  pct_start=params.pct_start, anneal_strategy="cos",
                                                  div_factor=params.div_factor,
                                                  final_div_factor=params.final_div_factor)
        expected = []
        for _ in range(steps):
            expected.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step() if len(expected) < steps else None
        assert lrs == expected
