"""The report's statistics against numpy/scipy on fixed numbers, and its wording."""
import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pkt.core import report


def runs(values: dict[str, list[float]], metric="exact_match"):
    rows = []
    for variant, vs in values.items():
        for seed, v in enumerate(vs):
            rows.append({"student": "s", "task": "gsm", "benchmark": "gsm", "metric": metric, "variant": variant,
                         "seed": seed, "value": v})
    return pd.DataFrame(rows)


def test_mean_std_and_paired_interval_match_scipy():
    lora, transfer = [0.20, 0.30, 0.25, 0.28], [0.31, 0.36, 0.30, 0.41]
    s = report.summarize(runs({"lora": lora, "transfer": transfer})).set_index("variant")
    assert s.loc["transfer", "mean"] == pytest.approx(np.mean(transfer))
    assert s.loc["transfer", "std"] == pytest.approx(np.std(transfer, ddof=1))
    d = np.array(transfer) - np.array(lora)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert (s.loc["transfer", "ci_low"], s.loc["transfer", "ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert s.loc["transfer", "verdict"] == "better than lora"


def test_no_gain_claimed_when_interval_includes_zero():
    s = report.summarize(runs({"lora": [0.2, 0.3, 0.25], "transfer": [0.3, 0.2, 0.27]})).set_index("variant")
    assert s.loc["transfer", "ci_low"] < 0 < s.loc["transfer", "ci_high"]
    assert s.loc["transfer", "verdict"] == "not distinguishable from lora (interval includes 0)"


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
    assert "transfer beats 1 of 1 controls (95% interval of the paired difference excludes 0): shuffled" in text
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


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
    assert sm["transfer_verdict"] == "not distinguishable from spectrum-matched (interval includes 0)"
    lines = report.headline(s.reset_index(), "exact_match")
    assert lines[1] == ("  transfer beats 0 of 1 controls (95% interval of the paired difference excludes 0); "
                        "not distinguishable from spectrum-matched")


def test_every_verdict_string_for_known_differences():
    """Controls at known paired differences from transfer: clearly above, clearly below, straddling 0."""
    transfer = np.array([0.50, 0.52, 0.48, 0.51, 0.49])
    offsets = {"shuffled": [0.10, 0.11, 0.09, 0.10, 0.12],            # transfer clearly better
               "random-submatrix": [-0.10, -0.12, -0.09, -0.11, -0.10],  # transfer clearly worse
               "spectrum-matched": [0.01, -0.01, 0.03, -0.02, 0.00],     # straddles 0
               "lora": [0.05, 0.06, 0.04, 0.05, 0.05]}
    table = runs({"transfer": list(transfer), **{v: list(transfer - np.array(o)) for v, o in offsets.items()},
                  "vanilla": [0.30]})
    s = report.summarize(table).set_index("variant")
    expected = {"shuffled": "better than shuffled", "random-submatrix": "worse than random-submatrix",
                "spectrum-matched": "not distinguishable from spectrum-matched (interval includes 0)",
                "lora": "better than lora", "vanilla": "better than vanilla"}
    assert {v: s.loc[v, "transfer_verdict"] for v in expected} == expected
    assert s.loc["transfer", "verdict"] == "better than lora"
    for v, o in offsets.items():  # every interval is the t-interval of the known differences
        lo, hi = stats.t.interval(0.95, 4, loc=np.mean(o), scale=stats.sem(o))
        assert (s.loc[v, "transfer_ci_low"], s.loc[v, "transfer_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert s.loc[v, "transfer_pairing"] == report.PAIRED and s.loc[v, "transfer_pairs"] == 5
    # each variant against lora too
    assert s.loc["shuffled", "verdict"] == "worse than lora" and s.loc["random-submatrix", "verdict"] == "better than lora"
    # vanilla is one run: compared as a fixed value, said so
    assert s.loc["vanilla", "n"] == 1 and s.loc["vanilla", "transfer_pairing"] == report.FIXED
    assert s.loc["vanilla", "transfer_diff"] == pytest.approx(transfer.mean() - 0.30)
    lines = report.headline(s.reset_index(), "exact_match")
    assert lines == [
        f"s / gsm / exact_match: transfer 0.5000 vs lora 0.4500 — better than lora ({report._ci_text(s.loc['transfer'])})",
        "  transfer beats 1 of 3 controls (95% interval of the paired difference excludes 0): shuffled; "
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
    assert s.loc["shuffled", "transfer_verdict"] == "n/a (fewer than 2 paired seeds)"


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
    text = paths["markdown"].read_text()
    assert "| shuffled |" in text and "better than shuffled" in text and "sign-flip" in text


def test_overview_marks_follow_the_intervals(tmp_path):
    table = runs({"lora": [0.10, 0.10, 0.10], "transfer": [0.31, 0.29, 0.33], "spectrum-matched": [0.30, 0.30, 0.30],
                  "shuffled": [0.40, 0.41, 0.42]})
    lines = report.overview(report.summarize(table), "exact_match").splitlines()
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].rstrip(" |") for line in lines[2:]}
    assert cells["lora"].endswith("▲") and cells["shuffled"].endswith("▼") and cells["transfer"] == "0.310"
    assert cells["spectrum-matched"] == "0.300; T−X +0.0100 [-0.0397, +0.0597]"  # no mark: includes 0
    text = report.write_report(table, tmp_path, "exact_match")["markdown"].read_text()
    assert "## Overview" in text and cells["spectrum-matched"] in text
