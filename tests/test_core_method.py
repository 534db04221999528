"""The method against independent oracles, on tiny random Llama/Mistral/Qwen2 models."""
import pytest
import torch

from conftest import random_samples, tiny_config, tiny_model
from pkt.core import activations, align, arch, lora_init, sensitivity


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_sensitivity_equals_naive_per_sample_autograd(model_type):
    model = tiny_model(model_type=model_type, kv_heads=2)
    samples = random_samples(3)
    got = sensitivity.compute_sensitivity(model, samples, progress=False)

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for s in samples:
        model.zero_grad()
        model(**s).loss.backward()
        for n, p in model.named_parameters():
            expected[n] += (p * p.grad).abs()
    assert got.keys() == expected.keys()
    for n in got:
        assert torch.allclose(got[n], expected[n], rtol=1e-5, atol=1e-7), n


def test_sensitivity_leaves_no_gradients_and_restores_flags():
    model = tiny_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    sensitivity.compute_sensitivity(model, random_samples(2), progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert model.model.embed_tokens.weight.requires_grad is False


def test_sensitivity_refuses_a_teacher_with_offloaded_weights(tmp_path):
    """device_map='auto' may offload what does not fit; those weights get no gradient, so their
    sensitivity would silently read zero: refuse, naming a parameter and the fix."""
    from transformers import AutoModelForCausalLM

    tiny_model(layers=2).save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload"))
    with pytest.raises(ValueError, match=r"offloaded \(e\.g\. model\.layers\.1\."):
        sensitivity.compute_sensitivity(model, random_samples(1), progress=False)


def test_layer_totals_sum_each_layer():
    model = tiny_model(layers=3)
    sens = sensitivity.compute_sensitivity(model, random_samples(2), progress=False)
    totals = sensitivity.layer_totals(sens, model.config)
    assert totals.shape == (3,)
    manual = sum(float(t.sum()) for n, t in sens.items() if n.startswith("model.layers.1."))
    assert totals[1].item() == pytest.approx(manual, rel=1e-6)


@pytest.mark.parametrize("shape,rank", [((20, 12), 4), ((12, 20), 12), ((16, 16), 1)])
def test_svd_factors_eckart_young(shape, rank):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(w)
    for split in lora_init.SPLITS:
        b, a = lora_init.svd_factors(w, rank, split)
        assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1])
        err = torch.linalg.norm(w - b @ a) ** 2
        assert err.item() == pytest.approx(float((s[rank:] ** 2).sum()), abs=1e-4)
    b, a = lora_init.svd_factors(w, rank)
    assert torch.allclose(a @ a.T, torch.eye(rank), atol=1e-5)  # paper split: A orthonormal rows


def test_rank_above_matrix_size_is_an_error():
    with pytest.raises(lora_init.RankTooLarge, match="choose a rank of at most 4"):
        lora_init.svd_factors(torch.randn(4, 6), 5)


def test_arch_shapes_match_real_models_with_gqa():
    for model_type in ("llama", "mistral", "qwen2"):
        model = tiny_model(model_type=model_type, kv_heads=2, head_dim=16)
        d = arch.dims(model.config)
        params = dict(model.named_parameters())
        for name, (module, _) in arch.transferable_weights(model.config).items():
            assert tuple(params[name].shape) == arch.module_shape(d, module), name


def test_unknown_architecture_lists_supported():
    cfg = tiny_config()
    cfg.model_type = "gpt2"
    with pytest.raises(arch.UnsupportedArchitecture, match="supported: .*llama"):
        arch.dims(cfg)


def _pair(teacher_kw=None, student_kw=None):
    teacher = tiny_model(seed=1, **{"layers": 4, "hidden": 48, "intermediate": 64, "heads": 4, **(teacher_kw or {})})
    student = tiny_model(seed=2, **{"layers": 2, "hidden": 32, "intermediate": 48, "heads": 4, **(student_kw or {})})
    return teacher, student


def _extract(teacher, student, reducer="submatrix"):
    sens = sensitivity.compute_sensitivity(teacher, random_samples(2), progress=False)
    plan = align.select_layers(sensitivity.layer_totals(sens, teacher.config), student.config.num_hidden_layers)
    stats = activations.activation_stats(teacher, random_samples(2), progress=False) \
        if align.REDUCER_READS[reducer] == "activations" else None
    return align.extract(teacher.config, student.config, dict(teacher.named_parameters()), sens, plan,
                         reducer=reducer, activations=stats)


@pytest.mark.parametrize("reducer", align.REDUCERS)
def test_extract_gives_student_shapes(reducer):
    teacher, student = _pair()
    got = _extract(teacher, student, reducer)
    params = dict(student.named_parameters())
    assert got.keys() == arch.transferable_weights(student.config).keys()
    for name, t in got.items():
        assert t.shape == params[name].shape


