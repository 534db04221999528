"""The report's statistics against numpy/scipy on fixed and synthetic tables, its wording, and the
issue-17 cases replayed: the pooled `setting`, the missing caveat in report.md, the size-matched
claim, the over-claims, empty chart panels and reused curve styles."""
import itertools
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pkt.core import report
from pkt.core import stats as pstats


def runs(values: dict[str, list[float]], metric="exact_match", task="gsm", student="s", family=None):
    rows = []
    for variant, vs in values.items():
        for seed, v in enumerate(vs):
            rows.append({"student": student, "task": task, "benchmark": task, "metric": metric, "variant": variant,
                         "seed": seed, "value": v, **({"family": family} if family is not None else {})})
    return pd.DataFrame(rows)


def test_mean_std_and_paired_interval_match_scipy():
    lora, transfer = [0.20, 0.30, 0.25, 0.28], [0.31, 0.36, 0.30, 0.41]
    s = report.summarize(runs({"lora": lora, "transfer": transfer})).set_index("variant")
    assert s.loc["transfer", "mean"] == pytest.approx(np.mean(transfer))
    assert s.loc["transfer", "std"] == pytest.approx(np.std(transfer, ddof=1))
    d = np.array(transfer) - np.array(lora)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert (s.loc["transfer", "ci_low"], s.loc["transfer", "ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert s.loc["transfer", "p_t"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    # the only comparison that carries a verdict here, so BH over m = 2 (transfer - lora, read both ways)
    assert s.loc["transfer", "verdict"] == "better than lora"


def test_no_gain_claimed_when_interval_includes_zero():
    s = report.summarize(runs({"lora": [0.2, 0.3, 0.25], "transfer": [0.3, 0.2, 0.27]})).set_index("variant")
    assert s.loc["transfer", "ci_low"] < 0 < s.loc["transfer", "ci_high"]
    assert s.loc["transfer", "verdict"] == "not distinguishable from lora (corrected interval includes 0)"


def test_lower_is_better_metrics_flip_the_wording():
    s = report.summarize(runs({"lora": [1.0, 1.1, 1.2], "transfer": [0.5, 0.6, 0.65]}, "answer_nll"))
    assert s.set_index("variant").loc["transfer", "verdict"] == "better than lora"


def test_a_sweep_without_lora_still_reports(tmp_path):
    paths = report.write_report(runs({"transfer": [0.4, 0.5], "vanilla": [0.1]}), tmp_path, "exact_match")
    assert "transfer 0.4500 (this sweep has no lora baseline to compare with)" in paths["markdown"].read_text()


def test_report_files(tmp_path):
    paths = report.write_report(runs({"lora": [0.2, 0.3, 0.25], "transfer": [0.4, 0.5, 0.45],
                                      "shuffled": [0.1, 0.2, 0.15]}), tmp_path, "exact_match")
    text = paths["markdown"].read_text()
    assert "transfer 0.4500 vs lora 0.2500 — better than lora" in text
    assert "transfer beats 1 of 1 controls (corrected interval of the paired difference excludes 0): shuffled" in text
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["protocol"].read_text()) == {}


def test_report_from_the_written_runs_csv_is_the_same(tmp_path):
    """The report node draws from runs.csv as stored: the round trip must not change a figure
    (nor read a task named "NA" as missing)."""
    table = runs({"lora": [0.2, 0.3, 0.25], "transfer": [0.4, 0.5, 0.45]}).assign(task="NA", top_sv=None)
    table.loc[table["variant"] == "transfer", "top_sv"] = 1.5
    direct = report.write_report(table, tmp_path / "direct", "exact_match")
    again = report.write_report(report.read_csv(direct["runs"]), tmp_path / "again", "exact_match")
    for name in ("markdown", "csv", "runs"):
        assert again[name].read_text() == direct[name].read_text(), name


def test_each_variant_is_reported_at_its_best_val_setting():
    val = []
    for variant, best in (("lora", '{"lr": 0.01}'), ("transfer", '{"lr": 0.001}')):
        for setting in ('{"lr": 0.01}', '{"lr": 0.001}'):
            for seed in (0, 1):
                val.append({"variant": variant, "setting": setting, "seed": seed,
                            "value": 0.9 if setting == best else 0.1})
    assert report.select_settings(pd.DataFrame(val), "exact_match") == {"lora": '{"lr": 0.01}',
                                                                         "transfer": '{"lr": 0.001}'}
    nll = pd.DataFrame(val).assign(value=lambda d: -d["value"])  # lower is better: the same picks
    assert report.select_settings(nll, "answer_nll") == {"lora": '{"lr": 0.01}', "transfer": '{"lr": 0.001}'}


# ---- paired inference against every control ---------------------------------------------------
def test_the_issue_case_is_not_counted_as_beaten():
    """transfer - spectrum-matched = +0.01, -0.01, +0.03 over three seeds: the interval includes 0."""
    table = runs({"lora": [0.10, 0.10, 0.10], "transfer": [0.31, 0.29, 0.33], "spectrum-matched": [0.30, 0.30, 0.30]})
    s = report.summarize(table).set_index("variant")
    d = np.array([0.01, -0.01, 0.03])
    lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    sm = s.loc["spectrum-matched"]
    assert (sm["transfer_diff"], sm["transfer_ci_low"], sm["transfer_ci_high"]) == (
        pytest.approx(d.mean()), pytest.approx(lo), pytest.approx(hi))
    assert sm["transfer_verdict"] == "not distinguishable from spectrum-matched (corrected interval includes 0)"
    lines = report.headline(s.reset_index(), "exact_match")
    # transfer beats lora, and so does spectrum-matched: the sentence says it is an init effect
    assert lines[1] == ("  1 of 1 other trained inits also beat lora (spectrum-matched): beating lora is an init "
                        "effect these share, not by itself evidence of the teacher's knowledge")
    assert lines[2] == ("  transfer beats 0 of 1 controls (corrected interval of the paired difference excludes 0); "
                        "not distinguishable from spectrum-matched")


def test_every_verdict_string_for_known_differences():
    """Controls at known paired differences from transfer: clearly above, clearly below, straddling 0;
    each verdict from the Benjamini-Hochberg-corrected interval over every comparison of the table."""
    transfer = np.array([0.50, 0.52, 0.48, 0.51, 0.49])
    offsets = {"shuffled": [0.10, 0.11, 0.09, 0.10, 0.12],            # transfer clearly better
               "random-submatrix": [-0.10, -0.12, -0.09, -0.11, -0.10],  # transfer clearly worse
               "spectrum-matched": [0.01, -0.01, 0.03, -0.02, 0.00],     # straddles 0
               "lora": [0.05, 0.06, 0.04, 0.05, 0.05]}
    table = runs({"transfer": list(transfer), **{v: list(transfer - np.array(o)) for v, o in offsets.items()},
                  "vanilla": [0.30]})
    s = report.summarize(table).set_index("variant")
    expected = {"shuffled": "better than shuffled", "random-submatrix": "worse than random-submatrix",
                "spectrum-matched": "not distinguishable from spectrum-matched (corrected interval includes 0)",
                "lora": "better than lora", "vanilla": "better than vanilla"}
    assert {v: s.loc[v, "transfer_verdict"] for v in expected} == expected
    assert s.loc["transfer", "verdict"] == "better than lora"
    for v, o in offsets.items():  # every interval is the t-interval of the known differences
        lo, hi = stats.t.interval(0.95, 4, loc=np.mean(o), scale=stats.sem(o))
        assert (s.loc[v, "transfer_ci_low"], s.loc[v, "transfer_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert s.loc[v, "transfer_pairing"] == report.PAIRED and s.loc[v, "transfer_pairs"] == 5
    assert s.loc["shuffled", "verdict"] == "worse than lora" and s.loc["random-submatrix", "verdict"] == "better than lora"
    assert s.loc["vanilla", "n"] == 1 and s.loc["vanilla", "transfer_pairing"] == report.FIXED
    assert s.loc["vanilla", "transfer_diff"] == pytest.approx(transfer.mean() - 0.30)
    lines = report.headline(s.reset_index(), "exact_match")
    assert lines == [
        f"s / gsm / exact_match: transfer 0.5000 vs lora 0.4500 — better than lora ({report._ci_text(s.loc['transfer'])})",
        "  2 of 3 other trained inits also beat lora (random-submatrix, spectrum-matched): beating lora is an init "
        "effect these share, not by itself evidence of the teacher's knowledge",
        "  transfer beats 1 of 3 controls (corrected interval of the paired difference excludes 0): shuffled; "
        "not distinguishable from spectrum-matched; worse than random-submatrix",
        f"  vs vanilla (one deterministic run, one-sample interval): better than vanilla "
        f"({report._ci_text(s.loc['vanilla'], 'transfer_')})"]


def test_lower_is_better_flips_control_verdicts():
    s = report.summarize(runs({"lora": [1.0, 1.1, 1.2], "transfer": [0.5, 0.6, 0.65], "shuffled": [0.9, 1.0, 1.1]},
                              "answer_nll")).set_index("variant")
    assert s.loc["shuffled", "transfer_verdict"] == "better than shuffled"
    assert s.loc["lora", "transfer_verdict"] == "better than lora"


def test_one_seed_gives_no_verdict():
    s = report.summarize(runs({"lora": [0.1], "transfer": [0.5], "shuffled": [0.2]})).set_index("variant")
    assert s.loc["shuffled", "transfer_verdict"] == "n/a (fewer than 2 units)"


@pytest.mark.parametrize("diffs", [[0.01, -0.01, 0.03], [0.2, 0.3, 0.1, 0.25, 0.15], [1.0, -1.0, 2.0, -2.0],
                                   [0.1, 0.1, 0.1]])
def test_sign_flip_p_matches_brute_force_and_scipy(diffs):
    d = np.array(diffs)
    brute = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12 for s in itertools.product((1, -1), repeat=d.size)])
    assert report.sign_flip_p(d) == pytest.approx(brute)
    sp = stats.permutation_test((d,), np.mean, permutation_type="samples", alternative="two-sided", n_resamples=10**6)
    assert report.sign_flip_p(d) == pytest.approx(sp.pvalue)


def test_summary_csv_carries_every_comparison(tmp_path):
    paths = report.write_report(runs({"lora": [0.2, 0.3, 0.25], "transfer": [0.4, 0.5, 0.45],
                                      "shuffled": [0.1, 0.2, 0.15], "vanilla": [0.05]}), tmp_path, "exact_match")
    summary = report.read_csv(paths["csv"])
    for col in report.COMPARISON_COLUMNS + report.TRANSFER_COLUMNS:
        assert col in summary, col
    text = paths["comparisons"].read_text()  # the full listing moved out of the one-screen report.md
    assert "| shuffled |" in text and "better than shuffled" in text and "sign-flip" in text


def test_overview_marks_follow_the_corrected_intervals(tmp_path):
    table = runs({"lora": [0.10, 0.10, 0.10], "transfer": [0.31, 0.29, 0.33], "spectrum-matched": [0.30, 0.30, 0.30],
                  "shuffled": [0.40, 0.41, 0.42]})
    lines = report.overview(report.summarize(table), "exact_match").splitlines()
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].rstrip(" |") for line in lines[2:]}
    assert cells["lora"].endswith("▲") and cells["shuffled"].endswith("▼") and cells["transfer"] == "0.310"
    assert cells["spectrum-matched"] == "0.300; T−X +0.0100 [-0.0397, +0.0597]"  # no mark: includes 0
    text = report.write_report(table, tmp_path, "exact_match")["markdown"].read_text()
    assert "## Overview" in text and cells["spectrum-matched"] in text


