"""The study protocol as config (issue 17): equal grids, selection apart from test, a declared
endpoint; replayed from the quoted cases (unequal grid, settings chosen on seeds later scored on
test), then the study's own config and plan."""
import pytest

from pkt.flows.config import ConfigError, parse_config
from pkt.flows.sweep import chosen_runs, selection_runs
from pkt.flows.variants import VARIANTS


@pytest.fixture
def family_dir(tmp_path):
    """A directory shaped like a built family (the config checks only that task files exist)."""
    for task in ("gsm", "mmlu", "sni", "facts-teacher-only"):
        d = tmp_path / "tasks" / task
        d.mkdir(parents=True)
        for f in ("train", "seeds", "val", "test"):
            (d / f"{f}.jsonl").write_text("")
    return tmp_path


def config(family_dir, **over):
    raw = {"teacher": str(family_dir / "teacher"), "students": [str(family_dir / "student")],
           "tasks": [{"name": "gsm", "dir": str(family_dir / "tasks/gsm"), "benchmark": "gsm"}],
           "variants": ["vanilla", "lora", "transfer", "pissa", "shuffled"], "seeds": [0, 1, 2]}
    return parse_config({**raw, **over})


def test_the_quoted_unequal_grid_is_refused(family_dir):
    """2 lr x 3 scales gave the teacher-derived inits 6 settings and lora/PiSSA 2."""
    with pytest.raises(ConfigError, match=r"unequal grids: lora 2, transfer 6, pissa 2, shuffled 6 settings.*"
                                          r"variant_grid"):
        config(family_dir, train_grid={"lr": [3e-3, 1e-2], "init_scale": [0.5, 1, 2]}, selection_seeds=[9])
    cfg = config(family_dir, train_grid={"lr": [3e-3, 1e-2], "init_scale": [0.5, 1, 2]}, selection_seeds=[9],
                 variant_grid={"lora": {"alpha": [4, 8, 16]}, "pissa": {"alpha": [4, 8, 16]}})
    sizes = {v: len(cfg.grid_points(v)) for v in cfg.variants if VARIANTS[v].trains}
    assert sizes == {"lora": 6, "transfer": 6, "pissa": 6, "shuffled": 6}
    assert {tuple(sorted(p)) for p in cfg.grid_points("lora")} == {("alpha", "lr")}
    assert {tuple(sorted(p)) for p in cfg.grid_points("transfer")} == {("init_scale", "lr")}


def test_a_grid_needs_selection_seeds_apart_from_the_test_seeds(family_dir):
    grid = {"train_grid": {"lr": [1e-3, 1e-2]}}
    with pytest.raises(ConfigError, match="a grid needs selection_seeds"):
        config(family_dir, **grid)
    with pytest.raises(ConfigError, match=r"selection_seeds and seeds share \[1, 2\]"):
        config(family_dir, **grid, selection_seeds=[1, 2, 7])


def test_settings_are_never_chosen_on_seeds_scored_on_test(family_dir):
    """The quoted case: settings were chosen on the same seeds then scored on test. The run plan
    trains every setting on the selection seeds only, and the chosen one on the test seeds only."""
    cfg = config(family_dir, train_grid={"lr": [1e-3, 1e-2], "init_scale": [1.0, 2.0]}, selection_seeds=[100, 101],
                 variant_grid={"lora": {"alpha": [8, 32]}, "pissa": {"alpha": [8, 32]}})
    sel = list(selection_runs(cfg))
    assert {seed for _, _, seed in sel} == {100, 101}
    assert {v.name for v, _, _ in sel} == {"lora", "transfer", "pissa", "shuffled"}  # not vanilla
    assert len(sel) == 4 * 4 * 2  # every variant: 4 settings x 2 selection seeds
    chosen = {"lora": {"lr": 1e-2, "alpha": 32}, "transfer": {"lr": 1e-3, "init_scale": 2.0},
              "pissa": {"lr": 1e-3, "alpha": 8}, "shuffled": {"lr": 1e-2, "init_scale": 1.0}}
    test = list(chosen_runs(cfg, chosen))
    assert {seed for v, _, seed in test if v.trains} == {0, 1, 2}
    assert all(setting == chosen[v.name] for v, setting, _ in test if v.trains)
    assert [(v.name, seed) for v, _, seed in test if not v.trains] == [("vanilla", 0)]


