"""transfer-add, the data route (kd, seq-kd) and LaTen in one real sweep: their runs, the route column, the
dose-response from each run's checkpoints, the secondary contrast's size check, LaTen's update size."""
import json

import pandas as pd
import pytest

from pkt.flows.config import ConfigError, parse_config
from pkt.flows.sweep import sweep
from test_distill import family  # noqa: F401  (a task directory and two small random models)

TRAIN = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "lr": 1e-2, "steps": 4, "checkpoints": [1, 2, 4], "batch_size": 8,
         "micro_batch": 8, "n_train": 8}


def routes_config(family, tmp_path, **kw):
    task = "facts-teacher-only"
    return {"teacher": str(family / "teacher"), "students": [str(family / "student")],
            "tasks": [{"name": task, "dir": str(family / "tasks" / task), "benchmark": "gsm"}],
            "variants": ["vanilla", "lora", "transfer", "transfer-add", "spectrum-matched", "kd", "seq-kd", "laten"],
            "seeds": [0], "benchmarks": ["answer_nll"], "eval_limit": 6, "max_length": 64, "completion_tokens": 8,
            "laten": {"n_extract": 2, "n_align": 4, "align_per_step": 2, "reference_width": [5120, 4096]},
            "endpoint": {"metric": "exact_match/strict-match", "comparisons": ["transfer - spectrum-matched"],
                         "at_subject_setting": True},
            "train": TRAIN, "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report"), **kw}


@pytest.mark.slow
def test_routes_in_a_sweep(prefect_env, family, tmp_path):  # noqa: F811
    out = sweep(routes_config(family, tmp_path))
    kinds = [k for k, _, _ in out["nodes"]]
    assert kinds.count("kd_adapter") == 1 and kinds.count("teacher_completions") == 1
    runs = pd.read_csv(out["report"]["runs"])
    route = runs.groupby("variant")["route"].first()
    assert set(route[route == "data"].index) == {"kd", "seq-kd"}
    assert (route.drop(["kd", "seq-kd"]) == "parametric").all()
    trained = runs[~runs["variant"].isin(["vanilla", "laten"])]
    assert (trained["steps"] == TRAIN["steps"]).all()  # runs.csv: the largest step count
    # the dose-response: every trained run at each checkpoint, read from the run's own checkpoints
    dose = pd.read_csv(out["report"]["dose"])
    for v in ("lora", "transfer", "transfer-add", "kd", "seq-kd"):
        rows = dose[(dose["variant"] == v) & (dose["metric"] == "answer_nll")]
        assert sorted(rows["checkpoint"]) == TRAIN["checkpoints"] and (rows["checkpoint"] == rows["steps"]).all()
    # LaTen: its update's size per module and whether it moved val NLL, with the run
    lat = runs[runs["variant"] == "laten"].iloc[0]
    assert set(json.loads(lat["update_size"])) == {"up", "down", "o"} and lat["update_size_max"] > 0
    assert lat["inert"] in (True, False) and (lat["note"] == "not evaluated: inert at this width") == lat["inert"]
    # the secondary contrast: spectrum-matched at transfer's setting has transfer's top singular value
    matched = pd.read_csv(out["report"]["matched"])
    assert set(matched["variant"]) == {"spectrum-matched"} and set(matched["at_setting_of"]) == {"transfer"}
    assert matched["sv_matched"].all() and (matched["sv_ratio"] - 1).abs().max() < 1e-3


def test_checkpoints_need_steps(family, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="checkpoints .* need steps"):
        parse_config(routes_config(family, tmp_path, train={**TRAIN, "steps": None}))
    with pytest.raises(ConfigError, match="past the run's 4 steps"):
        parse_config(routes_config(family, tmp_path, train={**TRAIN, "checkpoints": [2, 8]}))