def test_extract_submatrix_is_the_max_window_of_the_teacher():
    teacher, student = _pair()
    sens = sensitivity.compute_sensitivity(teacher, random_samples(2), progress=False)
    got = align.extract(teacher.config, student.config, dict(teacher.named_parameters()), sens, [1, 3])
    name_t = "model.layers.3.mlp.down_proj.weight"
    r, c = align.max_sum_window(sens[name_t], 32, 48)
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], teacher.state_dict()[name_t][r:r + 32, c:c + 48])


def test_gqa_teacher_to_mha_student_repeats_kv_heads():
    teacher, student = _pair(teacher_kw={"kv_heads": 2, "hidden": 64, "heads": 8}, student_kw={"hidden": 32, "heads": 4})
    got = _extract(teacher, student)
    assert got["model.layers.0.self_attn.k_proj.weight"].shape == (32, 32)


@pytest.mark.parametrize("teacher_kw,student_kw,match", [
    ({"layers": 1}, {}, "at least as deep"),
    ({"hidden": 24}, {}, "narrower"),
    ({"vocab": 80}, {}, "embedding tables differ in size"),
])
def test_incompatible_pairs_are_clear_errors(teacher_kw, student_kw, match):
    teacher, student = _pair(teacher_kw, student_kw)
    sens = {n: torch.ones_like(p) for n, p in teacher.named_parameters()}
    with pytest.raises(align.ShapeMismatch, match=match):
        align.extract(teacher.config, student.config, dict(teacher.named_parameters()), sens, [0, 0])


def _init_dir(tmp_path, teacher, student, rank=4, alpha=8):
    extracted = _extract(teacher, student)
    state = lora_init.init_state_dict(extracted, student.config, rank, alpha=alpha)
    return lora_init.save_adapter(tmp_path / "init", state, student.config, rank, alpha), extracted


@pytest.mark.parametrize("student_type", ["llama", "qwen2"])
def test_delta_step_keeps_the_student_function(tmp_path, student_type):
    teacher, student = _pair(teacher_kw={"model_type": student_type}, student_kw={"model_type": student_type})
    init, _ = _init_dir(tmp_path, teacher, student)
    ids = torch.randint(3, 64, (2, 10))
    before = student(ids).logits.detach().clone()
    model = lora_init.trainable_from_init(student, init)
    model.eval()
    after = model(ids).logits.detach()
    assert torch.allclose(before, after, atol=1e-5)
    # and the adapter is really there: without the delta step the function moves
    with model.disable_adapter():
        assert not torch.allclose(before, model(ids).logits.detach(), atol=1e-3)


def test_init_adapter_loads_in_stock_peft_with_all_keys(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    teacher, student = _pair()
    init, extracted = _init_dir(tmp_path, teacher, student)
    saved = load_file(str(init / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(student, str(init))  # stock peft, no pkt code
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora_params) == len(saved) == 2 * len(extracted)
    for key, tensor in saved.items():
        loaded_name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight").replace(
            "lora_embedding_A", "lora_embedding_A.default").replace("lora_embedding_B", "lora_embedding_B.default")
        assert torch.equal(lora_params[loaded_name], tensor), key
    # B @ A (scaled) is the best rank-4 approximation of each extracted matrix
    emb = model.base_model.model.model.embed_tokens
    delta = emb.get_delta_weight("default")
    best = lora_init.svd_factors(extracted["model.embed_tokens.weight"], 4)
    assert torch.allclose(delta, best[0] @ best[1], atol=1e-4)  # alpha/r = 2 is divided out


def test_fold_init_gives_trained_function_on_unmodified_student(tmp_path):
    from peft import PeftModel

    teacher, student = _pair()
    init, _ = _init_dir(tmp_path, teacher, student)
    ids = torch.randint(3, 64, (2, 10))
    original = {k: v.clone() for k, v in student.state_dict().items()}
    model = lora_init.trainable_from_init(student, init)
    with torch.no_grad():  # pretend training moved every factor
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    trained_logits = model(ids).logits.detach()
    from peft import get_peft_model_state_dict

    cfg, init_state = lora_init.read_adapter(init)
    folded = lora_init.fold_init(get_peft_model_state_dict(model, save_embedding_layers=False), init_state)
    lora_init.save_adapter(tmp_path / "folded", folded, student.config, 2 * cfg["r"], 2 * cfg["lora_alpha"])

    fresh = tiny_model(seed=2, layers=2, hidden=32, intermediate=48, heads=4)
    fresh.load_state_dict(original)
    stock = PeftModel.from_pretrained(fresh, str(tmp_path / "folded")).eval()
    assert torch.allclose(stock(ids).logits, trained_logits, atol=1e-4)


def test_lowrank_svd_recovers_a_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 6, generator=g) @ torch.randn(6, 150, generator=g)
    b_full, a_full = lora_init.svd_factors(w, 6)
    b_low, a_low = lora_init.svd_factors(w, 6, method="lowrank")
    assert torch.allclose(b_low @ a_low, w, atol=1e-3) and torch.allclose(b_full @ a_full, w, atol=1e-3)
    assert lora_init.truncated_svd(w, 4, "auto")[0].shape == (200, 4)


