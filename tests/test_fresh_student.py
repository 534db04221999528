"""Weight selection and subcloning as initialisations of a fresh student (pkt_core/fresh.py): the init is a
student-shaped selection of the teacher's weights, pretrained like the family's student."""
import pytest
import torch

from pkt.core import activations, arch, fresh, models
from pkt.core.mini import family


def _pair(root):
    return models.load_model(root / "teacher"), models.load_model(root / "student")


def _blocks(root):
    r = family.recipe("test")
    return family.packed_blocks(models.load_tokenizer(root / "student"), family.corpus("student", r), r.block), r


def _match(small: torch.Tensor, big: torch.Tensor, axis: int) -> list[int]:
    """Brute force: for each slice of `small` along axis, the one slice of `big` holding all its values
    (exactly, as a multiset). Random-looking float weights make the match unique; none or two fail."""
    found = []
    s_slices = small if axis == 0 else small.T
    b_slices = big if axis == 0 else big.T
    b_sorted = [torch.sort(b).values for b in b_slices]
    for row in s_slices:
        hits = [i for i, b in enumerate(b_slices) if _contains(b_sorted[i], row)]
        assert len(hits) == 1, f"slice matches teacher slices {hits}"
        found.append(hits[0])
    return found


def _contains(sorted_big: torch.Tensor, values: torch.Tensor) -> bool:
    pos = torch.searchsorted(sorted_big, values)
    inside = bool((pos < len(sorted_big)).all())
    return inside and bool((sorted_big[pos.clamp(max=len(sorted_big) - 1)] == values).all())


def _check_selection(teacher, model, layers, norm_scale):
    """Every student weight is teacher[rows][:, cols] of its layer, the residual columns one set everywhere."""
    t_sd, s_sd = teacher.state_dict(), model.state_dict()
    assert {k: v.shape for k, v in s_sd.items()} == {k: v.shape for k, v in
                                                      type(model)(model.config).state_dict().items()}
    hidden_sets = set()
    for name, (module, s_layer) in arch.transferable_weights(model.config).items():
        t_name = name if s_layer is None else name.replace(f"layers.{s_layer}.", f"layers.{layers[s_layer]}.")
        small, big = s_sd[name], t_sd[t_name]
        # rows by their values (the embeddings keep every vocabulary row), then columns within those rows
        rows = _match(small, big, 0) if module not in ("embed", "lm_head") else list(range(big.shape[0]))
        cols = _match(small, big[rows], 1)
        assert torch.equal(small, big[rows][:, cols]), name
        residual = cols if module in ("q", "k", "v", "gate", "up", "embed", "lm_head") else rows
        hidden_sets.add(tuple(residual))
    assert len(hidden_sets) == 1, "the residual stream's indices differ between weights"
    (hidden,) = hidden_sets
    for s_layer, t_layer in enumerate(layers):
        for norm in fresh.NORMS:
            got = s_sd[f"model.layers.{s_layer}.{norm}.weight"]
            assert torch.allclose(got, t_sd[f"model.layers.{t_layer}.{norm}.weight"][list(hidden)] * norm_scale)
    assert torch.allclose(s_sd["model.norm.weight"], t_sd["model.norm.weight"][list(hidden)] * norm_scale)
    return list(hidden)