def test_without_a_grid_nothing_is_selected(family_dir):
    cfg = config(family_dir)
    assert list(selection_runs(cfg)) == []
    assert len(list(chosen_runs(cfg, {}))) == 1 + 4 * 3


def test_the_endpoint_is_a_typed_declared_field(family_dir):
    cfg = config(family_dir, endpoint={"metric": "exact_match/strict-match", "tasks": ["gsm"],
                                       "comparisons": ["transfer - shuffled", {"subject": "pissa", "control": "lora"}]})
    assert [str(c) for c in cfg.endpoint.comparisons] == ["transfer - shuffled", "pissa - lora"]
    assert cfg.endpoint.alpha == 0.05
    cases = {"not among the variants": {"metric": "acc", "comparisons": ["transfer - spectrum-matched"]},
             "write 'transfer - X' or 'X - lora'": {"metric": "answer_nll", "comparisons": ["pissa - shuffled"]},
             "is not scored on those tasks": {"metric": "acc", "comparisons": ["transfer - shuffled"]},
             "are not tasks of this sweep": {"metric": "answer_nll", "tasks": ["mmlu"],
                                             "comparisons": ["transfer - shuffled"]},
             "write a comparison as 'SUBJECT - CONTROL'": {"metric": "answer_nll", "comparisons": ["transfer"]}}
    for message, endpoint in cases.items():
        with pytest.raises(ConfigError, match=message):
            config(family_dir, endpoint=endpoint)


def test_the_study_protocol(family_dir, monkeypatch):
    """The study's own config (the declared cut, flows/study.py): equal grids of 3 learning rates, a
    selection seed apart from 4 test seeds, the knowledge task only, the one-screen table's arms, the
    knowledge endpoint declared, and its plan counted before any work."""
    from pkt.flows import study

    tasks = [{"name": n, "dir": str(family_dir / "tasks" / n), "benchmark": "gsm"}
             for n in ("facts-teacher-only", "gsm")]
    monkeypatch.setattr(study, "study_tasks", lambda root: tasks)
    cfg = parse_config(study.study_config(str(family_dir), study.STUDY_SEEDS, None, "r"))
    trained = [v for v in cfg.variants if VARIANTS[v].trains]
    assert {len(cfg.grid_points(v)) for v in trained} == {3}  # the cut: lr, 3 values (LaTen: 3 rates)
    assert len(cfg.seeds) == 4 and not set(cfg.seeds) & set(cfg.selection_seeds) and len(cfg.selection_seeds) == 1
    assert [t.name for t in cfg.tasks] == ["facts-teacher-only"]
    assert {"teacher", "oracle", "transfer", "transfer-add", "spectrum-matched", "shuffled", "kd", "seq-kd", "lora",
            "vanilla"} <= set(cfg.variants) and not any(VARIANTS[v].chain == "fresh" for v in cfg.variants)
    assert cfg.endpoint.metric == "exact_match/strict-match" and cfg.endpoint.tasks == ["facts-teacher-only"]
    assert [str(c) for c in cfg.endpoint.comparisons] == ["transfer - spectrum-matched", "transfer - shuffled"]
    plan = study.study_plan(cfg, families=8)
    n = len(trained)
    assert plan["selection_adapters"] == 8 * n * 3 and plan["test_adapters"] == 8 * n * 4
    # a family without the knowledge task: the endpoint falls to its first task, and says so in the flow
    old = [{"name": "gsm", "dir": str(family_dir / "tasks/gsm"), "benchmark": "gsm"},
           {"name": "mmlu", "dir": str(family_dir / "tasks/mmlu"), "benchmark": "mmlu"}]
    assert study.study_endpoint(old)["tasks"] == ["gsm"]
