"""Selectors and reducers from the weight-inheritance literature (weight selection, subcloning, block
influence) against their definitions, through a real sweep, and the cost table from real records."""
import copy

import pytest
import torch

from conftest import random_samples, tiny_config, tiny_model
from pkt.core import activations, align, arch, costs, inherit
from pkt.core.memory import PeakRSS

T = dict(layers=3, hidden=32, intermediate=48, heads=4, kv_heads=2)  # head_dim 8, two query heads per kv head
BIG = 10000  # an index-encoded weight: W[r, c] = r * BIG + c, exact in fp32 at these sizes


def encoded(model) -> dict[str, torch.Tensor]:
    """Every 2-D weight replaced by its own indices, so an extracted piece tells which rows/cols it took."""
    out = {}
    for name, w in model.state_dict().items():
        if w.dim() == 2:
            r, c = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
            out[name] = (r * BIG + c).float()
    return out


def taken(piece: torch.Tensor) -> tuple[list[int], list[int]]:
    return (piece[:, 0] // BIG).long().tolist(), (piece[0] % BIG).long().tolist()


def extract(teacher, student, layers, reducer, stats=None):
    return align.extract(teacher.config, student.config, encoded(teacher), None, layers, reducer=reducer,
                         activations=stats)


def name(module, layer=None):
    return arch.weight_name(tiny_config(), module, layer)


def brute_stats(model, samples) -> dict[str, torch.Tensor]:
    """Every activation kept whole, then averaged: the residual stream from output_hidden_states (final
    norm removed, so the last entry is the last layer's raw output), the FFN neurons recomputed from
    the captured post-attention norm output, the o_proj inputs captured whole."""
    raw = copy.deepcopy(model)
    raw.model.norm = torch.nn.Identity()
    hidden, bi, ffn_in, o_in = [], [], {}, {}
    hooks = []
    for i, layer in enumerate(raw.model.layers):
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o, i=i: ffn_in.setdefault(i, []).append(o[0].clone())))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(
            lambda m, a, o, i=i: o_in.setdefault(i, []).append(a[0][0].clone())))
    with torch.no_grad():
        for s in samples:
            hs = raw(input_ids=s["input_ids"], output_hidden_states=True).hidden_states
            hidden.append(torch.stack([h[0] for h in hs]))  # [L+1, T, hidden]
            bi.append(torch.stack([1 - torch.nn.functional.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1)
                                   for i in range(len(hs) - 1)]))  # [L, T]
    for h in hooks:
        h.remove()
    mlp = [layer.mlp for layer in raw.model.layers]
    inter = [torch.cat([m.act_fn(m.gate_proj(x)) * m.up_proj(x) for x in ffn_in[i]]).abs().mean(0).detach()
             for i, m in enumerate(mlp)]
    return {"hidden": torch.cat(hidden, 1).abs().mean(1), "block_influence": torch.cat(bi, 1).mean(1),
            "intermediate": torch.stack(inter), "attn": torch.stack([torch.cat(o_in[i]).abs().mean(0)
                                                                      for i in range(len(mlp))])}


# ---- weight selection ---------------------------------------------------------------------------
def test_weight_selection_takes_evenly_spaced_indices_the_same_in_every_layer():
    teacher = tiny_model(**T)
    student = tiny_model(layers=2, hidden=16, intermediate=24, heads=4, kv_heads=2)  # head_dim 4
    layers = align.select_layers([0.0] * 3, 2, "evenly-spaced")
    assert layers == [0, 1]  # floor(j * 3 / 2), j = 0, 1
    assert align.select_layers([0.0] * 12, 4, "evenly-spaced") == [0, 3, 6, 9]
    out = extract(teacher, student, layers, "weight-selection")
    hidden, inter = list(range(0, 32, 2)), list(range(0, 48, 2))
    for s_layer in range(2):
        assert taken(out[name("q", s_layer)])[1] == hidden
        assert taken(out[name("o", s_layer)])[0] == hidden
        assert taken(out[name("gate", s_layer)]) == (inter, hidden)
        assert taken(out[name("up", s_layer)]) == (inter, hidden)
        assert taken(out[name("down", s_layer)]) == (hidden, inter)
        # every head kept (4 of 4, both kv groups); head dims in RoPE pairs: pairs 0, 2 of 4 and their partners
        dims = [0, 2, 4, 6]
        assert taken(out[name("q", s_layer)])[0] == [h * 8 + d for h in range(4) for d in dims]
        assert taken(out[name("k", s_layer)])[0] == [g * 8 + d for g in range(2) for d in dims]
        assert taken(out[name("o", s_layer)])[1] == taken(out[name("q", s_layer)])[0]
    assert taken(out[name("embed")]) == (list(range(64)), hidden)
    assert taken(out[name("lm_head")]) == (list(range(64)), hidden)