def test_weight_selection_init_is_evenly_spaced_teacher_weights_of_the_students_shape(mini_family):
    teacher, student = _pair(mini_family)
    model, info = fresh.inherited_model(models.LazyWeights.from_model_dir(mini_family / "teacher"), teacher.config,
                                        student.config, "weight-selection")
    s, t = arch.dims(student.config), arch.dims(teacher.config)
    assert info["layers"] == list(range(s.layers))  # first-N layers
    assert info["norm_scale"] == 1.0
    hidden = _check_selection(teacher, model, info["layers"], 1.0)
    assert hidden == [j * t.hidden // s.hidden for j in range(s.hidden)]  # evenly spaced, the paper's uniform rule
    ids = torch.randint(3, 64, (1, 12))
    assert torch.isfinite(model(ids).logits).all()


def test_subcloning_init_keeps_the_most_active_dimensions_and_layers(mini_family):
    teacher, student = _pair(mini_family)
    blocks, _ = _blocks(mini_family)
    stats = activations.activation_stats(teacher, [{"input_ids": b[None]} for b in blocks[:8]], progress=False)
    model, info = fresh.inherited_model(models.LazyWeights.from_model_dir(mini_family / "teacher"), teacher.config,
                                        student.config, "subcloning", stats)
    s, t = arch.dims(student.config), arch.dims(teacher.config)
    bi = stats["block_influence"].tolist()
    assert info["layers"] == sorted(sorted(range(t.layers), key=lambda i: -bi[i])[: s.layers])
    assert info["norm_scale"] == pytest.approx((t.hidden / s.hidden) ** 0.5)
    hidden = _check_selection(teacher, model, info["layers"], info["norm_scale"])
    score = stats["hidden"].sum(0).tolist()
    assert hidden == sorted(sorted(range(t.hidden), key=lambda i: -score[i])[: s.hidden])


def test_subcloning_without_activations_is_refused(mini_family):
    teacher, student = _pair(mini_family)
    with pytest.raises(fresh.FreshInitError, match="activation"):
        fresh.inherited_state({}, teacher.config, student.config, "subcloning")


def test_random_init_pretrained_here_is_the_familys_student(mini_family):
    """The control's pretraining is the family's own: from the family's seeded random init it reproduces
    the family's student bit for bit, so ws-student and random-student differ in the init alone."""
    blocks, r = _blocks(mini_family)
    _, student = _pair(mini_family)
    model = fresh.random_model(student.config, r.seed)
    log = fresh.pretrain(model, blocks, fresh.PretrainParams(lr=r.student.lr, steps=r.student.steps, batch=r.batch,
                                                             seed=r.seed), progress=False)
    want = student.state_dict()
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    assert len(log["losses"]) == r.student.steps
    assert [int(s) for s in log["loss_at"]] == list(fresh.probe_steps(r.student.steps))
    assert log["loss_at"][str(r.student.steps)] < log["loss_at"]["0"]


def test_fresh_student_node_is_cached_on_rerun(mini_family, tmp_path):
    from pkt.artifacts.store import Store
    from pkt.tasks import fresh as fresh_nodes
    from pkt.tasks.node import build
    from pkt.tasks.sources import model_source

    store = Store(tmp_path / "store")
    corpus = {"size": "test", "seed": None, "testbed": None, "twin": False}
    inputs = {"teacher": model_source(str(mini_family / "teacher"), store),
              "student": model_source(str(mini_family / "student"), store)}
    init = fresh_nodes.FreshInit(method="weight-selection")
    spec = fresh_nodes.FreshStudent(init="weight-selection", corpus=corpus, recipe=family.recipe_params("test"))
    runs = []
    for _ in range(2):
        ref = build(init, inputs, store)
        student = build(spec, {"student": inputs["student"], "init": ref}, store)
        runs.append((ref["status"], student["status"], student["digest"]))
    assert [r[:2] for r in runs] == [("computed", "computed"), ("reused", "reused")]
    assert runs[0][2] == runs[1][2]
    log = fresh_nodes.pretrain_log(store, student)
    assert log["init"] == "weight-selection" and "0" in log["loss_at"]
    with pytest.raises(ValueError, match="not the one"):  # a recipe that is not the code's is refused
        build(fresh_nodes.FreshStudent(corpus=corpus, recipe={"seed": 99}), {"student": inputs["student"]}, store)


def test_an_external_pair_refuses_the_fresh_students(mini_family):
    from pkt.flows.config import ConfigError, parse_config

    task = mini_family / "tasks" / "facts-teacher-only"
    base = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
            "tasks": [{"name": "facts", "dir": str(task)}], "variants": ["vanilla", "lora", "ws-student"]}
    with pytest.raises(ConfigError, match="only a miniature family carries"):
        parse_config(base)
    assert parse_config({**base, "family": {"size": "test"}}).family.size == "test"


@pytest.mark.slow  # a sweep: the Prefect server, three pretrainings, a LoRA; ~1-2 min on 2 loaded cores
def test_fresh_students_are_scored_in_a_sweep(prefect_env, mini_family, tmp_path):
    from pkt.core import report
    from pkt.flows.sweep import sweep

    task = mini_family / "tasks" / "facts-teacher-only"
    out_dir = tmp_path / "report"
    variants = ["vanilla", "lora", "ws-student", "subclone-student", "random-student"]
    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "facts-teacher-only", "dir": str(task), "benchmark": "gsm"}],
              "variants": variants, "seeds": [0], "benchmarks": ["answer_nll"], "family": {"size": "test"},
              "train": {"rank": 4, "alpha": 8.0, "lr": 1e-3, "epochs": 1, "batch_size": 16, "micro_batch": 16,
                        "max_length": 64},
              "store": str(tmp_path / "store"), "report_dir": str(out_dir)}
    out = sweep(config)
    runs = report.read_csv(out_dir / "runs.csv")
    assert set(variants) <= set(runs["variant"])
    nll = runs[runs["metric"] == "answer_nll"].set_index("variant")["value"]
    # the random-init control reproduces the family's student, so it scores exactly as vanilla does
    assert nll["random-student"] == nll["vanilla"]
    assert nll["ws-student"] != nll["vanilla"] and nll["subclone-student"] != nll["ws-student"]
    curve = report.read_csv(out_dir / "pretraining.csv")
    assert set(curve["variant"]) == {"ws-student", "subclone-student", "random-student"}
    assert "## Fresh students: pretraining loss" in (out_dir / "report.md").read_text()
    kinds = [k for k, _, _ in out["nodes"]]
    assert kinds.count("fresh_student") == 3 and kinds.count("fresh_init") == 2


@pytest.mark.parametrize("size,seed,testbed,twin", [("study", 3, None, False), ("demo", None, None, False),
                                                    ("test", None, 2, False), ("study", 2, None, True)])
def test_a_family_records_recipe_names_the_corpus_the_fresh_students_read(size, seed, testbed, twin):
    from pkt.flows.fresh import family_of

    recorded = family.recipe_params(size, seed, testbed, twin)  # what the family node's key was taken from
    assert family.recipe_params(**family_of({"params": {"size": size, "recipe": recorded}})) == recorded


def test_the_report_table_has_one_row_per_fresh_student_and_a_column_per_step():
    import pandas as pd

    table = pd.DataFrame([{"student": "s", "variant": v, "step": step, "probe_loss": loss + step / 100}
                          for v, loss in (("ws-student", 3.0), ("random-student", 6.0)) for step in (0, 30, 60)])
    text = fresh.pretraining_section(table)
    lines = [line for line in text.splitlines() if line.startswith("| s |")]
    assert len(lines) == 2 and "| step 0 | step 30 | step 60 |" in text
    assert "| s | ws-student | 3.000 | 3.300 | 3.600 |" in text
    assert fresh.pretraining_section(table.iloc[:0]) == ""
