"""A second Ctrl-C half a second after the first (issue 26, case 8: it once aborted the process with
SIGABRT, "terminate called without an active exception"), under a real `pkt extract` in a sensitivity
node: every time the command exits 130 with pkt's sentence, no abort, no traceback."""
import signal
import subprocess
import sys
import time

import pytest

from procs import pkt_env, pkt_until

TRIES = 4


def _ctrl_c_twice(argv, tmp_path, ready: str, gap: float) -> tuple[int, str]:
    """Run `pkt argv`; once `ready` is printed, SIGINT, then SIGINT again `gap` s later. (code, output)."""
    with pkt_until(argv, tmp_path, ready) as (p, out):
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        time.sleep(gap)
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=180)
        return p.returncode, "".join(out) + rest


@pytest.mark.slow
def test_a_second_ctrl_c_half_a_second_after_the_first_exits_130_every_time(mini_family, tmp_path):
    seeds = tmp_path / "many.jsonl"
    seeds.write_text((mini_family / "tasks/gsm/seeds.jsonl").read_text() * 1000)  # 8,000 samples: minutes
    argv = ["extract", "--teacher", str(mini_family / "teacher"), "--seeds", str(seeds),
            "--student", str(mini_family / "student"), "--rank", "2"]
    for i in range(TRIES):
        code, out = _ctrl_c_twice(argv, tmp_path, "sensitivity: 1/", gap=0.5)
        said = f"try {i + 1}: exit {code}\n{out[-3000:]}"
        err = out.split("sensitivity: 1/", 1)[1]  # what it printed once the node was under way
        assert code == 130, said  # SIGABRT would be -6, an uncaught KeyboardInterrupt -2 or 1
        assert "terminate called" not in err and "Traceback" not in err and "Crash detected" not in err, said
        lines = [x for x in err.splitlines() if x.strip()]
        assert lines[-1] == "pkt extract: interrupted; nothing half-done was stored, a rerun resumes", said
        assert sum("already stopping" in x for x in lines) <= 1, said  # the second Ctrl-C said once, if at all
        assert not list((tmp_path / "store").glob("keys/sensitivity/*.json"))


LATE = """
import os, signal, sys, time
from pkt.flows import cli

def ctrl_c(args):  # a command stopped by Ctrl-C
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)

cli.COMMANDS["store"] = ctrl_c
code = cli.main(["store", "ls"])
print("main returned", code, flush=True)
os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C as the interpreter shuts down (threads joined, atexit)
time.sleep(5)
print("not reached", flush=True)
sys.exit(code)
"""


def test_a_ctrl_c_after_pkt_said_it_stopped_exits_130_at_once(tmp_path):
    """The window the in-process handler does not cover: the second Ctrl-C lands after main() printed
    its sentence and gave the handlers back, while the interpreter tears down. It exits 130 there and
    then, with no KeyboardInterrupt raised inside the teardown (a traceback, or SIGABRT with torch's
    threads up)."""
    done = subprocess.run([sys.executable, "-c", LATE], env=pkt_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 130, (done.returncode, done.stdout, done.stderr)
    assert "main returned 130" in done.stdout and "not reached" not in done.stdout
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == ["pkt store: interrupted; nothing half-done was stored, a rerun "
                                                "resumes"], done.stderr