def _heads(rows, head_dim):
    return sorted({r // head_dim for r in rows})


@pytest.mark.parametrize("reducer", ["weight-selection", "subcloning"])
def test_query_heads_keep_the_kv_group_they_attend_with(reducer):
    """Grouped-query attention: a student query head comes from a teacher head of the kv group its
    student kv head comes from, in both directions of the kv-head count."""
    teacher = tiny_model(**T)
    stats = activations.activation_stats(teacher, random_samples(2), progress=False)
    fewer = tiny_model(layers=2, hidden=16, intermediate=24, heads=2, kv_heads=1)  # one kv group of two heads
    out = extract(teacher, fewer, [0, 2], reducer, stats)
    q_heads = [r // 8 for r in taken(out[name("q", 0)])[0][::8]]
    (kv_group,) = [r // 8 for r in taken(out[name("k", 0)])[0][::8]]
    assert [h // 2 for h in q_heads] == [kv_group, kv_group]  # teacher heads 2g, 2g+1 use kv group g
    assert taken(out[name("v", 0)])[0] == taken(out[name("k", 0)])[0]  # head_dim kept whole: same dims
    more = tiny_model(layers=2, hidden=16, intermediate=24, heads=4, kv_heads=4)  # a kv head per query head
    out = extract(teacher, more, [0, 2], reducer, stats)
    q_heads = [r // 8 for r in taken(out[name("q", 1)])[0][::4]]
    kv_heads = [r // 8 for r in taken(out[name("k", 1)])[0][::4]]  # rows of the teacher's k_proj, unrepeated
    assert [h // 2 for h in q_heads] == kv_heads


# ---- subcloning ---------------------------------------------------------------------------------
def test_activation_stats_match_a_brute_force_forward():
    teacher = tiny_model(**T)
    samples = random_samples(3, length=10)
    fast, brute = activations.activation_stats(teacher, samples, progress=False), brute_stats(teacher, samples)
    for key in brute:
        torch.testing.assert_close(fast[key], brute[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    assert int(fast["tokens"]) == 30


def test_subcloning_ranks_by_activation_magnitude():
    teacher = tiny_model(**T)
    samples = random_samples(3, length=10)
    stats, brute = activations.activation_stats(teacher, samples, progress=False), brute_stats(teacher, samples)
    student = tiny_model(layers=2, hidden=16, intermediate=24, heads=2, kv_heads=1)
    out = extract(teacher, student, [0, 2], "subcloning", stats)
    top = lambda score, n: sorted(torch.topk(score, n).indices.tolist())  # noqa: E731
    hidden = top(brute["hidden"].sum(0), 16)  # one ranking over the whole residual stream
    for s_layer, t_layer in enumerate([0, 2]):
        assert taken(out[name("q", s_layer)])[1] == hidden and taken(out[name("down", s_layer)])[0] == hidden
        assert taken(out[name("up", s_layer)])[0] == top(brute["intermediate"][t_layer], 24)  # per layer
        groups = brute["attn"][t_layer].view(2, 2 * 8).sum(1)  # kv group = its two query heads' channels
        assert _heads(taken(out[name("k", s_layer)])[0], 8) == [int(groups.argmax())]
    assert taken(out[name("embed")])[1] == hidden


# ---- block influence ----------------------------------------------------------------------------
def test_block_influence_selector_keeps_the_most_influential_layers_in_order():
    teacher = tiny_model(layers=5, hidden=32, intermediate=48, heads=4, kv_heads=2)
    samples = random_samples(2)
    bi = activations.activation_stats(teacher, samples, progress=False)["block_influence"]
    direct = brute_stats(teacher, samples)["block_influence"]
    torch.testing.assert_close(bi, direct.float(), rtol=1e-4, atol=1e-6)
    chosen = align.select_layers(bi.tolist(), 3, "block-influence")
    assert chosen == sorted(sorted(range(5), key=lambda i: -float(direct[i]))[:3])


# ---- cost ---------------------------------------------------------------------------------------
def test_cost_table_charges_shared_nodes_to_each_variant_and_says_who_shares():
    rec = lambda seconds, peak=100, start=40: {"seconds": seconds, "digest": "same-bytes",  # noqa: E731
                                                "peak_rss_bytes": peak * 2**20, "start_rss_bytes": start * 2**20}
    records = {("sensitivity", "s"): rec(10.0), ("layer_plan", "p"): rec(1.0), ("extraction", "e"): rec(2.0),
               ("lora_init", "i"): rec(3.0), ("adapter", "a0"): rec(20.0, peak=300, start=50),
               ("adapter", "a1"): rec(30.0), ("extraction", "e2"): rec(4.0), ("lora_init", "i2"): rec(5.0),
               ("adapter", "b0"): rec(40.0), ("activations", "x"): rec(7.0), ("layer_plan", "w"): rec(0.5),
               ("extraction", "we"): rec(1.5), ("lora_init", "wi"): rec(2.0), ("adapter", "c0"): rec(10.0)}
    # every record has the same digest: identical bytes must not tie one variant's nodes to another's
    used = {"transfer": [("sensitivity", "s"), ("layer_plan", "p"), ("extraction", "e"), ("lora_init", "i"),
                         ("adapter", "a0"), ("adapter", "a1"), ("sensitivity", "s")],
            "random-submatrix": [("sensitivity", "s"), ("layer_plan", "p"), ("extraction", "e2"),
                                 ("lora_init", "i2"), ("adapter", "b0")],
            "block-influence": [("activations", "x"), ("layer_plan", "w"), ("extraction", "we"), ("lora_init", "wi"),
                                ("adapter", "c0")],
            "vanilla": []}
    table = costs.costs(records, used).set_index("variant")
    assert table.loc["transfer", "teacher_side_s"] == 10 + 1 + 2 + 3  # a node used twice counts once
    assert table.loc["transfer", "teacher_side_by_kind"] == "extraction 2.00, layer_plan 1.00, lora_init 3.00, " \
                                                            "sensitivity 10.00"
    assert table.loc["random-submatrix", "teacher_side_s"] == 10 + 1 + 4 + 5  # the shared nodes in full
    assert table.loc["transfer", "training_s_per_run"] == 25 and table.loc["transfer", "runs"] == 2
    assert table.loc["transfer", "peak_rss_mib"] == 300 and table.loc["transfer", "added_rss_mib"] == 250
    assert table.loc["transfer", "shared_with"] == "random-submatrix"
    assert table.loc["block-influence", "shared_with"] == "" and table.loc["block-influence", "teacher_side_s"] == 11
    assert table.loc["vanilla", "runs"] == 0 and table.loc["vanilla", "teacher_side_s"] == 0
    # kd's adapter is its run's training, not teacher-side work (it was counted as 0 runs)
    kd = costs.costs({("kd_adapter", "k0"): rec(6.0), ("kd_adapter", "k1"): rec(8.0)},
                     {"kd": [("kd_adapter", "k0"), ("kd_adapter", "k1")]}).set_index("variant")
    assert kd.loc["kd", "runs"] == 2 and kd.loc["kd", "training_s_per_run"] == 7 and kd.loc["kd", "teacher_side_s"] == 0


def test_peak_rss_sees_an_allocation_made_inside():
    """In a fresh process (a long-lived one, the suite, may serve the 64 MiB from pages it already holds:
    the record's "added" column is a lower bound) and held for 10 sampling periods (the sampler cannot
    see a spike shorter than its period, as pkt_core/memory.py says)."""
    import subprocess
    import sys

    code = ("import time, torch\nfrom pkt.core.memory import PeakRSS\nwith PeakRSS() as m:\n"
            "    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
            "    time.sleep(0.1)  # held for 10 sampling periods\n    del x\nprint(m.peak - m.start)")
    added = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert added >= 60 * 2**20


# ---- through a sweep ----------------------------------------------------------------------------
NEW = ["weight-selection", "subcloning", "block-influence"]


def test_every_new_variant_through_a_sweep_with_true_edges_and_measured_costs(prefect_env, mini_family, tmp_path):
    from pkt.artifacts.store import Store
    from pkt.flows.sweep import sweep
    from prefect_api import task_graph
    from test_demo import check_edges

    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "gsm", "dir": str(mini_family / "tasks/gsm"), "benchmark": "gsm"}],
              "variants": ["lora", "transfer", *NEW], "seeds": [0], "benchmarks": [], "eval_limit": 4,
              "train": {"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
              "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report")}
    state = sweep(config, return_state=True)
    out = state.result()
    check_edges(task_graph(state), config["variants"], seeds=1)
    kinds = [k for k, _, _ in out["nodes"]]
    assert kinds.count("activations") == 1  # subcloning and block influence share one forward pass
    assert kinds.count("sensitivity") == 1 and kinds.count("extraction") == 4
    assert {r["variant"] for r in out["table"]} == {"lora", "transfer", *NEW}

    store = Store(tmp_path / "store")
    records = {(kind, key): store.record(kind, key) for kind, key, _ in out["nodes"]}
    assert all(r["peak_rss_bytes"] >= r["start_rss_bytes"] > 0 for r in records.values())
    used = {v: [tuple(n) for n in ids] for v, ids in out["variant_nodes"].items()}
    side = lambda v: sorted(kind for kind, _ in used[v] if kind != "adapter")  # noqa: E731
    assert side("weight-selection") == ["extraction", "layer_plan", "lora_init"]  # no data read
    assert side("subcloning") == ["activations", "extraction", "layer_plan", "lora_init", "sensitivity"]
    assert side("block-influence") == ["activations", "extraction", "layer_plan", "lora_init", "sensitivity"]
    assert side("transfer") == ["extraction", "layer_plan", "lora_init", "sensitivity"] and side("lora") == []
    table = costs.costs(records, used).set_index("variant")
    for v in ("transfer", *NEW):  # the seconds of its nodes, straight from the records
        assert table.loc[v, "teacher_side_s"] == pytest.approx(
            sum(records[n]["seconds"] for n in used[v] if n[0] != "adapter"))
        assert table.loc[v, "runs"] == 1
    assert "transfer" in table.loc["block-influence", "shared_with"]  # the sensitivity node
    assert "transfer" not in table.loc["weight-selection", "shared_with"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "costs.csv").stat().st_size > 0
    assert "## What each method costs" in text and "| weight-selection | 1 |" in text and "| lora | 1 | 0.00 |" in text


def test_the_new_names_are_accepted_wherever_a_user_types_a_variant(mini_family, tmp_path, capsys):
    from pkt.flows.cli import main
    from pkt.flows.config import parse_config

    task = str(mini_family / "tasks/gsm")
    cfg = parse_config({"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
                        "tasks": [{"name": "gsm", "dir": task}], "variants": ["lora", *NEW]})
    assert cfg.variants == ["lora", *NEW]
    code = main(["transfer", "--teacher", str(mini_family / "teacher"), "--student", str(mini_family / "student"),
                 "--task-dir", task, "--variants", "lora,weight-selectoin", "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and "weight-selectoin" in err and all(v in err for v in NEW)


def test_extract_with_weight_selection_reads_no_data(prefect_env, mini_family, tmp_path, capsys):
    from pkt.flows.cli import main

    code = main(["extract", "--teacher", str(mini_family / "teacher"), "--seeds", str(mini_family / "tasks/gsm/seeds.jsonl"),
                 "--student", str(mini_family / "student"), "--rank", "2", "--alpha", "2", "--store", str(tmp_path / "s"),
                 "--selector", "evenly-spaced", "--reducer", "weight-selection"])
    out = capsys.readouterr().out
    kinds = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[-1] == "computed"]
    assert code == 0 and sorted(kinds) == ["extraction", "layer_plan", "lora_init", "residual_model"], out


@pytest.mark.parametrize("reducer", inherit.REDUCERS)
def test_heads_that_do_not_fit_are_picked_flat_with_q_and_o_consistent(reducer):
    """A student with more query heads than the teacher (Qwen2.5 1.5B -> 0.5B has 12 -> 14) cannot keep
    whole heads: q/o and k/v channels are picked flat, each pair with one set of indices."""
    teacher = tiny_model(**T)
    student = tiny_model(layers=2, hidden=16, intermediate=24, heads=8, kv_heads=2)  # head_dim 2, 8 > 4 heads
    stats = activations.activation_stats(teacher, random_samples(2), progress=False)
    out = extract(teacher, student, [0, 1], reducer, stats)
    params = dict(student.named_parameters())
    assert all(out[n].shape == params[n].shape for n in out)
    assert taken(out[name("q", 0)])[0] == taken(out[name("o", 0)])[1]
    assert taken(out[name("k", 0)])[0] == taken(out[name("v", 0)])[0]
    if reducer == "subcloning":
        assert taken(out[name("o", 1)])[1] == sorted(torch.topk(stats["attn"][1], 16).indices.tolist())
