"""The miniature testbed: leak-free splits, teacher-only facts, quality gates, and a random-layers
control that never draws transfer's own plan (issue 17's cases, replayed)."""
import itertools
import json
import math
import re
from collections import Counter

import pytest
import torch

from pkt.core import align, evaluate
from pkt.core.mini import family, gates, tasks

SPLITS = ("train", "seeds", "gate", "val", "test")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def question(row):
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def facts_of(task, row):
    """What a row asks about, read from its text here (not through tasks.item_facts)."""
    q = question(row)
    if task == "gsm":
        a, b = sorted(int(x) for x in re.fullmatch(r"What is (\d+)\+(\d+)\?", q).groups())
        return {(a, b)}
    if task == "sni":
        return {q.split(": ", 1)[1]}
    # the facts tasks, the MMLU-style one and the old colors task: the entity asked about
    return {re.search(r"(?:number|color) (?:of|is) the (\w+)\?", q).group(1)}


def test_no_two_splits_share_an_item_or_a_fact(mini_family):
    """Replays the MMLU-like leak (val and test asked about the same 60 facts) on the built family:
    gate, val and test share no item and no fact with each other or with train."""
    for task in tasks.TASKS:
        d = mini_family / "tasks" / task
        rows = {s: read(d / f"{s}.jsonl") for s in ("train", "gate", "val", "test")}
        assert all(rows[s] for s in ("gate", "val", "test")), task
        for a, b in itertools.combinations(rows, 2):
            qa, qb = {question(r) for r in rows[a]}, {question(r) for r in rows[b]}
            assert not qa & qb, (task, a, b)
            fa = set().union(*(facts_of(task, r) for r in rows[a]))
            fb = set().union(*(facts_of(task, r) for r in rows[b]))
            assert not fa & fb, (task, a, b, sorted(fa & fb)[:5])
        for s, split_rows in rows.items():  # no fact asked twice within a held-out split either
            if s != "train":
                facts = [f for r in split_rows for f in facts_of(task, r)]
                assert len(facts) == len(set(facts)), (task, s)


