"""Issue 24's report, replayed: report.md is one screen that opens with every arm on the endpoint (the
positive controls, the data route labelled, an inert variant not read as a null), corrected levels
print readably, the diagnostic's levels and the gain's split-half reliability are reported; checked
against numpy/scipy computed here."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pkt.core import diagnose, report
from report_fixtures import ARMS, ENDPOINT, ENDPOINT_TASK, STEPS, UNTRAINED, study_runs

PROTOCOL = {"endpoint": ENDPOINT, "chance": {"exact_match": 0.1}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The synthetic study (8 families, 4 twin families, 16 arms, 3 tasks, 2 metrics, 3 step counts)."""
    runs = study_runs()
    return runs, report.write_report(runs, tmp_path_factory.mktemp("study"), "exact_match", protocol=PROTOCOL)


def first_table(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
@pytest.mark.ci
def test_report_md_is_one_screen_that_opens_with_the_positive_controls(study):
    _, paths = study
    text = paths["markdown"].read_text()
    assert len(text.encode()) <= 40_000
    assert "## Every comparison" not in text and "## Every comparison" in paths["comparisons"].read_text()
    arms = [row[0] for row in first_table(text)]
    assert arms[:7] == ["teacher", "oracle", "twin transfer", "kd", "seq-kd", "transfer", "transfer-add"]
    assert arms[-3:] == ["lora", "vanilla", "chance"] and "spectrum-matched" in arms
    rows = {row[0]: row for row in first_table(text)}
    assert rows["kd"][1].startswith("data route") and rows["seq-kd"][1].startswith("data route")
    assert rows["laten"][3] == "not evaluated: inert at this width"
    assert text.index("| teacher |") < text.index("](report.png)") < text.index("## Primary endpoint")
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG" and paths["comparisons_chart"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.ci
def test_the_oracle_and_its_share_of_the_gap_recomputed(study):
    """oracle - vanilla per family (largest step count, mean over seeds), its t-interval at Bonferroni's
    level over the arms with an interval, and that over the mean teacher - vanilla gap."""
    runs, paths = study
    end = runs[(runs["task"] == ENDPOINT_TASK) & (runs["metric"] == "exact_match") & ~runs["family"].str.startswith("twin")]
    end = end[(end["steps"] == STEPS[-1]) | (end["steps"] == 0)]
    fam = end.groupby(["variant", "family"])["value"].mean().unstack()
    k = sum(1 for v in fam.index if v not in ("vanilla", "laten")) + 1  # + twin transfer
    d = fam.loc["oracle"] - fam.loc["vanilla"]
    lo, hi = stats.t.interval(1 - 0.05 / k, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    gap = (fam.loc["teacher"] - fam.loc["vanilla"]).mean()
    row = {r[0]: r for r in first_table(paths["markdown"].read_text())}["oracle"]
    assert row[4] == f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
    assert row[5] == f"{d.mean() / gap:+.2f} [{lo / gap:+.2f}, {hi / gap:+.2f}]"
    text = paths["markdown"].read_text()
    assert f"oracle (moved the endpoint toward the teacher): Δ student {row[4]} at " in text
    assert "transfer (did not move the endpoint)" in text


def test_a_report_of_twin_families_only_lists_every_arm(tmp_path):
    """The study's twin report (report_dir/twin) holds twin families only: its first table lists each arm
    read on them (it listed "twin transfer" alone)."""
    runs = study_runs(families=0, twins=4)
    paths = report.write_report(runs, tmp_path, "exact_match", protocol=PROTOCOL)
    arms = [row[0] for row in first_table(paths["markdown"].read_text())]
    assert arms == ["teacher", "transfer", "lora", "vanilla", "chance"]


def test_corrected_levels_print_with_the_digits_that_make_them_readable():
    """BH's 1 - 2*0.05/277 used to print as 100.0%."""
    level = 1 - 2 * 0.05 / 277
    r = pd.Series({"diff": 0.01, "ci_low_adj": -0.02, "ci_high_adj": 0.04, "p_adj": 0.5, "level": level,
                   "test": "BH (m = 277)"})
    text = report._ci_text(r)
    shown = float(text.split(" at ")[1].split("%")[0])
    assert shown != 100.0 and abs(shown - 100 * level) < 0.01 and "at 99.96%" in text
    assert report.level_text(0.975) == "97.5%" and report.level_text(0.95) == "95.0%"


def inert_table(flag: bool) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = [{"student": "s", "task": "t", "benchmark": "t", "metric": "acc", "variant": v, "seed": s,
             "value": 0.5 + rng.normal(0, 0.01), "inert": flag and v == "laten"}
            for v in ("lora", "transfer", "shuffled", "laten") for s in range(4)]
    return pd.DataFrame(rows)


def test_an_inert_variant_is_not_evaluated_and_not_a_null():
    s = report.summarize(inert_table(True)).set_index("variant")
    assert s.loc["laten", "verdict"] == s.loc["laten", "transfer_verdict"] == report.INERT
    lines = report.headline(s.reset_index(), "acc")
    assert any(f"{report.INERT}: laten" in line and "of 1 controls" in line for line in lines)
    # the inert variant leaves the corrected family: BH over the others only
    plain = report.summarize(inert_table(False)).set_index("variant")
    assert s.loc["shuffled", "transfer_test"] == "BH (m = 3)" and plain.loc["shuffled", "transfer_test"] == "BH (m = 5)"


def test_the_endpoint_is_read_at_the_largest_step_count_and_the_others_draw_the_dose_response():
    runs = study_runs(families=2, twins=0, seeds=2)
    final = report.at_final_steps(runs)
    trained = final[~final["variant"].isin(["teacher", "vanilla"])]
    assert set(trained["steps"]) == {STEPS[-1]} and len(final) == len(runs[runs["steps"].isin([0, STEPS[-1]])])
    report.check_runs(final)
    dose = report.dose_response(runs, "exact_match", ENDPOINT_TASK)
    oracle = dose[dose["variant"] == "oracle"].set_index("steps")["mean"]
    want = runs[(runs["variant"] == "oracle") & (runs["task"] == ENDPOINT_TASK) & (runs["metric"] == "exact_match")]
    want = want.groupby(["steps", "family"])["value"].mean().groupby("steps").mean()
    assert list(oracle.index) == list(STEPS) and np.allclose(oracle.to_numpy(), want.loc[list(STEPS)].to_numpy())
    assert report.dose_response(final, "exact_match", ENDPOINT_TASK).empty


def gain_runs(cell_sd: float, seeds: int = 4, families: int = 10, seed: int = 0) -> pd.DataFrame:
    """lora and three variants per family: each variant's gain has a per-cell effect (sd cell_sd) plus
    seed noise (sd 0.01), and a diagnostic value per init."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(families):
        for v in ("lora", "transfer", "shuffled", "spectrum-matched"):
            effect = 0.0 if v == "lora" else rng.normal(0, cell_sd)
            for s in range(seeds):
                rows.append({"student": f"f{f}", "task": "t", "benchmark": "t", "metric": "acc", "variant": v,
                             "seed": s, "value": 0.5 + effect + rng.normal(0, 0.01),
                             "diag_cos": np.nan if v == "lora" else rng.normal(0, 0.003),
                             "diag_share": np.nan if v == "lora" else rng.normal(0.19, 0.004)})
    return pd.DataFrame(rows)


def test_split_half_reliability_against_scipy():
    runs = gain_runs(cell_sd=0.05)
    rel = diagnose.split_half_reliability(runs, "acc")
    lora = runs[runs["variant"] == "lora"].set_index(["student", "seed"])["value"]
    others = runs[runs["variant"] != "lora"].copy()
    others["gain"] = others["value"].to_numpy() - lora.loc[list(zip(others["student"], others["seed"]))].to_numpy()
    halves = others.assign(half=others["seed"] % 2).groupby(["student", "variant", "half"])["gain"].mean().unstack()
    r = stats.spearmanr(halves[0], halves[1]).statistic
    assert rel["n"] == 30 and rel["rho_half"] == pytest.approx(r) and rel["reliability"] == pytest.approx(2 * r / (1 + r))
    assert rel["ci_low"] > 0.5  # cell effects 5x the seed noise replicate


def test_a_correlation_with_a_gain_that_does_not_replicate_is_not_read():
    noise = gain_runs(cell_sd=0.0)
    assert diagnose.split_half_reliability(noise, "acc")["ci_low"] < 0
    reading = "not evidence either way: the gain does not replicate across seed halves |"
    assert report.diagnostic_section(noise, "acc").count(reading) == 2  # one per diagnostic field
    assert reading not in report.diagnostic_section(gain_runs(cell_sd=0.05), "acc")


def test_the_diagnostics_levels_beside_random_directions():
    runs = gain_runs(cell_sd=0.05)
    levels = diagnose.levels(runs).set_index("variant")
    for v in ("transfer", "shuffled"):
        g = runs[runs["variant"] == v]
        assert levels.loc[v, "cos_mean"] == pytest.approx(g["diag_cos"].mean())
        assert levels.loc[v, "share_sd"] == pytest.approx(g["diag_share"].std())
    assert "lora" not in levels.index and levels.loc["shuffled", "random_direction"]
    text = report.diagnostic_section(runs, "acc")
    t = levels.loc["transfer"]
    assert f"| transfer | 40 | {t['cos_mean']:+.4f} ± {t['cos_sd']:.4f} | {t['share_mean']:.3f} ± " in text
    assert "| shuffled (random directions) |" in text


def test_a_v1_runs_table_renders_with_the_arms_it_has(tmp_path):
    """docs/study's v1 columns (no teacher, oracle, twin, inert, chance): the first table lists what ran."""
    rng = np.random.default_rng(2)
    rows = [{"student": "s", "task": "facts", "benchmark": "gsm", "variant": v, "seed": s, "setting": "{}",
             "metric": "exact_match", "value": 0.1 + rng.normal(0, 0.01), "top_sv": np.nan, "top_sv_ratio": np.nan,
             "n_items": 96, "steps": 0 if v == "vanilla" else 8, "diag_cos": np.nan, "diag_share": np.nan}
            for v in ("transfer", "shuffled", "lora", "vanilla") for s in (range(1) if v == "vanilla" else range(3))]
    text = report.write_report(pd.DataFrame(rows), tmp_path, "exact_match")["markdown"].read_text()
    assert [row[0] for row in first_table(text)] == ["transfer", "shuffled", "lora", "vanilla"]
    assert f"at {100 * (1 - 0.05 / 3):.1f}% (Bonferroni over the 3 arms with one)" in text  # transfer, shuffled, lora
    assert "- facts · exact_match: transfer (did not move the endpoint)" in text or \
        "- facts · exact_match: transfer (moved the endpoint" in text


# ---- report.png (issue 24's one figure): chance among the lines, the dose-response beside ------------------
def figure_inputs(runs: pd.DataFrame, protocol: dict, dose: pd.DataFrame | None = None):
    """write_report's panels and doses for the endpoint, from a runs table (and a sweep's dose table)."""
    final = report.at_final_steps(runs)
    metric, tasks = report.endpoint_scope(final, "exact_match", protocol.get("endpoint"))
    panels = [(f"{t} · {metric}", metric,
               report.glance(final, metric, t, report.chance_of(final, protocol, metric, t))) for t in tasks]
    doses = [(f"{t} · {metric}", metric, report.dose_response(runs if dose is None else dose, metric, t))
             for t in tasks]
    return panels, doses


def labelled(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_report_png_draws_chance_with_the_reference_lines_and_the_dose_response_beside():
    import matplotlib.pyplot as plt

    runs = study_runs(families=3, twins=0, seeds=2)
    fig = report.endpoint_figure(*figure_inputs(runs, PROTOCOL))
    try:
        endpoint, dose = fig.axes
        lines = labelled(endpoint)
        assert "chance 0.100" in lines and all(any(k.startswith(f"{arm} ") for k in lines)
                                               for arm in ("vanilla", "oracle", "teacher"))
        assert list(lines["chance 0.100"].get_xdata()) == [0.1, 0.1]  # a vertical line at chance
        end = runs[(runs["task"] == ENDPOINT_TASK) & (runs["metric"] == "exact_match")]
        vanilla = end[end["variant"] == "vanilla"].groupby("family")["value"].mean().mean()
        assert next(v for k, v in lines.items() if k.startswith("vanilla")).get_xdata()[0] == pytest.approx(vanilla)
        assert dose.get_title().endswith("dose-response") and "optimizer steps" in dose.get_xlabel()
        # each trained variant's mean over families per step count, its 95% t-interval as the error bar
        curves = {c.get_label(): c for c in dose.containers}  # errorbar: (data line, caps, bars)
        oracle = end[end["variant"] == "oracle"].groupby(["steps", "family"])["value"].mean()
        line, _, (bars,) = curves["oracle"].lines
        for i, steps in enumerate(STEPS):
            units = oracle.loc[steps].to_numpy()
            assert line.get_ydata()[i] == pytest.approx(units.mean())
            assert line.get_xdata()[i] == pytest.approx(steps, rel=0.1)  # nudged apart, not moved
            lo, hi = stats.t.interval(0.95, len(units) - 1, loc=units.mean(), scale=stats.sem(units))
            segment = bars.get_segments()[i]
            assert (segment[0][1], segment[1][1]) == (pytest.approx(lo), pytest.approx(hi))
        trained = {v for v in ARMS if v not in UNTRAINED}
        assert set(curves) == trained  # every variant scored at several step counts, teacher and vanilla not
        lines = labelled(dose)
        assert "chance 0.100" in lines and lines["chance 0.100"].get_ydata()[0] == pytest.approx(0.1)
        assert next(v for k, v in lines.items() if k.startswith("vanilla ")).get_ydata()[0] == pytest.approx(vanilla)
        # no legend covers data: each sits outside its axes
        fig.canvas.draw()
        for ax in (endpoint, dose):
            assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
    finally:
        plt.close(fig)
    # without a chance level there is no chance line; with one step count, no dose panel
    plain = report.endpoint_figure(*figure_inputs(report.at_final_steps(runs), {"endpoint": ENDPOINT}))
    try:
        assert len(plain.axes) == 1 and not any(k.startswith("chance") for k in labelled(plain.axes[0]))
    finally:
        plt.close(plain)


def test_report_png_draws_the_dose_response_from_a_sweeps_dose_table(tmp_path, monkeypatch):
    """A sweep's runs.csv holds the final step count only; its checkpoints come as dose.csv beside it (steps =
    the checkpoint): `pkt report` reads it and write_report(dose=...) draws it; from runs.csv alone there is
    nothing to draw."""
    import json

    from pkt.flows import cli

    runs = study_runs(families=2, twins=0, seeds=2)
    runs = runs[(runs["task"] == ENDPOINT_TASK) & runs["variant"].isin(["transfer", "lora", "vanilla", "oracle"])]
    final = report.at_final_steps(runs)
    final.to_csv(tmp_path / "runs.csv", index=False)
    runs[runs["steps"] > 0].to_csv(tmp_path / "dose.csv", index=False)
    (tmp_path / "protocol.json").write_text(json.dumps(PROTOCOL))
    seen, draw = [], report.endpoint_chart
    monkeypatch.setattr(report, "endpoint_chart",
                        lambda panels, doses, path: seen.append(doses) or draw(panels, doses, path))
    assert cli.main(["report", "--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "r"),
                     "--metric", "exact_match"]) == 0
    (_, _, dosed), = seen[0]
    assert sorted(set(dosed["steps"])) == list(STEPS) and dosed["n"].eq(2).all()
    assert dosed.equals(report.dose_response(runs, "exact_match", ENDPOINT_TASK))
    assert report.dose_response(final, "exact_match", ENDPOINT_TASK).empty  # what it drew without dose.csv
