"""The transferability diagnostic: cosine and share against hand-derived values, the share against a
real first peft step and a brute-force least-squares projection, the gradient against an independent
loss, and its predictive power against scipy."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_samples, tiny_model
from peft import LoraConfig, get_peft_model
from scipy import stats

from pkt.core import diagnose, finetune, lora_init

G = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # ||G||^2 = 30


def test_cosine_and_share_by_hand():
    a = torch.tensor([[1.0, 0.0]])  # row(A) = e1
    # B = 0: share = ||G P_A||^2 / ||G||^2 = (1 + 9) / 30
    assert diagnose.tangent_share(G, torch.zeros(2, 1), a) == pytest.approx(1 / 3)
    # B = e1: P_B G + (I - P_B) G P_A = [[1, 2], [3, 0]] -> 14 / 30
    b = torch.tensor([[1.0], [0.0]])
    assert diagnose.tangent_share(G, b, a) == pytest.approx(14 / 30)
    # full-rank factors: the tangent space is everything
    assert diagnose.tangent_share(G, torch.eye(2), torch.eye(2)) == pytest.approx(1.0)
    # cos(dW, -G): dW = 2 * e1 e1^T -> -2 / (2 sqrt 30); dW = -G -> 1; nan without an update
    assert diagnose.update_cosine(2 * b @ a, G) == pytest.approx(-1 / math.sqrt(30))
    assert diagnose.update_cosine(-3 * G, G) == pytest.approx(1.0)
    assert math.isnan(diagnose.update_cosine(torch.zeros(2, 2), G))


def brute_force_share(g, b, a):
    """min over (X, Y) of ||G - X A - B Y||: least squares on the linear map's own matrix (no projectors)."""
    out, r = b.shape
    inn = a.shape[1]
    cols = []
    for i in range(out * r):  # X's entries
        x = torch.zeros(out * r, dtype=torch.float64)
        x[i] = 1
        cols.append((x.view(out, r) @ a.double()).flatten())
    for i in range(r * inn):  # Y's entries
        y = torch.zeros(r * inn, dtype=torch.float64)
        y[i] = 1
        cols.append((b.double() @ y.view(r, inn)).flatten())
    m = torch.stack(cols, 1)
    coef = torch.linalg.lstsq(m, g.double().flatten(), driver="gelsd").solution
    fitted = m @ coef
    return float(fitted.pow(2).sum() / g.double().pow(2).sum())


@pytest.mark.parametrize("shape,r,zero_b", [((7, 5), 2, False), ((5, 9), 3, False), ((6, 4), 2, True)])
def test_share_formula_matches_brute_force_projection(shape, r, zero_b):
    g = torch.Generator().manual_seed(sum(shape) + r)
    grad = torch.randn(*shape, generator=g)
    b = torch.zeros(shape[0], r) if zero_b else torch.randn(shape[0], r, generator=g)
    a = torch.randn(r, shape[1], generator=g)
    assert diagnose.tangent_share(grad, b, a) == pytest.approx(brute_force_share(grad, b, a), abs=1e-8)


class Toy(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x):
        return self.lin(x)


def _toy(seed=0, out=6, inn=5, n=11):
    """float64 weights and data: the realized step is read back to 1e-10, not float32's rounding / lr."""
    g = torch.Generator().manual_seed(seed)
    w, x, y = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((out, inn), (n, inn), (n, out)))
    return w, x, y


def _loss(model, x, y):  # 0.5 ||X W^T - Y||^2: dL/dW = (X W^T - Y)^T X
    return 0.5 * (model(x) - y).pow(2).sum()


def _effective(lora):
    """The LoRA part of the effective weight (the frozen base cannot move; adding it would only round)."""
    return lora.get_delta_weight("default").detach().double().clone()


def _sgd_step(peft_model, lora, x, y, lr):
    before = _effective(lora)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    _loss(peft_model, x, y).backward()
    opt.step()
    return (_effective(lora) - before) / lr


