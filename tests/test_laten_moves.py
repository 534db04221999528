"""LaTen's translator trained until its val loss moves (laten.LatenParams.until_moved), on the test family:
the stopping rule against the logged val losses, and the val loss against an independent recomputation."""
import copy

import pytest
import torch

from pkt.core import data, laten, models

TASK = "facts-teacher-only"


@pytest.fixture(scope="module")
def setup(mini_family):
    teacher, student = models.load_model(mini_family / "teacher"), models.load_model(mini_family / "student")
    tok = models.load_tokenizer(mini_family / "student")
    rows = data.read_jsonl(mini_family / "tasks" / TASK / "train.jsonl")
    extract_i, align_i, pool = laten.splits(len(rows), 2, 4, 0)
    enc = lambda i: data.encode(data.to_samples([rows[i]], tok, "paper")[0], tok, 64, f"line {i}")  # noqa: E731

    def attr(model, i):
        sample = data.to_samples([rows[i]], tok, "paper")[0]
        ids, target = laten.target_example(sample, tok)
        return laten.attribute(model, ids, target)

    extract = [{"encoded": enc(i), "t_attr": attr(teacher, i), "s_attr": attr(student, i)} for i in extract_i]
    val = [enc(i) for i in laten.val_lines(pool, 0, 4)]
    return teacher, student, extract, [enc(i) for i in align_i], val


def _train(setup, **kw):
    teacher, student, extract, align, val = setup
    params = laten.LatenParams(rate=0.25, align_per_step=2, reference_width=(5120, 4096), **kw)
    states, report = {}, {}
    log = laten.train_translator(teacher.state_dict(), teacher.config, copy.deepcopy(student), extract, align, params,
                                 on_step=lambda k, s: states.__setitem__(k, s), progress=False, val=val, report=report)
    return log, report, states, params


def _val_ce_by_hand(setup, params, state):
    """The student's mean answer CE on val with the translator's update merged into its weights (make_delta,
    apply_delta: the path a score takes), through the pairs of the first extract sample."""
    teacher, student, extract, _, val = setup
    k = laten.counts(student.config, params.rate)
    pairs = laten.locate(extract[0]["t_attr"], extract[0]["s_attr"], k, params.modules)
    vectors = laten.teacher_vectors(teacher.state_dict(), teacher.config, pairs)
    tr = laten.Translator(params.modules, *_widths(teacher, student))
    tr.load_state_dict(state)
    merged = copy.deepcopy(student)
    with torch.no_grad():
        laten.apply_delta(merged, laten.make_delta(tr, pairs, vectors, student.config))
        ces = [torch.nn.functional.cross_entropy(merged(input_ids=s["input_ids"]).logits[0, :-1],
                                                 s["labels"][0, 1:], ignore_index=-100) for s in val]
    return float(sum(ces) / len(ces))


def _widths(teacher, student):
    return teacher.config.hidden_size, student.config.hidden_size


def test_the_authors_pass_is_unchanged_without_until_moved(setup):
    log, report, _, _ = _train(setup)
    assert len(log) == 2 and report == {} and "val_ce" not in log[0]


def test_training_stops_at_the_first_step_whose_val_loss_moved(setup):
    log, report, states, params = _train(setup, until_moved=1e-4, max_steps=12)
    start, threshold = report["val_start"], report["threshold"]
    moved = [abs(s["val_ce"] - start) > threshold for s in log]
    assert report["steps"] == len(log) == len(states)
    if report["moved_at"] is None:
        assert len(log) == 12 and not any(moved)  # the cap
    else:  # stopped at the first step past the threshold, not before, not after
        assert moved.index(True) + 1 == report["moved_at"] == len(log)
    # the logged val losses are the student's with the update merged in, recomputed by another path
    init = laten.Translator(params.modules, *_widths(*setup[:2]), params.seed,
                            params.at_width(*_widths(*setup[:2]))[0]).state_dict()
    assert start == pytest.approx(_val_ce_by_hand(setup, params, init), abs=1e-5)
    assert log[-1]["val_ce"] == pytest.approx(_val_ce_by_hand(setup, params, states[len(log)]), abs=1e-5)


def test_a_threshold_never_reached_runs_to_the_cap_and_a_zero_one_stops_at_once(setup):
    log, report, _, _ = _train(setup, until_moved=10.0, max_steps=5)
    assert len(log) == 5 and report["moved_at"] is None  # extract samples taken again past the first pass
    log, report, _, _ = _train(setup, until_moved=1e-12, max_steps=5)
    assert report["moved_at"] == 1 == len(log)


def test_until_moved_needs_val_samples(setup):
    teacher, student, extract, align, _ = setup
    with pytest.raises(laten.LatenError, match="val samples"):
        laten.train_translator(teacher.state_dict(), teacher.config, copy.deepcopy(student), extract, align,
                               laten.LatenParams(rate=0.25, until_moved=1e-3), progress=False)


def test_val_lines_leave_out_the_transfer_sample_and_the_fields_keep_old_keys():
    _, _, pool = laten.splits(40, 5, 10, 0)
    val = laten.val_lines(pool, 3, 8)
    assert len(val) == 8 and laten.seed_sample(pool, 3) not in val and set(val) <= set(pool)
    assert "until_moved" not in laten.LatenParams().as_dict()  # translators stored before keep their keys
    p = laten.LatenParams(until_moved=1e-3, max_steps=40)
    assert laten.LatenParams.from_dict(p.as_dict()) == p and p.step_budget(20) == 40
    assert laten.LatenParams(until_moved=1e-3).step_budget(20) == 160 and laten.LatenParams().step_budget(20) == 20


@pytest.mark.slow  # a sweep through Prefect: ~1-2 min on 2 loaded cores
def test_a_sweep_records_the_steps_the_translator_took_and_the_inert_flag(prefect_env, mini_family, tmp_path):
    import pandas as pd

    from pkt.artifacts.store import Ref, Store
    from pkt.flows.sweep import sweep
    from test_laten_flow import laten_config

    spec = {"n_extract": 2, "n_align": 4, "align_per_step": 2, "until_moved": 1e-3, "max_steps": 6, "n_val": 4,
            "reference_width": [5120, 4096]}
    cfg = laten_config(mini_family, tmp_path, ["vanilla", "lora", "laten"], seeds=[0], laten=spec)
    out = sweep(cfg)
    store = Store(tmp_path / "store")
    (key,) = [key for kind, key, _ in out["nodes"] if kind == "laten_translator"]
    rec = store.record("laten_translator", key)
    log = __import__("json").loads((store.tree(Ref.of({"kind": "laten_translator", "key": key,
                                                        "digest": rec["digest"]})) / "translator_log.json").read_text())
    steps, moved_at = len(log["steps"]), log["val"]["moved_at"]
    assert 1 <= steps <= 6 and (moved_at == steps or (moved_at is None and steps == 6))
    runs = pd.read_csv(out["report"]["runs"])
    row = runs[runs["variant"] == "laten"].iloc[0]
    assert row["translator_steps"] == steps  # the update is the last step the translator took
    assert row["inert"] == (abs(row["val_nll_moved"]) < laten.INERT_NLL)
