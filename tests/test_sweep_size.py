"""A sweep states its size before it starts: the nodes to compute, reused ones apart (flows/plan.py), and
--max-nodes judges the nodes to compute (issue 26, Deliver 4)."""
import contextlib
import json
import re

import pytest

from pkt.artifacts.store import Store
from pkt.flows import server
from pkt.flows.cli import main

TRAIN = json.dumps({"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8})


def transfer(fam, store, report, *extra):
    return ["transfer", "--teacher", str(fam / "teacher"), "--student", str(fam / "student"), "--task-dir",
            str(fam / "tasks/gsm"), "--variants", "vanilla,lora,transfer", "--train", TRAIN, "--store", str(store),
            "--report-dir", str(report), *extra]


def stated(out: str) -> tuple[int, int]:
    """(to compute, reused) from the line `pkt transfer: N nodes to compute (...), M reused from the store, ...`."""
    m = re.search(r"pkt transfer: ([\d,]+) nodes to compute.*?, ([\d,]+) reused from the store", out)
    assert m, out
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def stop_at_the_flow(monkeypatch):
    """The command gets past the size check: entering the Prefect API raises this marker instead."""
    @contextlib.contextmanager
    def marker():
        raise RuntimeError("past the size check")
        yield

    monkeypatch.setattr(server, "prefect_api", marker)


def test_a_second_identical_sweep_has_nothing_to_compute_and_max_nodes_judges_that(prefect_env, mini_family, tmp_path,
                                                                                  capsys, monkeypatch):
    store, report = tmp_path / "store", tmp_path / "report"
    # first: --max-nodes 1 refuses before any work, naming the nodes to compute
    with monkeypatch.context() as m:
        stop_at_the_flow(m)
        assert main(transfer(mini_family, store, report, "--max-nodes", "1")) == 2
    err = capsys.readouterr().err
    assert "nodes to compute" in err and "0 reused from the store" in err and "above --max-nodes 1" in err, err
    assert not list(Store(store).records())  # nothing computed
    assert main(transfer(mini_family, store, report)) == 0
    out = capsys.readouterr().out
    to_compute, reused = stated(out)
    # oracle: the records the run wrote, less the report and its tables (written after the runs' results)
    records = [r for r in Store(store).records() if r["kind"] not in ("report", "table")]
    assert reused == 0 and to_compute == len(records) > 5, (to_compute, sorted(r["kind"] for r in records))
    # second, identical: all reused, so --max-nodes 1 (below the total, above 0) goes on without --yes
    with monkeypatch.context() as m:
        stop_at_the_flow(m)
        with pytest.raises(RuntimeError, match="past the size check"):
            main(transfer(mini_family, store, report, "--max-nodes", "1"))
    again = stated(capsys.readouterr().out)
    assert again == (0, len(records))


def test_a_node_the_store_lost_is_to_compute_again(prefect_env, mini_family, tmp_path, capsys, monkeypatch):
    """A plan looks keys up: an adapter record removed from the store counts as one to compute (and what is
    downstream of it stays reused: its key is the same, and the store holds it)."""
    store, report = tmp_path / "store", tmp_path / "report"
    argv = transfer(mini_family, store, report, "--variants", "lora")
    assert main(argv) == 0
    capsys.readouterr()
    adapter = next(r for r in Store(store).records() if r["kind"] == "adapter")
    (store / "keys" / "adapter" / f"{adapter['key']}.json").unlink()
    with monkeypatch.context() as m:
        stop_at_the_flow(m)
        with pytest.raises(RuntimeError, match="past the size check"):
            main(argv + ["--max-nodes", "1"])
    out = capsys.readouterr().out
    assert stated(out)[0] == 1 and "(1 adapter)" in out, out
