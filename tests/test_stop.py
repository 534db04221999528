"""Stop means stop (issue 19, item 2): Ctrl-C and SIGTERM stop any node within a few seconds,
though nodes run in worker threads where no signal arrives; the Prefect server stops with the
command; nothing half-done is recorded; the rerun resumes."""
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import psutil
import pytest
import torch

from pkt.artifacts.store import Store
from pkt.core import evaluate, finetune, lora_init, models, sensitivity, stop
from pkt.core.progress import Progress, track
from pkt.tasks import extract as extract_nodes
from pkt.tasks import sources
from pkt.tasks.node import build

from conftest import random_samples, tiny_config, tiny_model
from procs import pkt_env, pkt_until

REPO = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def no_stop_left_behind():
    stop.clear()
    yield
    stop.clear()


def stop_after(seconds: float) -> threading.Timer:
    """A stop requested from another thread, as the CLI's signal handler does."""
    timer = threading.Timer(seconds, stop.request, ("stopped by the test",))
    timer.start()
    return timer


def test_every_progress_step_checks_the_flag():
    stop.request("halt")
    with pytest.raises(stop.Stopped, match="halt"):
        next(iter(track(range(3), "x", enabled=False)))
    with pytest.raises(stop.Stopped):
        Progress(3, "x", enabled=False).update()
    stop.clear()
    assert list(track(range(3), "x", enabled=False)) == [0, 1, 2]


def test_sensitivity_stops_between_samples():
    model = tiny_model()
    samples = random_samples(100_000)  # minutes of work
    timer = stop_after(0.5)
    t0 = time.monotonic()
    with pytest.raises(stop.Stopped):
        sensitivity.compute_sensitivity(model, samples, progress=False)
    timer.join()
    assert time.monotonic() - t0 < 10
    assert all(p.grad is None for p in model.parameters())  # the hooks are removed on the way out


def test_training_stops_between_steps():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    params = finetune.TrainParams(epochs=100_000, batch_size=4, micro_batch=4)
    timer = stop_after(0.5)
    with pytest.raises(stop.Stopped):
        finetune.finetune(model, random_samples(8), params, pad_id=0, progress=False)
    timer.join()


def test_svds_stop_between_pieces():
    cfg = tiny_config()
    pieces = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(32, 48) for i in range(2)}
    stop.request()
    with pytest.raises(stop.Stopped):
        lora_init.init_state_dict(pieces, cfg, 2, alpha=2.0)


def test_lm_eval_batches_stop_at_the_next_model_call(mini_family):
    """lm-eval's loops are not pkt's: a forward hook on the model checks the flag instead."""
    src = str(mini_family / "student")
    model, tok = models.load_model(src), models.load_tokenizer(src)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    stop.request()
    with pytest.raises(stop.Stopped):
        evaluate.evaluate(model, tok, "gsm", mini_family / "tasks/gsm", limit=4)
    assert len(calls) == 1  # stopped at the first model call (this counter's hook runs before pkt's)
    stop.clear()
    evaluate.evaluate(model, tok, "answer_nll", mini_family / "tasks/gsm", limit=2)  # pkt's hook is gone after
    assert len(calls) > 1


def test_family_pretraining_stops_between_steps(tmp_path):
    from pkt.core.mini import family

    timer = stop_after(1.0)
    t0 = time.monotonic()
    with pytest.raises(stop.Stopped):
        family.build_family(tmp_path / "fam", "demo", log=lambda *_: None, progress=False)
    timer.join()
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "fam" / "teacher").exists()


def test_a_stopped_node_records_nothing_and_the_rerun_computes_it(mini_family, tmp_path):
    store = Store(tmp_path / "store")
    teacher = sources.model_source(str(mini_family / "teacher"), store)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text((mini_family / "tasks/gsm/seeds.jsonl").read_text() * 200)  # 1,600 samples
    inputs = {"teacher": teacher, "seeds": sources.file_source(str(seeds))}
    timer = stop_after(2.0)
    with pytest.raises(stop.Stopped):
        build(extract_nodes.Sensitivity(), inputs, store)
    timer.join()
    assert not list(store.root.glob("keys/*/*.json"))
    stop.clear()
    seeds.write_text((mini_family / "tasks/gsm/seeds.jsonl").read_text())
    inputs = {"teacher": teacher, "seeds": sources.file_source(str(seeds))}
    assert build(extract_nodes.Sensitivity(), inputs, store)["status"] == "computed"
    assert Store(store.root).verify() == []


# ---- the command line under real signals --------------------------------------------------------
def _start_and_signal(argv, tmp_path, sig, ready: str):
    """Run `pkt argv`, send sig once `ready` is printed (the slow node is under way); returns
    (seconds from the signal to the exit, return code, output, the pkt process's children)."""
    with pkt_until(argv, tmp_path, ready) as (p, out):
        children = psutil.Process(p.pid).children(recursive=True)
        time.sleep(2)  # well inside the node
        p.send_signal(sig)
        t0 = time.monotonic()
        out.append(f"[test] {signal.Signals(sig).name} sent at {time.strftime('%H:%M:%S')}\n")
        out += p.stdout.readlines()
        p.wait(120)
        return time.monotonic() - t0, p.returncode, "".join(out), children