@pytest.mark.parametrize("testbed", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_study_size_splits_are_leak_free_and_item_facts_agrees(seed, testbed):
    sizes = family.recipe("study", seed, testbed).tasks
    for task in tasks.TASKS:
        splits = tasks.make_splits(task, sizes, seed, testbed)
        assert [len(splits[s]) for s in ("gate", "val", "test")] == [sizes.n_gate, sizes.n_val, sizes.n_test], task
        facts = {s: [f for r in rows for f in tasks.item_facts(task, r)] for s, rows in splits.items()}
        for a, b in itertools.combinations(facts, 2):
            assert not set(facts[a]) & set(facts[b]), (task, a, b)
        for s in tasks.HELD_SPLITS:
            assert len(facts[s]) == len(set(facts[s])), (task, s)
            # the module's notion of a fact is the one read from the text here
            assert {str(f) for r in splits[s] for f in facts_of(task, r)} == {
                str(tuple(int(x) for x in f.split("+"))) if task == "gsm" else f for f in facts[s]}


def test_gates_use_their_own_split_not_val_or_test(mini_family):
    """Replays the GSM gate leak (the teacher's gate scored all 64 val problems and 36 test ones):
    every gate is measured on the gate split, whose items are apart from val and test, and the
    recorded scores are what the gate split gives."""
    stats = json.loads((mini_family / "family_stats.json").read_text())
    assert {g["split"] for g in stats["gates"].values()} == {"gate"}
    for task in gates.SCORED:
        d = mini_family / "tasks" / task
        gate_q = {question(r) for r in read(d / "gate.jsonl")}
        assert gate_q and not gate_q & {question(r) for s in ("val", "test") for r in read(d / f"{s}.jsonl")}
    assert gates.gate_scores(mini_family, "student") == stats["student"]["gate_exact_match"]


def test_teacher_only_facts_never_reach_the_student(mini_family):
    """The student's pretraining corpus (its text), the fine-tuning data and the seed samples never
    state a teacher-only fact; the teacher's corpus states every one."""
    for size, seed, testbed in (("test", None, 1), ("study", 0, 1), ("study", 1, 2), ("test", None, 2)):
        r = family.recipe(size, seed, testbed)
        book = tasks.fact_book(r.tasks, r.seed, testbed)
        teacher_only = [n for s in (*tasks.HELD_SPLITS, "train") for n, _ in book.get(f"teacher-only/{s}", [])]
        shared = [n for s in tasks.HELD_SPLITS for n, _ in book[f"shared/{s}"]]
        corpus = {m: "\n".join(family.corpus(m, r)) for m in ("teacher", "student")}
        words = {m: set(re.findall(r"\w+", text)) for m, text in corpus.items()}
        assert not set(teacher_only) & words["student"], size
        assert set(teacher_only) <= words["teacher"] and set(shared) <= words["student"], size
        for name, value in book["teacher-only/test"][:8]:
            assert f"The number of the {name} is {value}." in corpus["teacher"]
    teacher_only = {f for r in read(mini_family / "tasks/facts-teacher-only/test.jsonl") for f in facts_of("x", r)}
    for task in tasks.TASKS:
        for split in ("train", "seeds"):
            text = (mini_family / "tasks" / task / f"{split}.jsonl").read_text()
            assert not teacher_only & set(re.findall(r"\w+", text)), (task, split)


def test_shared_facts_are_stated_with_graded_counts_and_every_split_gets_the_same_mix():
    """The study recipe states each shared fact 2, 4, 8 or 16 times (its index in its split, cycled), in
    both corpora; every other fact fact_repeats times. Counted in the corpus text itself."""
    r = family.recipe("study", 3, testbed=2)
    assert r.shared_repeats == (2, 4, 8, 16) and r.testbed == 2
    book = tasks.fact_book(r.tasks, r.seed, r.testbed)
    for member in ("teacher", "student"):
        counts = Counter(d for d in family.corpus(member, r) if d.startswith("The number of the "))
        for split in tasks.HELD_SPLITS:
            got = [counts[tasks.fact_sentence(n, v)] for n, v in book[f"shared/{split}"]]
            assert got == [r.shared_repeats[i % 4] for i in range(len(got))], (member, split)
            assert Counter(got) == Counter({c: len(got) // 4 for c in r.shared_repeats}), (member, split)
            only = [counts[tasks.fact_sentence(n, v)] for n, v in book[f"teacher-only/{split}"]]
            assert only == [r.fact_repeats if member == "teacher" else 0] * len(only), (member, split)
        assert {counts[tasks.fact_sentence(n, v)] for n, v in book["finetune"] + book["format"]} == {r.fact_repeats}
        only = [counts[tasks.fact_sentence(n, v)] for n, v in book["teacher-only/train"]]
        assert only == [r.fact_repeats if member == "teacher" else 0] * len(only), member
    # without shared_repeats every fact is stated fact_repeats times (the test and demo recipes' corpora)
    flat = Counter(tasks.pretraining_texts("student", r.tasks, r.seed, 3, 10, 5, testbed=r.testbed))
    assert {flat[tasks.fact_sentence(n, v)] for n, v in book["shared/val"]} == {3}


def _ids_in(tok, texts):
    return {i for ids in tok(texts, add_special_tokens=False)["input_ids"] for i in ids}


@pytest.mark.parametrize("testbed", [1, 2])
def test_v2_names_are_spelled_in_tokens_the_student_trains_and_v1_names_are_not(testbed):
    """Issue 24's case (1): under v1, no token of a teacher-only name occurs in the student's corpus (its
    embedding never trains); under v2, every token of every teacher-only name does, while the name itself
    (the association) never does. Read from the tokenized corpus."""
    from pkt.core.mini.tokenizer import build_tokenizer

    r = family.recipe("study", 0, testbed)
    tok = build_tokenizer(testbed)
    book = tasks.fact_book(r.tasks, r.seed, testbed)
    names = [n for s in (*tasks.HELD_SPLITS, "train") for n, _ in book.get(f"teacher-only/{s}", [])]
    student_ids = _ids_in(tok, family.corpus("student", r))
    name_ids = {n: _ids_in(tok, [n]) for n in names}
    assert tok.unk_token_id not in set().union(*name_ids.values())
    if testbed == 1:
        assert all(len(ids) == 1 and not ids & student_ids for ids in name_ids.values())
    else:
        assert all(len(tok(n, add_special_tokens=False)["input_ids"]) == 2 and ids <= student_ids
                   for n, ids in name_ids.items())
        assert not set(names) & set(re.findall(r"\w+", "\n".join(family.corpus("student", r))))


def test_v2_teacher_only_facts_train_and_seed_apart_from_the_scored_ones(tmp_path):
    """v2's facts-teacher-only task fine-tunes on (and draws its sensitivity seeds from) teacher-only facts:
    the teacher's corpus states them, the student's does not, and no scored split asks about them."""
    r = family.recipe("test", None, 2)
    d = tasks.write_task(tmp_path / "facts-teacher-only", "facts-teacher-only", r.tasks, seed=r.seed, testbed=2)
    corpus = {m: "\n".join(family.corpus(m, r)) for m in ("teacher", "student")}
    tuned = {s: {f for row in read(d / f"{s}.jsonl") for f in facts_of("x", row)} for s in ("train", "seeds")}
    scored = {f for s in tasks.HELD_SPLITS for row in read(d / f"{s}.jsonl") for f in facts_of("x", row)}
    assert len(tuned["train"]) == r.tasks.n_train and tuned["seeds"] <= tuned["train"] and len(tuned["seeds"]) > 0
    assert not tuned["train"] & scored
    for row in read(d / "train.jsonl"):
        name = facts_of("x", row).pop()
        stated = f"The number of the {name} is {row['messages'][1]['content'].split()[-1]}"
        assert stated in corpus["teacher"] and name not in set(re.findall(r"\w+", corpus["student"]))
    # the shared facts task still trains on facts both corpora state
    shared = tasks.make_splits("facts-shared", r.tasks, r.seed, 2)["train"]
    assert all(facts_of("x", row).pop() in corpus["student"] for row in shared)


def test_v1_recipes_keep_the_keys_docs_study_was_built_under():
    """The v2 fields stay out of a v1 recipe's params: the Family node keys of docs/study's families (seed 0
    and 1, computed by the code that built them, e2f6e96) and of the test family are unchanged at builder 1
    (family.BUILDER_VERSION; today's builder has keys of its own, test_family_fingerprint.py)."""
    from pkt.tasks import family as family_nodes

    def key(size, seed, testbed=None):
        return family_nodes.Family(size=size, recipe=family.recipe_params(size, seed, testbed, builder=1)).key({})

    assert key("study", 0, 1) == "9be4256ca20a1adffc9c0e541dc7312bc2d3195373358a88248c14d1146afab6"
    assert key("study", 1, 1) == "0c5a0515eb237e9a4845f9581f9bb953ca0410d08473555b4799d5f5ef5f99d9"
    assert key("test", None) == "16a5e6a0d5e175358c07e4421631e3e2c65b57284bcbc421b418e4192644ade8"
    assert key("study", 0) == key("study", 0, 1) != key("study", 0, 2)  # v1 stays the default (DEFAULT_TESTBED)
    v2 = family.recipe_params("study", 0, 2)
    assert v2["testbed"] == 2 and v2["reach_train"] and v2["thresholds"]["reach_gap"] == 0.3


def test_twin_recipes_are_growable_from_their_student():
    from pkt.core import arch, grow

    for seed in (0, 1):
        r = family.recipe("study", seed, testbed=2, twin=True)
        assert r.twin and r.testbed == 2 and r.student == family.recipe("study", seed).student
        small, big = (arch.dims(family.llama_config(m, r.testbed)) for m in (r.student, r.teacher))
        assert grow.width_factor(small, big) == 2 and big.layers > small.layers


def test_the_reachability_gate_is_measured_on_v2_recipes_only_and_can_fail():
    t = gates.Thresholds()
    assert gates.reach_gate(0.5, 0.1, t)["reachable/facts-teacher-only"]["passed"]
    failed = gates.reach_gate(0.3, 0.1, t)["reachable/facts-teacher-only"]
    assert not failed["passed"] and failed["value"] == 0.2 and failed["split"] == "gate"
    assert family.recipe("study", 0, 2).reach_train == family.REACH_TRAIN and family.recipe("test").reach_train is None
    assert family.recipe("study", 0).reach_train is None  # v1, the default: no reachability gate
    assert family.recipe("test", None, 2).reach_train == family.REACH_TRAIN


@pytest.mark.slow  # two LoRA runs of 128 steps on the test family (~1 min on 2 shared cores)
def test_the_oracle_measures_training_and_reaches_even_v1s_unseen_names(mini_family):
    """The reachability gate's oracle is training, not a constant: at lr 0 it scores as the untrained
    student. At the study's budget it puts the gate's teacher-only facts into the student even on a v1
    family, whose names are tokens the student never trained (issue 24 expected the gate to fail there;
    measured, it does not: at study size too, 0.03 -> 1.00 at 128 steps, 0.34 at 8)."""
    stats = json.loads((mini_family / "family_stats.json").read_text())
    student = stats["student"]["gate_exact_match"]["facts-teacher-only"]
    assert gates.oracle_score(mini_family, {**family.REACH_TRAIN, "lr": 0.0}) == student
    oracle = gates.oracle_score(mini_family, family.REACH_TRAIN)
    assert gates.reach_gate(oracle, student, gates.Thresholds())["reachable/facts-teacher-only"]["passed"]


def test_gates_are_computed_and_pass_on_the_test_family(mini_family):
    stats = json.loads((mini_family / "family_stats.json").read_text())
    assert set(stats["gates"]) >= {"teacher-above-student/facts-teacher-only", "teacher-above-student/gsm",
                                   "student-off-floor/gsm", "student-blind/facts-teacher-only", "headroom/gsm"}
    for name, g in stats["gates"].items():
        assert set(g) == {"value", "threshold", "passed", "split", "what"}, name
        assert g["passed"] is (g["value"] >= g["threshold"]), name
        assert g["passed"], (name, g)
    # the knowledge gate is real at this size too: the teacher knows most teacher-only facts
    assert stats["teacher"]["gate_exact_match"]["facts-teacher-only"] >= 0.5
    assert stats["student"]["gate_exact_match"]["facts-teacher-only"] <= 0.2
    lines = gates.gate_lines(stats)
    assert lines[0] == f"quality gates: all {len(stats['gates'])} passed" and len(lines) == len(stats["gates"]) + 1


def test_a_family_whose_gates_fail_says_so_loudly():
    t = gates.Thresholds()
    teacher = {"facts-teacher-only": 0.2, "facts-shared": 0.5, "gsm": 0.1}
    student = {"facts-teacher-only": 0.1, "facts-shared": 0.4, "gsm": 0.0}  # a teacher barely above: no testbed
    stats = {"gates": gates.gates(teacher, student, t)}
    assert gates.failed(stats) == ["teacher-above-student/facts-teacher-only", "teacher-above-student/gsm",
                                   "student-off-floor/gsm"]
    lines = gates.gate_lines(stats)
    assert lines[0].startswith("QUALITY GATES FAILED: 3 of 7") and "teacher-above-student/gsm" in lines[0]
    assert sum(line.lstrip().startswith("FAIL ") for line in lines) == 3
    assert gates.gate_lines({"teacher": {}})[0].startswith("quality gates: not measured")


def _old_random_draw(total, n, seed):
    """The selector before the fix: a permutation's first n layers."""
    return sorted(int(i) for i in torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n])


def test_random_layers_never_draws_transfers_plan():
    """Replays the degenerate draw: 3 teacher layers, a 2-layer student (3 plans); the old selector
    drew transfer's plan for some of 5 seeds, the fixed one never does, for any totals."""
    totals = [0.9, 0.2, 1.0]  # transfer's plan: layers 0 and 2
    transfer = align.select_layers(totals, 2)
    assert transfer == [0, 2]
    assert any(_old_random_draw(3, 2, seed) == transfer for seed in range(5))  # the case is real
    g = torch.Generator().manual_seed(0)
    for total, n in ((3, 2), (3, 1), (6, 2), (8, 4), (40, 32)):
        for _ in range(5):
            totals = torch.rand(total, generator=g).tolist()
            transfer = align.select_layers(totals, n)
            for seed in range(40):
                plan = align.select_layers(totals, n, "random", seed)
                assert plan != transfer and plan == sorted(set(plan)) and len(plan) == n
                assert 0 <= plan[0] and plan[-1] < total
    with pytest.raises(align.ShapeMismatch, match="one layer plan only"):
        align.select_layers([1.0, 2.0], 2, "random", 0)


def test_random_layers_is_uniform_over_the_other_plans():
    from scipy.stats import chisquare

    totals = [5.0, 1.0, 4.0, 2.0, 3.0, 0.5]
    transfer = tuple(align.select_layers(totals, 2))
    draws = [tuple(align.select_layers(totals, 2, "random", seed)) for seed in range(1400)]
    plans = [p for p in itertools.combinations(range(6), 2) if p != transfer]
    counts = [draws.count(p) for p in plans]
    assert sum(counts) == len(draws) and len(plans) == 14
    assert chisquare(counts).pvalue > 1e-3


def test_study_families_have_two_depth_ratios_with_many_layer_plans():
    from pkt.flows.study import FAMILY_SEEDS

    assert len(FAMILY_SEEDS) >= 8
    depths = {(r.teacher.layers, r.student.layers) for r in (family.recipe("study", s) for s in FAMILY_SEEDS)}
    assert len(depths) >= 2 and {math.comb(t, s) for t, s in depths} == {15, 28}
    for t, s in depths:
        totals = torch.rand(t, generator=torch.Generator().manual_seed(1)).tolist()
        assert len({tuple(align.select_layers(totals, s, "random", seed)) for seed in range(8)}) >= 5
    seeds_of = {fs: family.recipe("study", fs).seed for fs in FAMILY_SEEDS}
    assert len(set(seeds_of.values())) == len(FAMILY_SEEDS)  # independent families


def test_study_tasks_are_scorable_and_the_facts_tasks_share_their_training_data(mini_family):
    entries = tasks.study_tasks(mini_family)
    assert [e["name"] for e in entries] == ["facts-teacher-only", "facts-shared", "gsm"]
    for e in entries:
        assert e["benchmark"] in evaluate.BENCHMARKS
        for split in SPLITS:
            assert (mini_family / "tasks" / e["name"] / f"{split}.jsonl").is_file()
    facts = [mini_family / "tasks" / e["name"] for e in entries[:2]]
    for split in ("train", "seeds"):  # one file's bytes: the adapters of both facts tasks are the same nodes
        assert (facts[0] / f"{split}.jsonl").read_bytes() == (facts[1] / f"{split}.jsonl").read_bytes()


def test_scores_equal_lm_evals_simple_evaluate(mini_family):
    """pkt calls lm-eval's evaluate() directly (simple_evaluate's environment report costs ~0.8 s a
    score); per-example results are simple_evaluate's own."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from pkt.core.models import load_model, load_tokenizer

    model, tok = load_model(mini_family / "teacher"), load_tokenizer(mini_family / "teacher")
    for bench, task in (("gsm", "facts-teacher-only"), ("answer_nll", "gsm"), ("mmlu", "mmlu")):
        ours = evaluate.evaluate(model, tok, bench, mini_family / "tasks" / task, split="val", limit=6)
        cfg = evaluate.task_config(bench, mini_family / "tasks" / task, "val", 0,
                                   context=model.config.max_position_embeddings)  # as evaluate() caps generation
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=64, device="cpu"), tasks=[cfg],
                              task_manager=evaluate._task_manager(False), limit=6, log_samples=True, bootstrap_iters=0,
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        name = next(iter(out["results"]))
        ref = evaluate._collect(bench, out["results"][name], out["samples"][name], evaluate.BENCHMARKS[bench][2])
        # (pkt adds answer_nll per token beside lm-eval's metrics)
        assert {k: ours.summary[k] for k in ref.summary} == ref.summary and ours.outputs == ref.outputs, bench
        assert all(torch.equal(ours.per_example[k], ref.per_example[k]) for k in ref.per_example), bench


@pytest.mark.slow  # a test-size family built (~1 min alone, several on a loaded machine)
def test_a_twin_familys_teacher_starts_as_its_student_and_is_gated(tmp_path):
    """A twin family grows its teacher from the trained student (its logits equal the student's at the
    expansion step, on the family's own text), then pretrains it into a wider, deeper teacher. The v2
    recipe also measures the reachability gate."""
    from pkt.core import models

    stats = family.build_family(tmp_path, "test", log=lambda *_: None, progress=False, testbed=2, twin=True)
    assert stats["teacher"]["grown_max_dlogit"] <= 1e-4
    teacher, student = (models.load_config(tmp_path / m) for m in ("teacher", "student"))
    assert teacher.hidden_size == 2 * student.hidden_size and teacher.num_hidden_layers > student.num_hidden_layers
    assert stats["gates"]["reachable/facts-teacher-only"]["passed"]
    # not asserted: that the teacher then knows its teacher-only facts. On v2's two-piece names it knew 2 of
    # 16 here (and 6% at study size): the knowledge gate says so; see tokenizer.py
