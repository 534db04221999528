"""Torch's threads follow the CPUs pkt may use: the affinity mask and the cgroup's CPU quota."""
import os
import subprocess
import sys

import pytest

from pkt.core import cpus


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_cgroup_v2_quota_is_the_tightest_of_the_group_and_its_parents(tmp_path):
    write(tmp_path / "proc", "0::/a/b\n")
    write(tmp_path / "cg/a/b/cpu.max", "max 100000\n")
    write(tmp_path / "cg/a/cpu.max", "150000 100000\n")
    assert cpus.cgroup_quota(tmp_path / "cg", tmp_path / "proc") == 1.5
    write(tmp_path / "cg/a/cpu.max", "max 100000\n")
    assert cpus.cgroup_quota(tmp_path / "cg", tmp_path / "proc") is None


def test_the_cgroup_v1_quota(tmp_path):
    write(tmp_path / "proc", "4:memory:/x\n1:cpu,cpuacct:/x\n")
    write(tmp_path / "cg/cpu/x/cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "cg/cpu/x/cpu.cfs_period_us", "100000\n")
    assert cpus.cgroup_quota(tmp_path / "cg", tmp_path / "proc") == 0.5
    write(tmp_path / "cg/cpu/x/cpu.cfs_quota_us", "-1\n")
    assert cpus.cgroup_quota(tmp_path / "cg", tmp_path / "proc") is None


def test_a_quota_bounds_the_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: 1.5)
    assert cpus.available_cpus() == 2
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    assert cpus.available_cpus() == 4


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity on this OS")
def test_one_cpu_of_affinity_gives_one_torch_thread_per_worker():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from pkt.flows.graph import torch_threads_per_worker as t; "
            "print(t('threads', 1), t('processes', 2))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