def _rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("rank,alpha,split,scale", [(4, 16, "paper", 1.0), (4, 16, "sqrt", 2.0), (8, 2, "paper", 0.5),
                                                   (2, 2, "paper", 1.0)])
def test_applied_step0_delta_is_scale_times_the_extracted_piece(tmp_path, rank, alpha, split, scale):
    """For every (rank, alpha) the delta stock peft applies, (alpha/r) B @ A, equals scale x the
    extracted teacher piece's rank-r approximation, module by module (embeddings included)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    teacher, student = _pair()
    extracted = _extract(teacher, student)
    state = lora_init.init_state_dict(extracted, student.config, rank, alpha=alpha, split=split, scale=scale)
    for key_a, key_b in lora_init.factor_pairs(state):  # the factor product alone, times alpha/r
        name = key_a.removeprefix(lora_init.PEFT_PREFIX).rsplit(".lora_", 1)[0] + ".weight"
        product = (alpha / rank) * state[key_b].double() @ state[key_a].double()
        if "embed_tokens" in key_a:
            product = product.T
        assert torch.allclose(product, scale * _rank_r(extracted[name], rank), atol=1e-4), name
    init = lora_init.save_adapter(tmp_path / "init", state, student.config, rank, alpha)
    model = PeftModel.from_pretrained(student, str(init))
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            expected = scale * _rank_r(extracted[name + ".weight"], rank)
            assert torch.allclose(module.get_delta_weight("default").double(), expected, atol=1e-4), name
            checked += 1
    assert checked == len(extracted)


def test_init_size_is_the_effective_top_singular_value_and_its_ratio(tmp_path):
    """init_size against direct SVDs: the transfer init's top sigma is scale x the extracted
    piece's (alpha/r divided out), its ratio is over the student's own weight; PiSSA's ratio is 1
    (its delta is the top of the weight itself) and standard LoRA's init is 0."""
    from peft import get_peft_model

    teacher, student = _pair()
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    extracted = _extract(teacher, student)
    state = lora_init.init_state_dict(extracted, student.config, 4, alpha=16, scale=2.0)
    init = lora_init.save_adapter(tmp_path / "init", state, student.config, 4, 16)
    model = lora_init.trainable_from_init(student, init)
    size = lora_init.init_size(model)
    tops = {n: 2.0 * float(torch.linalg.svdvals(w.double())[0]) for n, w in extracted.items()}
    ratios = [tops[n] / float(torch.linalg.svdvals(weights[n].double())[0]) for n in extracted]
    assert size["top_sv"] == pytest.approx(sum(tops.values()) / len(tops), rel=1e-4)
    assert size["top_sv_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)
    assert lora_init.top_singular_values(state, 16 / 4, k=1)[0] == pytest.approx(size["top_sv"], rel=1e-4)

    for init_kind, expect in (("pissa", 1.0), (True, 0.0)):
        fresh = tiny_model(seed=2, layers=2, hidden=32, intermediate=48, heads=4)
        cfg = lora_init.lora_config(["q", "v", "down"], 4, 16)
        cfg.init_lora_weights = init_kind
        got = lora_init.init_size(get_peft_model(fresh, cfg))
        assert got["top_sv_ratio"] == pytest.approx(expect, abs=1e-4), init_kind


def test_control_draws_follow_their_seed():
    """The same seed reproduces a control's draw, another seed draws differently (the sweep passes
    the training seed); the spectrum-matched and shuffled controls keep the init's spectrum."""
    teacher, student = _pair()
    extracted = {k: v.detach() for k, v in _extract(teacher, student).items()}
    state = lora_init.init_state_dict(extracted, student.config, 4, alpha=8)
    sens = sensitivity.compute_sensitivity(teacher, random_samples(2), progress=False)
    totals = sensitivity.layer_totals(sens, teacher.config)
    draws = {
        "spectrum-matched": lambda seed: lora_init.spectrum_matched(state, seed),
        "shuffled": lambda seed: lora_init.shuffled(state, seed),
        "random-submatrix": lambda seed: align.extract(teacher.config, student.config, dict(teacher.named_parameters()),
                                                       sens, [1, 3], reducer="random", seed=seed),
    }
    for name, draw in draws.items():
        a, again, other = draw(0), draw(0), draw(1)
        assert all(torch.equal(a[k], again[k]) for k in a), name
        assert any(not torch.equal(a[k], other[k]) for k in a), name
    plans = {tuple(align.select_layers(totals, 2, "random", seed)) for seed in range(8)}
    assert len(plans) > 1 and align.select_layers(totals, 2, "random", 3) == align.select_layers(totals, 2, "random", 3)
    for control in (lora_init.spectrum_matched(state, 1), lora_init.shuffled(state, 1)):
        assert lora_init.top_singular_values(control, 2.0) == pytest.approx(lora_init.top_singular_values(state, 2.0),
                                                                            rel=1e-4)