@pytest.mark.parametrize("orthonormal_a", [True, False])
def test_standard_lora_first_sgd_step_follows_the_share(orthonormal_a):
    """Toy linear model, hand gradient G = (X W^T - Y)^T X. One plain SGD step through peft from
    B = 0 moves W by -lr s^2 G A^T A: inside row(A); with orthonormal rows of A its direction is the
    projection itself, so cos^2(step, -G) equals the share; with peft's own A it is at most the share."""
    w, x, y = _toy()
    hand_g = (x @ w.T - y).T @ x
    model = get_peft_model(Toy(w), LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], lora_dropout=0.0))
    lora = model.base_model.model.lin
    if orthonormal_a:
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(torch.linalg.qr(torch.randn(5, 2))[0].T)
    b, a = (t.clone() for t in diagnose.lora_factors(lora)[:2])  # the step moves the parameters
    share = diagnose.tangent_share(hand_g, b, a)
    assert share == pytest.approx(float((hand_g @ torch.linalg.pinv(a) @ a).pow(2).sum() / hand_g.pow(2).sum()))
    row = diagnose.module_row(lora, hand_g)
    assert row["delta_norm2"] == 0 and row["proj_norm2"] / row["grad_norm2"] == pytest.approx(share)
    step = _sgd_step(model, lora, x, y, lr=1e-4)
    s = lora.scaling["default"]
    assert torch.allclose(step, -s * s * hand_g @ a.T @ a, rtol=1e-8)
    cos2 = diagnose.update_cosine(step, hand_g) ** 2
    if orthonormal_a:
        assert cos2 == pytest.approx(share, rel=1e-8)
    else:
        assert cos2 < share + 1e-6


def test_first_step_from_a_nonzero_init_stays_in_the_tangent_space():
    """B != 0 (an extracted init): the realized step lies in {X A + B Y} up to O(lr), its cos^2 with -G
    is at most the share, and the cosine of the init's own update matches s B A against G by hand."""
    w, x, y = _toy(seed=1)
    model = get_peft_model(Toy(w), LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], lora_dropout=0.0))
    lora = model.base_model.model.lin
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lora.lora_B["default"].weight.copy_(torch.randn(6, 2, generator=g, dtype=torch.float64))
        lora.lora_A["default"].weight.copy_(torch.randn(2, 5, generator=g, dtype=torch.float64))
        lora.get_base_layer().weight.sub_(lora.get_delta_weight("default"))  # the delta step: still W at step 0
    hand_g = (x @ w.T - y).T @ x
    b, a = (t.clone() for t in diagnose.lora_factors(lora)[:2])  # the step moves the parameters
    assert diagnose.module_row(lora, hand_g)["inner"] == pytest.approx(-float((b @ a * hand_g).sum()), rel=1e-5)
    share = diagnose.tangent_share(hand_g, b, a)
    step = _sgd_step(model, lora, x, y, lr=1e-7)
    qb, qa = diagnose.range_basis(b), diagnose.range_basis(a.T)
    outside = step - qb @ (qb.T @ step)
    outside = outside - (outside @ qa) @ qa.T
    assert outside.norm() / step.norm() < 1e-6
    first_order = -(hand_g @ a.T @ a + b @ b.T @ hand_g)  # s = 1; the lr^2 term is 1e-6 of it here
    assert (step - first_order).norm() / first_order.norm() < 1e-5
    assert diagnose.update_cosine(step, hand_g) ** 2 <= share + 1e-6