def _assert_stopped(tmp_path, seconds, code, out, children, sig, kind):
    print(f"{signal.Signals(sig).name}: {kind} node stopped, command exited {seconds:.1f} s after the signal")
    assert code == 128 + sig, out
    assert seconds < 30, f"took {seconds:.1f} s to stop:\n" + out[-3000:]  # generous: a loaded 2-core machine
    assert "nothing half-done was stored, a rerun resumes" in out.splitlines()[-1]
    assert not list((tmp_path / "store").glob(f"keys/{kind}/*.json"))  # the stopped node recorded nothing
    _, alive = psutil.wait_procs(children, timeout=15)  # the temporary Prefect server went with it
    assert not alive, [c.cmdline() for c in alive]


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_long_sensitivity_node_and_the_rerun_resumes(mini_family, tmp_path, sig):
    """Replays 'SIGINT 10 s into a ~5 min sensitivity node: still running 240 s later, server still
    up; SIGTERM stopped it only when the node ended'."""
    seeds = tmp_path / "many.jsonl"
    seeds.write_text((mini_family / "tasks/gsm/seeds.jsonl").read_text() * 1000)  # 8,000 samples: minutes
    argv = ["extract", "--teacher", str(mini_family / "teacher"), "--seeds", str(seeds),
            "--student", str(mini_family / "student"), "--rank", "2"]
    _assert_stopped(tmp_path, *_start_and_signal(argv, tmp_path, sig, "sensitivity: 1/"), sig, "sensitivity")
    seeds.write_text((mini_family / "tasks/gsm/seeds.jsonl").read_text())  # the rerun: a short pass
    done = subprocess.run([sys.executable, "-m", "pkt.flows.cli", *argv], env=pkt_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "lora_init" in done.stdout and "computed" in done.stdout
    assert subprocess.run([sys.executable, "-m", "pkt.flows.cli", "store", "verify"], env=pkt_env(tmp_path),
                          capture_output=True, text=True).returncode == 0


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_family_pretraining(tmp_path, sig):
    """Replays '`pkt demo` in its family pretraining: still training 60 s after SIGINT'."""
    seconds, code, out, children = _start_and_signal(["demo", "--size", "demo"], tmp_path, sig,
                                                     "pretrain teacher: 1/")
    _assert_stopped(tmp_path, seconds, code, out, children, sig, "family")
    store = Store(tmp_path / "store")
    # the stopped run removes its own temp area as it exits (a killed one's is gc's to reap): none is left
    store.gc()
    assert not [p for p in (store.root / "tmp").iterdir()]


def _until_stopped(ready: str) -> str:
    """A node in a pool process: says it started, then checks the stop flag each step, as pkt's loops do."""
    open(ready, "w").close()
    try:
        while True:
            stop.check()
            time.sleep(0.05)
    except stop.Stopped as e:
        return f"stopped: {e}"


def _started(runner, *ready) -> None:
    """Wait until the pool's nodes have started (files `ready` exist), within a minute."""
    deadline = time.monotonic() + 60
    while not all(os.path.exists(r) for r in ready) or len(runner._executor._processes or {}) < len(ready):
        assert time.monotonic() < deadline, "the pool's nodes did not start"
        time.sleep(0.1)


def test_a_signal_stops_the_nodes_of_a_process_pool_and_ends_its_processes(tmp_path, monkeypatch):
    """Pool processes never see the parent's stop flag (nor a signal sent to the parent alone): the
    runner's exit on a signal raises theirs, so their node stops at its next step (its task run then
    ends Cancelled), and a node stuck in one step longer than the grace is killed (the study runs on a
    process pool)."""
    from pkt.flows import graph

    monkeypatch.setattr(graph, "STOP_GRACE", 2.0)
    runner = graph.task_runner("processes", 2)
    runner.__enter__()
    checks = runner._executor.submit(_until_stopped, str(tmp_path / "checks"))
    stuck = runner._executor.submit(time.sleep, 600)  # never checks: a node in one very long step
    _started(runner, tmp_path / "checks")
    while not stuck.running():
        time.sleep(0.1)
    pids = list(runner._executor._processes)
    stop.request("stopped by the test")
    t0 = time.monotonic()
    runner.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert checks.result(timeout=0) == "stopped: stopped by the test"  # stopped by the flag, not killed
    assert isinstance(stuck.exception(timeout=30), BrokenProcessPool)  # killed after the grace
    assert time.monotonic() - t0 < 2.0 + 10
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_pool_process_takes_a_signal_of_its_own_as_a_stop(tmp_path, sig):
    """A terminal's Ctrl-C reaches the whole process group, and a Prefect worker's cancel sends SIGTERM to
    it: a pool process stops its node at the next step, as the flow's process does, instead of dying
    mid-node (a task run left Running)."""
    from pkt.flows.graph import task_runner

    with task_runner("processes", 1) as runner:
        checks = runner._executor.submit(_until_stopped, str(tmp_path / "checks"))
        _started(runner, tmp_path / "checks")
        os.kill(next(iter(runner._executor._processes)), sig)
        assert checks.result(timeout=30) == f"stopped: stopped by {signal.Signals(sig).name}"
