"""A timeout per node kind (issue 25, item 4): past its kind's limit a node stops within one step
(it runs in a worker thread or process no one can kill), stores nothing, its task run ends TimedOut,
and the command says which kind, which limit, and how to raise it."""
import time

import pytest

from pkt.artifacts.store import Store
from pkt.core import stop
from pkt.flows import cli
from pkt.flows.config import ConfigError, parse_config
from pkt.flows.graph import timeout_value
from pkt.tasks import extract as extract_nodes
from pkt.tasks import sources
from pkt.tasks.node import NodeTimeout, run_node


@pytest.fixture(autouse=True)
def no_stop_left_behind():
    stop.clear()
    yield
    stop.clear()


def test_a_deadline_stops_the_loop_of_its_own_thread_only():
    import threading

    from pkt.core.progress import track

    with stop.deadline(0.2):
        t0 = time.monotonic()
        with pytest.raises(stop.TimedOut, match="time limit of 0.2 s"):
            for _ in track(iter(int, 1), "forever", enabled=False):  # an endless loop of steps
                seen = []  # another thread's loop in the same seconds runs on: the limit is this thread's
                other = threading.Thread(target=lambda: seen.append(list(track(range(3), "x", enabled=False))))
                other.start()
                other.join()
                assert seen == [[0, 1, 2]]
                time.sleep(0.01)
        assert 0.2 <= time.monotonic() - t0 < 5
    assert list(track(range(3), "x", enabled=False)) == [0, 1, 2]  # the limit ends with its block


def test_a_node_past_its_timeout_stops_mid_work_and_stores_nothing(mini_family, tmp_path):
    """A sensitivity pass of minutes with a 2 s limit: it stops within a step of it, nothing recorded."""
    store = Store(tmp_path / "store")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text((mini_family / "tasks/gsm/seeds.jsonl").read_text() * 200)  # 1,600 samples: minutes
    inputs = {"teacher": sources.model_source(str(mini_family / "teacher"), store),
              "seeds": sources.file_source(str(seeds))}
    t0 = time.monotonic()
    with pytest.raises(NodeTimeout) as e:
        run_node.fn(extract_nodes.Sensitivity(), inputs, str(store.root), "sensitivity[teacher]", timeout=2)
    assert 2 <= time.monotonic() - t0 < 30  # it did start, and stopped
    assert str(e.value).startswith("sensitivity[teacher] stopped at its sensitivity timeout of 2 s")
    assert isinstance(e.value, TimeoutError)  # what Prefect's task engine ends in TimedOut
    assert not list(store.root.glob("keys/*/*.json"))
    assert not stop.requested()  # a timeout stops its node, not the run's other nodes


def test_timeout_values_are_checked_with_one_sentence_naming_the_flag_and_the_kinds():
    assert timeout_value("adapter=600, sensitivity=1800") == {"adapter": 600.0, "sensitivity": 1800.0}
    for bad, why in [("train=60", "train is not a node kind"), ("adapter", "adapter has no =SECONDS"),
                     ("adapter=0", "adapter's timeout 0 is not a number of seconds above 0"),
                     ("adapter=ten", "adapter's timeout ten is not"), ("adapter=inf", "adapter's timeout inf is not"),
                     ("", "no kind is not a node kind")]:
        with pytest.raises(ConfigError) as e:
            timeout_value(bad, "--timeout")
        msg = str(e.value)
        assert msg.startswith(f"--timeout {bad}: {why}") and "adapter, adapter_checkpoint" in msg, msg
        assert "\n" not in msg
    cfg = {"teacher": "t", "students": ["s"], "tasks": [{"name": "g", "dir": "d"}]}
    with pytest.raises(ConfigError, match="timeouts: train is not a node kind; give {KIND: SECONDS}, KIND one of "):
        parse_config({**cfg, "timeouts": {"train": 60}})
    with pytest.raises(ConfigError, match="timeouts.adapter = -1: must be above 0"):
        parse_config({**cfg, "timeouts": {"adapter": -1}})


def test_a_bad_timeout_is_refused_before_any_work(no_work, capsys, monkeypatch):
    assert cli.main(["demo", "--size", "test", "--timeout", "adaptr=5"]) == 2
    assert capsys.readouterr().err.startswith("pkt demo: error: --timeout adaptr=5: adaptr is not a node kind;")
    monkeypatch.setenv("PKT_TIMEOUT", "adapter=soon")
    assert cli.main(["demo", "--size", "test"]) == 2
    assert capsys.readouterr().err.startswith("pkt demo: error: PKT_TIMEOUT adapter=soon: adapter's timeout soon")


def test_help_says_what_timeout_takes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["transfer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--timeout KIND=SECONDS[,KIND=SECONDS]" in text and "TimedOut" in text and "timeouts:" in text


def test_a_training_node_past_its_timeout_ends_the_command_with_one_sentence(prefect_env, mini_family, tmp_path,
                                                                             capfd):
    """`pkt transfer --timeout adapter=0.01` on the test family: exit 2 with the sentence, the adapter's task
    run TimedOut in the Prefect API, and no adapter in the store."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    store = tmp_path / "store"
    code = cli.main(["transfer", "--teacher", str(mini_family / "teacher"), "--student", str(mini_family / "student"),
                     "--task-dir", str(mini_family / "tasks/gsm"), "--variants", "lora", "--store", str(store),
                     "--report-dir", str(tmp_path / "report"), "--timeout", "adapter=0.01"])
    out, err = capfd.readouterr()
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "pkt transfer: error: adapter[student, gsm, lora, seed=0] stopped at its adapter timeout of 0.01 s and "
        "stored nothing; raise it with --timeout adapter=SECONDS (PKT_TIMEOUT, or timeouts: {adapter: SECONDS} in "
        "a sweep config)")
    assert not list(store.glob("keys/adapter/*.json")) and not list(store.glob("keys/scores/*.json"))
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["transfer"]}),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        states = {t.name: t.state.name for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [run.id]}), limit=200)}
    assert states["adapter[student, gsm, lora, seed=0]"] == "TimedOut", states