def test_first_peft_step_on_a_llama_realizes_each_modules_share():
    """End to end on a tiny Llama, embeddings and lm_head included: peft's standard init with its
    nonzero factor made orthonormal (A's rows; for an embedding peft zeroes A, so B's columns). One
    plain SGD step of the fine-tuning loss through peft then moves every module along the projection
    of -G, so cos^2(realized step, -G) is the share the diagnostic reports for that module."""
    from peft.tuners.lora import LoraLayer

    params = finetune.TrainParams(rank=2, alpha=4.0, dropout=0.0, micro_batch=4, seed=1,
                                  modules=("q", "down", "embed", "lm_head"))
    samples = random_samples(6, length=10)
    model = tiny_model()
    grads = diagnose.step0_gradients(model, samples, 0, params.modules, params.micro_batch)
    wrapped, _, _ = finetune.peft_model(model, params, "lora")
    layers = {name: wrapped.get_submodule(lora_init.PEFT_PREFIX + name.removesuffix(".weight")) for name in grads}
    with torch.no_grad():
        for layer in layers.values():
            assert isinstance(layer, LoraLayer)
            if "default" in layer.lora_embedding_A:
                b = layer.lora_embedding_B["default"]
                b.copy_(torch.linalg.qr(b)[0])
            else:
                a = layer.lora_A["default"].weight
                a.copy_(torch.linalg.qr(a.T)[0].T)
    shares = diagnose.module_rows(wrapped, grads).set_index("name")["share"]
    lr = 1e-3
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    wrapped.train()
    finetune._accumulate(wrapped, samples, params.micro_batch, 0, torch.device("cpu"))
    opt.step()
    for name, layer in layers.items():
        step = layer.get_delta_weight("default").detach() / lr  # was exactly 0: B = 0 (A = 0 for embeddings)
        assert diagnose.update_cosine(step, grads[name]) ** 2 == pytest.approx(shares[name], rel=1e-3), name
    assert 0 < shares.min() and shares.max() < 1


def _hand_gradients(model, samples, names):
    """The fine-tuning loss written out: summed answer-token NLL over every sample / answer tokens."""
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    total, tokens = 0.0, 0
    for s in samples:
        logits = model(input_ids=s["input_ids"]).logits[0, :-1]
        labels = s["labels"][0, 1:]
        keep = labels != -100
        total = total + torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        tokens += int(keep.sum())
    grads = torch.autograd.grad(total / tokens, [params[n] for n in names])
    return dict(zip(names, grads))


def test_step0_gradient_is_the_fine_tuning_loss_gradient():
    model = tiny_model()
    samples = random_samples(6, length=10)
    grads = diagnose.step0_gradients(model, samples, pad_id=0, modules=("q", "down", "embed", "lm_head"), micro_batch=4)
    assert len(grads) == 2 * 2 + 2
    hand = _hand_gradients(tiny_model(), samples, list(grads))
    for name, g in grads.items():
        assert torch.allclose(g, hand[name], atol=1e-6), name
    assert all(p.grad is None for p in model.parameters())


