"""Scale-out on an existing engine: a sweep's nodes run on the workers of a real Dask cluster,
give the serial run's bytes at equal torch threads, a second run is all Cached, and serial and Dask
runs share one cache at their default (different) thread counts."""
import pytest
import torch

from pkt.tasks import extract as extract_nodes

from pkt.flows.graph import torch_threads_per_worker
from pkt.flows.sweep import sweep

from prefect_api import task_graph


def config(family, store, report_dir):
    return {"teacher": str(family / "teacher"), "students": [str(family / "student")],
            "tasks": [{"name": "gsm", "dir": str(family / "tasks/gsm"), "benchmark": "gsm"}],
            "variants": ["lora", "transfer", "spectrum-matched"], "seeds": [0, 1], "benchmarks": [], "eval_limit": 4,
            "train": {"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
            "store": str(store), "report_dir": str(report_dir)}


@pytest.mark.slow
@pytest.mark.ci
def test_sweep_runs_on_dask_workers_and_matches_the_serial_run(prefect_env, mini_family, tmp_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    from distributed import Client, LocalCluster

    threads = torch_threads_per_worker("dask", 2)
    before = torch.get_num_threads()
    # the serial run at the workers' torch thread count: equal bytes expected (a one-thread runner takes
    # every CPU pkt may use unless the user's OMP_NUM_THREADS says otherwise: graph.torch_threads_per_worker)
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        serial = sweep(config(mini_family, tmp_path / "serial", tmp_path / "r1"))
    finally:
        torch.set_num_threads(before)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        cfg = {**config(mini_family, tmp_path / "dask", tmp_path / "r2"), "runner": "dask", "workers": 2,
               "dask_address": cluster.scheduler_address}
        parallel = sweep(cfg)
        done = client.run_on_scheduler(
            lambda dask_scheduler: [(str(t[0]), t[2]) for t in dask_scheduler.transition_log])
        state = sweep(cfg, return_state=True)

    # the scheduler ran every node (Dask names a task after its function: run_node-<token>)
    ran = {key for key, finish in done if finish == "memory"}
    assert sum(k.startswith("run_node-") for k in ran) == len(parallel["nodes"]), sorted(ran)[:5]
    # same keys, same bytes: each node's content digest equals the serial run's
    from pkt.artifacts.store import Store

    digests = lambda out, root: {(kind, key, Store(root).record(kind, key)["digest"]) for kind, key, _ in out["nodes"]}
    assert digests(parallel, tmp_path / "dask") == digests(serial, tmp_path / "serial")
    assert parallel["computed"] == len(parallel["nodes"])
    second = state.result()
    assert second["computed"] == 0
    assert {s for n, (s, _) in task_graph(state).items() if n.startswith(("adapter", "scores"))} == {"Cached"}


def test_a_key_names_upstream_nodes_by_key_and_sources_by_digest():
    """Why a Dask run and a serial run share one cache: an upstream node's bytes (which differ in the
    last bits with torch's thread count) do not enter downstream keys; a source's content does."""
    spec = extract_nodes.LoraInit(rank=2, alpha=2.0)
    serial = {"extraction": {"kind": "extraction", "key": "k" * 64, "digest": "a" * 64}}
    other_bytes = {"extraction": {"kind": "extraction", "key": "k" * 64, "digest": "b" * 64}}
    assert spec.key(serial) == spec.key(other_bytes)
    assert spec.key(serial) != spec.key({"extraction": {"kind": "extraction", "key": "j" * 64, "digest": "a" * 64}})
    sens = extract_nodes.Sensitivity()
    teacher = {"kind": "model", "key": "models/teacher", "digest": "c" * 64}
    seeds = {"kind": "file", "key": "gsm/seeds.jsonl", "digest": "d" * 64}
    moved = {"teacher": {**teacher, "key": "elsewhere/teacher"}, "seeds": seeds}
    assert sens.key({"teacher": teacher, "seeds": seeds}) == sens.key(moved)  # a moved model reuses everything
    assert sens.key({"teacher": teacher, "seeds": seeds}) != sens.key({"teacher": teacher,
                                                                       "seeds": {**seeds, "digest": "e" * 64}})


@pytest.mark.slow
@pytest.mark.ci
def test_serial_and_dask_runs_share_one_cache_at_their_default_thread_counts(prefect_env, mini_family, tmp_path):
    """Replays '`pkt demo --size test --runner dask --workers 2` after a serial run: all lora_init and
    3 adapters differ in bytes (torch uses 1 thread per worker vs 2 serially), so 81 downstream keys
    exist in one store only': a serial run after a Dask run computes nothing, and the reverse."""
    pytest.importorskip("prefect_dask")
    from distributed import LocalCluster

    assert torch.get_num_threads() != torch_threads_per_worker("dask", 2)  # the setting: 2 vs 1
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        for first, second in (("dask", "serial"), ("serial", "dask")):
            store = tmp_path / f"{first}-then-{second}"
            run = {"serial": lambda: sweep(config(mini_family, store, tmp_path / "r-serial")),
                   "dask": lambda: sweep({**config(mini_family, store, tmp_path / "r-dask"), "runner": "dask",
                                          "workers": 2, "dask_address": cluster.scheduler_address})}
            before = run[first]()
            assert before["computed"] == len(before["nodes"])
            after = run[second]()
            assert after["computed"] == 0, [(k, s) for k, _, s in after["nodes"] if s == "computed"]
            assert sorted(after["nodes"]) == sorted((k, key, "reused") for k, key, _ in before["nodes"])