# ---- issue 17, replayed -----------------------------------------------------------------------------
def two_settings_per_seed():
    """The quoted case: a runs table with two settings per seed (5 seeds, 2 settings)."""
    rows = []
    for variant, base in (("lora", 0.20), ("transfer", 0.25)):
        for seed in range(5):
            for setting, shift in (('{"lr": 0.003}', 0.0), ('{"lr": 0.01}', 0.02)):
                rows.append({"student": "s", "task": "gsm", "benchmark": "gsm", "metric": "acc", "variant": variant,
                             "seed": seed, "setting": setting, "value": base + shift + 0.01 * seed})
    return pd.DataFrame(rows)


def test_a_runs_table_with_two_settings_per_seed_is_refused():
    """It used to be pooled into n = 10 'pairs' from 5 seeds."""
    with pytest.raises(report.RunsTableError, match=r"lora has seed 0 2 times .*settings \{\"lr\": 0.003\}, "
                                                    r"\{\"lr\": 0.01\}.*keep one setting per variant"):
        report.summarize(two_settings_per_seed())
    one = two_settings_per_seed().query("setting == '{\"lr\": 0.01}'")
    assert report.summarize(one).set_index("variant").loc["transfer", "pairs"] == 5


def test_pkt_report_refuses_the_pooled_table(tmp_path, capsys):
    from pkt.flows import cli

    two_settings_per_seed().to_csv(tmp_path / "runs.csv", index=False)
    assert cli.main(["report", "--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pkt report: error: runs table: lora has seed 0 2 times") and "\n" not in err
    assert not (tmp_path / "r" / "report.md").exists()


SMOKE = "This is a smoke-size run (test family): it shows the pipeline works, not whether transfer helps."


def protocol_fixture():
    gates = {"teacher_above_student": {"value": 0.62, "threshold": 0.3, "passed": True, "split": "gate",
                                       "what": "teacher minus student exact match"},
             "lora_headroom": {"value": 0.04, "threshold": 0.1, "passed": False, "split": "gate",
                               "what": "teacher minus lora"}}
    return {"scale": SMOKE, "families": {"family-0": {"teacher": {"params": 1000, "steps": 40}, "gates": gates}},
            "grids": {"lora": [{"lr": 0.001, "alpha": 8}, {"lr": 0.001, "alpha": 32}, {"lr": 0.01, "alpha": 8},
                               {"lr": 0.01, "alpha": 32}],
                      "transfer": [{"lr": lr, "init_scale": s} for lr in (0.001, 0.01) for s in (1.0, 2.0)]},
            "selection_seeds": [100], "test_seeds": [0, 1, 2]}


def test_the_families_left_out_by_their_gates_are_named_with_the_gates_they_failed():
    protocol = {**protocol_fixture(), "excluded": {"family-10": ["headroom/gsm"],
                                                   "family-2": ["student-off-floor/gsm", "headroom/facts-shared"]}}
    text = "\n".join(report.scale_section(runs({"lora": [0.2, 0.3]}), protocol))
    assert ("2 candidate families were left out: family-2 (student-off-floor/gsm, headroom/facts-shared); "
            "family-10 (headroom/gsm).") in text
    assert "left out" not in "\n".join(report.scale_section(runs({"lora": [0.2, 0.3]}), protocol_fixture()))


def test_report_md_carries_the_caveat_gates_test_size_steps_and_protocol(tmp_path):
    table = runs({"lora": [0.2, 0.3, 0.25], "transfer": [0.4, 0.5, 0.45]}).assign(n_items=128, steps=16)
    table["setting"] = np.where(table["variant"] == "lora", '{"alpha": 32, "lr": 0.001}',
                                '{"init_scale": 1.0, "lr": 0.01}')
    selection = pd.DataFrame([{"student": "s", "task": "gsm", "variant": v, "setting": json.dumps(p, sort_keys=True),
                               "seed": 100, "metric": "answer_nll", "value": 1.0}
                              for v, ps in protocol_fixture()["grids"].items() for p in ps])
    paths = report.write_report(table, tmp_path, "exact_match", selection=selection, protocol=protocol_fixture())
    text, listing = paths["markdown"].read_text(), paths["comparisons"].read_text()
    assert SMOKE in text
    assert "test set: gsm · gsm: 128 items" in text and "optimizer steps per training run: 16" in text
    gates = report.gate_lines(protocol_fixture()["families"]["family-0"])  # the family's renderer, or pkt's own
    assert gates and all(line.strip() in listing for line in gates)  # each family's gates: comparisons.md
    block = listing[listing.index("- family-0"):listing.index("## Every comparison")]
    for name, value, threshold in (("teacher_above_student", "0.62", "0.3"), ("lora_headroom", "0.04", "0.1")):
        assert name in block and value in block and threshold in block
    assert "fail" in block.lower()
    assert "**Quality gates failed in 1 of 1 families (family-0)**" in text
    assert "every trained variant has 4 settings" in text
    assert "test runs use seeds [0, 1, 2], which chose nothing" in text
    # both chosen settings sit on an edge of their grid: flagged
    assert "lora: alpha [8, 32] × lr [0.001, 0.01]; transfer: init_scale [1.0, 2.0] × lr [0.001, 0.01]" in text
    assert "⚠ alpha 32 is the highest of [8, 32]; lr 0.001 is the lowest of [0.001, 0.01]" in listing
    assert "⚠ init_scale 1 is the lowest of [1.0, 2.0]; lr 0.01 is the highest of [0.001, 0.01]" in listing
    assert "chosen settings: 2 (task × variant × setting), 2 of them on an edge of their grid" in text
    # the report node's bytes follow its key (canonical JSON): the protocol's dict order changes nothing
    shuffled = {k: protocol_fixture()[k] for k in reversed(list(protocol_fixture()))}
    shuffled["grids"] = {v: [dict(reversed(list(p.items()))) for p in ps]
                         for v, ps in reversed(shuffled["grids"].items())}
    again = report.write_report(table, tmp_path / "again", "exact_match", selection=selection, protocol=shuffled)
    assert again["markdown"].read_text() == text
    assert text.index("## Primary endpoint") < text.index("## Scale") < text.index("## Protocol")
    assert "## What survives correction" in text


def test_the_report_warns_when_selection_seeds_are_scored_on_test(tmp_path):
    table = runs({"lora": [0.2, 0.3, 0.25], "transfer": [0.4, 0.5, 0.45]})
    selection = pd.DataFrame([{"student": "s", "task": "gsm", "variant": "lora", "setting": "{}", "seed": 1,
                               "metric": "acc", "value": 0.3}])
    text = report.write_report(table, tmp_path, "exact_match", selection=selection)["markdown"].read_text()
    assert "WARNING: seeds [1] both chose settings and are scored on test" in text


def test_size_matched_only_within_the_tolerance(tmp_path):
    """untrained-teacher's measured size is 0.3x transfer's: never called size-matched (the quoted
    report listed it among 'inits of the same size')."""
    table = runs({"lora": [0.2, 0.3, 0.25], "transfer": [0.4, 0.5, 0.45], "spectrum-matched": [0.4, 0.45, 0.5],
                  "untrained-teacher": [0.3, 0.3, 0.35]})
    table["top_sv"] = table["variant"].map({"transfer": 1.0, "spectrum-matched": 1.04, "untrained-teacher": 0.3})
    lines = report.knowledge_vs_size(report.summarize(table), "exact_match")
    assert "vs spectrum-matched (σ₁ 1.04× transfer's: size-matched)" in lines[0]
    assert "vs untrained-teacher (σ₁ 0.30× transfer's: NOT size-matched)" in lines[0]
    text = report.write_report(table, tmp_path, "exact_match")["markdown"].read_text()
    assert "inits of the same size" not in text and "within ±10% of transfer's" in text


def family_table(effects: dict[str, list[float]], seeds=6, metric="acc", seed=0):
    """Families as a random effect: variant means shift per family by the given effect, plus seed noise."""
    rng = np.random.default_rng(seed)
    parts = []
    for f in range(len(next(iter(effects.values())))):
        base = rng.normal(0.4, 0.05)
        values = {v: list(base + eff[f] + rng.normal(0, 0.02, seeds)) for v, eff in effects.items()}
        parts.append(runs(values, metric, task="facts", student=f"family-{f}-student", family=f"family-{f}"))
    return pd.concat(parts, ignore_index=True)


def test_families_are_the_units_of_the_verdict():
    """Per-family paired differences, then a t-interval over family means; per-family rows descriptive."""
    t = family_table({"lora": [0] * 8, "transfer": [0.05, 0.02, 0.08, 0.01, 0.04, 0.06, 0.03, 0.05],
                      "shuffled": [0.0, 0.01, -0.01, 0.02, 0.0, 0.01, -0.02, 0.01]})
    s = report.summarize(t)
    pooled = s[s["student"] == report.POOLED].set_index("variant")
    fam_diffs = []
    for f, g in t.groupby("family"):
        a = g[g["variant"] == "transfer"].set_index("seed")["value"]
        b = g[g["variant"] == "shuffled"].set_index("seed")["value"]
        fam_diffs.append((a - b).mean())
    d = np.array(fam_diffs)
    assert pooled.loc["shuffled", "transfer_diff"] == pytest.approx(d.mean())
    assert (pooled.loc["shuffled", "transfer_ci_low"], pooled.loc["shuffled", "transfer_ci_high"]) == pytest.approx(
        stats.t.interval(0.95, 7, loc=d.mean(), scale=stats.sem(d)))
    assert pooled.loc["shuffled", "transfer_p_t"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    assert pooled.loc["shuffled", "transfer_pairs"] == 8
    per_family = s[s["student"] != report.POOLED]
    assert set(per_family["transfer_test"].dropna()) - {""} == {"descriptive (one family of several)"}
    assert set(per_family["transfer_verdict"].dropna()) <= {""}  # no per-family claims


def test_holm_on_the_primary_and_bh_on_the_rest():
    t = family_table({"lora": [0] * 8, "transfer": [0.05, 0.02, 0.08, 0.01, 0.04, 0.06, 0.03, 0.05],
                      "spectrum-matched": [0.01, 0.0, 0.05, -0.01, 0.02, 0.03, 0.0, 0.04],
                      "shuffled": [0.0, 0.01, -0.01, 0.02, 0.0, 0.01, -0.02, 0.01],
                      "pissa": [0.03, 0.0, 0.04, 0.02, 0.03, 0.05, 0.01, 0.02]})
    endpoint = {"metric": "acc", "tasks": None, "alpha": 0.05,
                "comparisons": [{"subject": "transfer", "control": "spectrum-matched"},
                                {"subject": "transfer", "control": "shuffled"}]}
    s = report.summarize(t, endpoint)
    pooled = s[s["student"] == report.POOLED].set_index("variant")
    primary = [pooled.loc[c, "transfer_p_t"] for c in ("spectrum-matched", "shuffled")]
    adj, reject, local = pstats.holm(primary)
    assert [pooled.loc[c, "transfer_p_adj"] for c in ("spectrum-matched", "shuffled")] == pytest.approx(adj)
    assert {pooled.loc[c, "transfer_test"] for c in ("spectrum-matched", "shuffled")} == {"Holm (primary, m = 2)"}
    rest = [(v, p) for p in ("", "transfer_") for v in pooled.index if (v, p) != ("lora", "transfer_")
            and not pd.isna(pooled.loc[v, p + "p_t"]) and not str(pooled.loc[v, p + "test"]).startswith("Holm")]
    assert len(rest) == 5  # 4 variants - lora, transfer - pissa (transfer - lora is tested once)
    adj, reject, local = pstats.bh([pooled.loc[v, p + "p_t"] for v, p in rest])
    assert [pooled.loc[v, p + "p_adj"] for v, p in rest] == pytest.approx(adj)
    assert [pooled.loc[v, p + "level"] for v, p in rest] == pytest.approx(1 - local)
    assert pooled.loc["pissa", "transfer_test"] == "BH (m = 5)"
    assert pooled.loc["lora", "transfer_p_adj"] == pooled.loc["transfer", "p_adj"]  # the same test, shown twice


def test_the_endpoint_comes_first_with_bootstrap_and_power(tmp_path):
    t = family_table({"lora": [0] * 8, "transfer": [0.05, 0.02, 0.08, 0.01, 0.04, 0.06, 0.03, 0.05],
                      "spectrum-matched": [0.01, 0.0, 0.05, -0.01, 0.02, 0.03, 0.0, 0.04],
                      "shuffled": [0.0, 0.01, -0.01, 0.02, 0.0, 0.01, -0.02, 0.01]}, seeds=6)
    rng = np.random.default_rng(1)
    items = pd.concat([t.assign(item=i, value=(rng.uniform(size=len(t)) < t["value"]).astype(float))
                       for i in range(20)], ignore_index=True)
    endpoint = {"metric": "acc", "tasks": ["facts"], "alpha": 0.05,
                "comparisons": [{"subject": "transfer", "control": "spectrum-matched"},
                                {"subject": "transfer", "control": "shuffled"}]}
    text = report.write_report(t, tmp_path, "acc", items=items, protocol={"endpoint": endpoint})["markdown"].read_text()
    head = text[text.index("## Primary endpoint"):text.index("## Scale")]
    # the first screen (every arm on the endpoint) comes before the endpoint's tests
    assert text.startswith("# pkt report\n") and text.index("| transfer | the method") < text.index("## Primary")
    assert head.startswith("## Primary endpoint (declared in the config before the data)")
    assert "comparisons: transfer − spectrum-matched, transfer − shuffled" in head
    rows = [line for line in head.splitlines() if line.startswith("| transfer − ")]
    assert len(rows) == 2 and all("8 families" in r and "items/unit" in r for r in rows)
    assert head.count("power (transfer − ") == 2 and "80% power at α = 0.025" in head
    assert (tmp_path / "items.csv").exists()


def test_the_bootstrap_in_the_report_is_the_one_over_families_seeds_and_items():
    t = family_table({"lora": [0] * 3, "transfer": [0.05, 0.02, 0.08]}, seeds=3)
    items = pd.concat([t.assign(item=i, value=t["value"] + 0.01 * i) for i in range(4)], ignore_index=True)
    s = report.summarize(t)
    r = s[(s["student"] == report.POOLED) & (s["variant"] == "transfer")].iloc[0]
    tables = report._item_tables(items, r, "")
    assert [x.shape for x in tables] == [(3, 4)] * 3
    for f, x in zip(sorted(t["family"].unique()), tables):
        g = t[t["family"] == f].pivot(index="seed", columns="variant", values="value")
        assert x == pytest.approx(np.repeat((g["transfer"] - g["lora"]).to_numpy()[:, None], 4, axis=1))


def test_no_empty_panel_and_differences_on_their_own_axis():
    """The all-zero group (exact match 0 everywhere) draws no panel; the others draw means and both
    difference panels."""
    zero = runs({"lora": [0.0, 0.0, 0.0], "transfer": [0.0, 0.0, 0.0], "shuffled": [0.0, 0.0, 0.0]}, "exact_match")
    nll = runs({"lora": [1.5, 1.6, 1.55], "transfer": [1.45, 1.52, 1.5], "shuffled": [1.5, 1.58, 1.52]}, "answer_nll")
    panels = report.chart_panels(report.summarize(pd.concat([zero, nll], ignore_index=True)))
    assert [(title.split(": ")[1], kind) for title, kind, _ in panels] == [
        ("mean ± std", "means"), ("transfer − variant", "transfer_"), ("variant − lora", "")]
    assert all("answer_nll" in title for title, _, _ in panels)


def test_chart_colours_say_better_or_worse(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def record(self, *args, **kwargs):
        drawn.append(kwargs.get("color"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    table = runs({"lora": [1.0, 1.1, 1.2, 1.1, 1.0], "transfer": [0.5, 0.6, 0.65, 0.55, 0.5],
                  "shuffled": [0.3, 0.35, 0.4, 0.3, 0.35]}, "answer_nll")
    report.bar_chart(report.summarize(table), tmp_path / "r.png")
    # transfer - lora < 0 on NLL: better (green); transfer - shuffled > 0: worse (red)
    assert "tab:green" in drawn and "tab:red" in drawn


def test_thirteen_variants_get_distinct_curve_styles():
    variants = ["vanilla", "lora", "transfer", "pissa", "random-submatrix", "random-layers", "cross-task",
                "untrained-teacher", "spectrum-matched", "shuffled", "early-teacher", "laten", "rowcol", "extra"]
    styles = report.curve_styles(variants)
    assert len({(s["color"], s["linestyle"]) for s in styles.values()}) == len(variants)


def test_pkt_report_rebuilds_from_the_report_directory(tmp_path, capsys):
    """runs.csv with its protocol.json, selection.csv and items.csv beside it: the same report.md."""
    from pkt.flows import cli

    t = family_table({"lora": [0] * 3, "transfer": [0.05, 0.02, 0.08], "shuffled": [0.01, 0.0, 0.02]}, seeds=3)
    items = pd.concat([t.assign(item=i, value=t["value"] + 0.01 * i) for i in range(4)], ignore_index=True)
    endpoint = {"metric": "acc", "tasks": None, "alpha": 0.05, "comparisons": [{"subject": "transfer",
                                                                                "control": "shuffled"}]}
    first = report.write_report(t, tmp_path / "a", "acc", items=items, protocol={"endpoint": endpoint, "scale": SMOKE})
    assert cli.main(["report", "--runs", str(first["runs"]), "--out", str(tmp_path / "b"), "--metric", "acc"]) == 0
    assert (tmp_path / "b" / "report.md").read_text() == first["markdown"].read_text()
    assert "bootstrap" in first["markdown"].read_text() and SMOKE in first["markdown"].read_text()


def test_pkt_report_reads_the_per_item_scores_gzipped_as_docs_study_keeps_them(tmp_path, capsys):
    """docs/study/ commits items.csv.gz (8 families' per-item scores: 28 MB as CSV, 0.7 MB gzipped):
    the report rebuilt from it equals the one from items.csv, bootstrap included."""
    import gzip
    import shutil

    from pkt.flows import cli

    t = family_table({"lora": [0] * 3, "transfer": [0.05, 0.02, 0.08], "shuffled": [0.01, 0.0, 0.02]}, seeds=3)
    items = pd.concat([t.assign(item=i, value=t["value"] + 0.01 * i) for i in range(4)], ignore_index=True)
    endpoint = {"metric": "acc", "tasks": None, "alpha": 0.05, "comparisons": [{"subject": "transfer",
                                                                                "control": "shuffled"}]}
    first = report.write_report(t, tmp_path / "a", "acc", items=items, protocol={"endpoint": endpoint, "scale": SMOKE})
    plain = tmp_path / "a" / "items.csv"
    with open(plain, "rb") as src, gzip.open(plain.with_name("items.csv.gz"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()
    assert cli.main(["report", "--runs", str(first["runs"]), "--out", str(tmp_path / "b"), "--metric", "acc"]) == 0
    text = (tmp_path / "b" / "report.md").read_text()
    assert text == first["markdown"].read_text() and "items/unit" in text


def laten_table(took: list[int]) -> pd.DataFrame:
    """lora and laten test runs; laten's translators trained until their val CE moved, in `took` steps."""
    table = runs({"lora": [0.2, 0.3, 0.25], "laten": [0.2, 0.25, 0.3]})
    table["translator_steps"] = np.nan
    table.loc[table["variant"] == "laten", "translator_steps"] = took
    return table


def test_the_protocol_line_says_laten_trained_until_its_val_ce_moved():
    """LaTen with until_moved has a grid `step` of [0] (flows/config.py LatenSpec.points): the protocol line
    printed 'step [0]'; it prints the rule (the protocol's `laten`) and the steps the test runs took."""
    grids = {"lora": [{"alpha": 32.0, "lr": lr} for lr in (0.001, 0.01)],
             "laten": [{"rate": r, "step": 0} for r in (0.05, 0.1)]}
    table = laten_table([2, 8, 3])
    line = next(x for x in report.protocol_section(table, None, {"grids": grids, "laten": {"until_moved": 1e-3,
                                                                                           "max_steps": 80}})
                if x.startswith("- grids"))
    assert line.endswith("lora: alpha [32.0] × lr [0.001, 0.01]; laten: rate [0.05, 0.1] × translator steps: until "
                         "its val answer CE moves by 0.001 nats, at most 80 (the test runs took 2-8)")
    assert "step [0]" not in line
    # a protocol without the rule says so; a grid of step counts prints them as any axis
    bare = "\n".join(report.protocol_section(laten_table([5, 5, 5]), None, {"grids": grids}))
    assert ("rate [0.05, 0.1] × translator steps: until its val answer CE moves (the threshold and cap are not in "
            "this report's protocol) (the test runs took 5)") in bare
    counted = {**grids, "laten": [{"rate": 0.1, "step": s} for s in (10, 20)]}
    assert "laten: rate [0.1] × step [10, 20]" in "\n".join(report.protocol_section(table, None, {"grids": counted}))