def test_diagnose_on_a_tiny_llama_matches_its_inits(tmp_path):
    """lora: no update (cos nan), share = ||G P_A||^2/||G||^2 with the A training draws; an extracted
    init: its update s B A (embedding transposed) against the independent gradient, module by module."""
    params = finetune.TrainParams(rank=2, alpha=4.0, dropout=0.0, micro_batch=4, seed=3,
                                  modules=("q", "v", "embed", "lm_head"))
    samples = random_samples(8, length=10)
    hand = _hand_gradients(tiny_model(), samples, list(diagnose.step0_gradients(tiny_model(), samples, 0,
                                                                                 params.modules)))
    lora = diagnose.diagnose(tiny_model(), samples, 0, params, "lora")
    wrapped, _, _ = finetune.peft_model(tiny_model(), params, "lora")  # what training starts from (seed 3)
    for _, row in lora.modules.iterrows():
        layer = wrapped.get_submodule(lora_init.PEFT_PREFIX + row["name"].removesuffix(".weight"))
        b, a, transposed = diagnose.lora_factors(layer)
        g = hand[row["name"]].T if transposed else hand[row["name"]]
        basis = b @ torch.linalg.pinv(b) @ g if transposed else g @ torch.linalg.pinv(a) @ a  # embed: A = 0, B random
        assert row["share"] == pytest.approx(float(basis.pow(2).sum() / g.pow(2).sum()), rel=1e-4)
        assert math.isnan(row["cos"])
    assert 0 < lora.totals["share"] < 1 and math.isnan(lora.totals["cos"])

    g = torch.Generator().manual_seed(0)
    cfg = tiny_model().config
    state = {}
    for name, (module, layer) in lora_init.arch.transferable_weights(cfg, params.modules).items():
        key_a, key_b = lora_init.peft_keys(cfg, module, layer)
        w = lora_init.peft_orientation(module, hand[name])
        state[key_a], state[key_b] = torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g)
    if not (tmp_path / "init").exists():
        lora_init.save_adapter(tmp_path / "init", state, cfg, rank=2, alpha=4.0, dropout=0.0)
    ext = diagnose.diagnose(tiny_model(), samples, 0, params, "extracted", tmp_path / "init")
    total_inner = total_d = total_g = 0.0
    for _, row in ext.modules.iterrows():
        module, layer = lora_init.arch.transferable_weights(cfg)[row["name"]]
        key_a, key_b = lora_init.peft_keys(cfg, module, layer)
        delta = 2.0 * state[key_b] @ state[key_a]  # s = alpha / r = 2
        delta = delta.T if module == "embed" else delta
        want = diagnose.update_cosine(delta, hand[row["name"]])
        assert row["cos"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        total_inner += -float((delta * hand[row["name"]]).sum())
        total_d += float(delta.pow(2).sum())
        total_g += float(hand[row["name"]].pow(2).sum())
    assert ext.totals["cos"] == pytest.approx(total_inner / math.sqrt(total_d * total_g), rel=1e-4)


def test_pissa_leaves_the_embedding_unadapted_and_counts_its_gradient():
    params = finetune.TrainParams(rank=2, alpha=2.0, micro_batch=4, modules=("q", "embed"))
    d = diagnose.diagnose(tiny_model(), random_samples(4, length=10), 0, params, "pissa")
    embed = d.modules[d.modules["module"] == "embed"].iloc[0]
    assert embed["share"] == 0 and math.isnan(embed["cos"]) and embed["grad_norm2"] > 0
    q = d.modules[d.modules["module"] == "q"]
    assert (q["delta_norm2"] > 0).all() and q["cos"].notna().all()
    by = diagnose.by_module(d.modules).set_index("module")
    assert by.loc["total", "grad_norm2"] == pytest.approx(d.modules["grad_norm2"].sum())


# ---- predictive power ----------------------------------------------------------------------------
def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = x + rng.normal(0, 2, 40)
    res = stats.spearmanr(x, y)
    assert diagnose.spearman(x, y) == pytest.approx(res.statistic, abs=1e-12)
    assert diagnose.spearman_p(diagnose.spearman(x, y), 40) == pytest.approx(res.pvalue, rel=1e-8)
    assert math.isnan(diagnose.spearman(np.ones(5), np.arange(5)))


def test_fisher_interval_covers_the_population_spearman():
    """Bivariate normal with Pearson r: population Spearman = (6/pi) asin(r/2); the 95% interval at
    n = 30 should cover it about 95% of the time."""
    rng = np.random.default_rng(1)
    r, n, hits, trials = 0.6, 30, 0, 600
    truth = 6 / np.pi * np.arcsin(r / 2)
    cov = [[1, r], [r, 1]]
    for _ in range(trials):
        x, y = rng.multivariate_normal([0, 0], cov, n).T
        lo, hi = diagnose.fisher_interval(diagnose.spearman(x, y), n)
        hits += lo <= truth <= hi
    assert 0.92 <= hits / trials <= 0.98


def test_cluster_bootstrap_with_one_cell_per_family_matches_scipy_bootstrap():
    rng = np.random.default_rng(2)
    n = 60
    x = rng.normal(size=n)
    cells = pd.DataFrame({"student": [f"f{i}" for i in range(n)], "diag_cos": x, "gain": x + rng.normal(size=n)})
    lo, hi = diagnose.cluster_bootstrap(cells, "diag_cos", draws=4000)
    ref = stats.bootstrap((cells["diag_cos"].to_numpy(), cells["gain"].to_numpy()),
                          lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                          n_resamples=4000, method="percentile", random_state=3).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.04) and hi == pytest.approx(ref.high, abs=0.04)


