"""The report's statistics against numpy/scipy on fixed numbers, and its wording."""
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
    assert "no clear difference" in s.loc["transfer", "verdict"]


def test_lower_is_better_metrics_flip_the_wording():
    s = report.summarize(runs({"lora": [1.0, 1.1, 1.2], "transfer": [0.5, 0.6, 0.65]}, "answer_nll"))
    assert s.set_index("variant").loc["transfer", "verdict"] == "better than lora"


def test_a_sweep_without_lora_still_reports(tmp_path):
    paths = report.write_report(runs({"transfer": [0.4, 0.5], "vanilla": [0.1]}), tmp_path, "exact_match")
    assert "transfer 0.4500 (this sweep has no lora baseline to compare with)" in paths["markdown"].read_text()


def test_report_files(tmp_path):
    paths = report.write_report(runs({"lora": [0.2, 0.3], "transfer": [0.4, 0.5], "shuffled": [0.1, 0.2]}),
                                tmp_path, "exact_match")
    text = paths["markdown"].read_text()
    assert "transfer 0.4500 vs lora 0.2500" in text and "better than 1 of 1 controls" in text
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
    from pkt.core.report import choose_settings

    rows = []
    for variant, best in (("lora", '{"lr": 0.01}'), ("transfer", '{"lr": 0.001}')):
        for setting in ('{"lr": 0.01}', '{"lr": 0.001}'):
            for split in ("val", "test"):
                good = setting == best
                # on test the other setting would look better: selection must use val only
                value = (0.9 if good else 0.1) if split == "val" else (0.3 if good else 0.8)
                rows.append({"student": "s", "task": "gsm", "benchmark": "gsm", "metric": "exact_match/strict-match",
                             "variant": variant, "seed": 0, "setting": setting, "split": split, "value": value})
    picked = choose_settings(pd.DataFrame(rows), {"gsm": "exact_match/strict-match"})
    assert sorted(zip(picked["variant"], picked["setting"])) == [("lora", '{"lr": 0.01}'), ("transfer", '{"lr": 0.001}')]
    assert set(picked["value"]) == {0.3} and "split" not in picked