def _runs(families=6, seeds=3, rng=None):
    """A synthetic runs table: each variant's gain over lora grows with its diag_cos (plus noise)."""
    rng = rng or np.random.default_rng(4)
    rows = []
    for f in range(families):
        for seed in range(seeds):
            lora = rng.normal(0.3, 0.02)
            rows.append({"student": f"fam{f}", "task": "t", "benchmark": "b", "metric": "acc", "variant": "lora",
                         "seed": seed, "value": lora, "diag_cos": np.nan, "diag_share": 0.1})
            rows.append({"student": f"fam{f}", "task": "t", "benchmark": "b", "metric": "acc", "variant": "vanilla",
                         "seed": seed, "value": 0.2, "diag_cos": np.nan, "diag_share": np.nan})
            for v, c in [("transfer", 0.05), ("shuffled", 0.0), ("spectrum-matched", -0.01), ("pissa", 0.02)]:
                cos = c + 0.01 * f
                rows.append({"student": f"fam{f}", "task": "t", "benchmark": "b", "metric": "acc", "variant": v,
                             "seed": seed, "value": lora + 2 * cos + rng.normal(0, 0.01), "diag_cos": cos,
                             "diag_share": 0.2 + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


def test_predictive_power_pairs_by_seed_and_agrees_with_scipy():
    runs = _runs()
    out = diagnose.predictive_power(runs, "acc")
    assert out["cells"] == 6 * 4 and out["families"] == 6
    cells = diagnose.gain_cells(runs, "acc")
    # an independent pairing: pivot seeds to columns and subtract lora's
    piv = runs[runs["metric"] == "acc"].pivot_table(index=["student", "seed"], columns="variant", values="value")
    want = (piv["transfer"] - piv["lora"]).groupby("student").mean()
    got = cells[cells["variant"] == "transfer"].set_index("student")["gain"]
    assert np.allclose(got.loc[want.index], want)
    ref = stats.spearmanr(cells["diag_cos"], cells["gain"])
    assert out["diag_cos"]["rho"] == pytest.approx(ref.statistic) and out["diag_cos"]["p"] == pytest.approx(ref.pvalue)
    assert out["diag_cos"]["ci_low"] < out["diag_cos"]["rho"] < out["diag_cos"]["ci_high"]
    assert out["diag_cos"]["rho"] > 0.5 and "boot_low" in out["diag_cos"]
    lower = diagnose.predictive_power(runs, "acc", lower_is_better=True)  # gain's sign flips
    assert lower["diag_cos"]["rho"] == pytest.approx(-out["diag_cos"]["rho"])


def test_predictive_power_refuses_pooled_lora_runs():
    runs = _runs(families=2)
    with pytest.raises(ValueError, match="several runs for one seed"):
        diagnose.predictive_power(pd.concat([runs, runs[runs["variant"] == "lora"]]), "acc")


def test_report_has_a_diagnostic_section_only_when_the_runs_carry_one(tmp_path):
    from pkt.core import report

    runs = _runs()
    text = report.diagnostic_section(runs, "acc")
    assert "Does the step-0 diagnostic predict the gain?" in text and "| acc | diag_cos | 24 | 6 |" in text
    rho = diagnose.predictive_power(runs, "acc")["diag_cos"]["rho"]
    assert f"{rho:+.2f}" in text
    row = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| acc |")}
    assert row["diag_cos"].endswith("| ranks the gain |")  # built so: the gain grows with diag_cos
    assert row["diag_share"].endswith("| not distinguishable from no association |")  # diag_share is noise
    assert report.diagnostic_section(runs.drop(columns=["diag_cos", "diag_share"]), "acc") == ""
    paths = report.write_report(runs, tmp_path / "rep", "acc")
    assert "Does the step-0 diagnostic predict" in paths["markdown"].read_text()


# ---- the node, the sweep's columns and `pkt diagnose` (real Prefect runs) ------------------------
TRAIN = {"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8, "max_length": 64}


def test_sweep_runs_carry_the_diagnostic_and_the_node_is_cached(prefect_env, mini_family, tmp_path, monkeypatch):
    """A sweep joins each run's diagnostic into runs.csv; `pkt diagnose`'s flow on the same store and
    training parameters reuses those very nodes (the same keys) and a second run computes nothing."""
    from pkt.flows.diagnose import diagnose_inits
    from pkt.flows.sweep import sweep
    from prefect_api import task_graph

    store = str(tmp_path / "store")
    out = sweep({"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
                 "tasks": [{"name": "gsm", "dir": str(mini_family / "tasks/gsm"), "benchmark": "gsm"}],
                 "variants": ["vanilla", "lora", "transfer"], "seeds": [0], "benchmarks": [], "eval_limit": 4,
                 "train": TRAIN, "store": store, "report_dir": str(tmp_path / "report")})
    runs = pd.read_csv(out["report"]["runs"]).drop_duplicates("variant").set_index("variant")
    assert runs[["diag_cos", "diag_share"]].loc["vanilla"].isna().all()  # no init: n/a
    assert math.isnan(runs.loc["lora", "diag_cos"]) and 0 < runs.loc["lora", "diag_share"] < 1
    assert -1 <= runs.loc["transfer", "diag_cos"] <= 1 and 0 < runs.loc["transfer", "diag_share"] <= 1
    assert [k for k, _, _ in out["nodes"]].count("diagnostic") == 2

    calls = []
    monkeypatch.setattr(diagnose, "diagnose", lambda *a, **kw: calls.append(1))  # must not be reached
    args = dict(teacher=str(mini_family / "teacher"), student=str(mini_family / "student"),
                task_dir=str(mini_family / "tasks/gsm"), variants=["vanilla", "lora", "transfer"], train=TRAIN,
                store=store)
    alone = diagnose_inits(**args)
    assert alone["computed"] == 0 and calls == []
    totals = pd.DataFrame(alone["table"]).query("module == 'total'").set_index("variant")
    assert totals.loc["transfer", "cos"] == pytest.approx(runs.loc["transfer", "diag_cos"])
    assert totals.loc["lora", "share"] == pytest.approx(runs.loc["lora", "diag_share"])
    state = diagnose_inits(**args, return_state=True)
    nodes = {name: s for name, (s, _) in task_graph(state).items() if name.startswith("diagnostic[")}
    assert len(nodes) == 2 and set(nodes.values()) == {"Cached"}, nodes


def test_pkt_diagnose_prints_the_table(prefect_env, mini_family, tmp_path, capsys):
    from pkt.flows.cli import main

    fam = mini_family
    code = main(["diagnose", "--teacher", str(fam / "teacher"), "--student", str(fam / "student"), "--task",
                 str(fam / "tasks/gsm"), "--rank", "2", "--variants", "vanilla,lora,pissa,transfer,shuffled",
                 "--batches", "1", "--train", json.dumps({"batch_size": 8, "max_length": 64}),
                 "--store", str(tmp_path / "store")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "cos per module type" in out and "share per module type" in out and "vanilla: n/a" in out
    cos_table = out.split("cos per module type", 1)[1].split("share per module type", 1)[0]
    header = next(line for line in cos_table.splitlines() if line.startswith("module"))
    assert header.split()[1:] == ["q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "total"]
    rows = {line.split()[0]: line.split()[1:] for line in cos_table.splitlines()
            if line.split() and line.split()[0] in ("lora", "pissa", "transfer", "shuffled")}
    assert set(rows) == {"lora", "pissa", "transfer", "shuffled"}
    assert rows["lora"] == ["n/a"] * 10 and rows["pissa"][7] == "n/a"  # no update; PiSSA leaves embed alone
    assert all(-1 <= float(x) <= 1 for x in rows["transfer"])
    assert "gradient over 8 training samples" in out


def test_pkt_diagnose_refuses_bad_input_in_one_sentence(tmp_path, capsys):
    from pkt.flows.cli import main, parser

    with pytest.raises(SystemExit) as e:
        parser().parse_args(["diagnose", "--help"])
    assert e.value.code == 0 and "--batches" in capsys.readouterr().out

    assert main(["diagnose", "--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "s"), "--task",
                 str(tmp_path / "task"), "--batches", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batches 0" in err and len(err.strip().splitlines()) == 1
