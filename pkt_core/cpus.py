"""How many CPUs this process may use: its affinity mask (taskset, a scheduler's cpuset), bounded by its
cgroup's CPU quota (a container's CPU limit, docker run's cpus option), which os.cpu_count() and
torch's default both ignore. Torch with more threads than that competes with itself for the share it
has, and slows far more than the load explains."""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota_v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_quota(root: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time the process's cgroup (or the tightest of its ancestors) may use; None: no limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "cpu" not in controllers.split(","):
            continue
        base = root if v2 else root / "cpu"
        folder = base / path.lstrip("/")
        while True:  # the process's own group and every group above it
            q = _quota_v2(folder) if v2 else _quota_v1(folder)
            if q is not None:
                quotas.append(q)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(quotas) if quotas else None


def available_cpus() -> int:
    """CPUs this process may use: its affinity, at most its cgroup quota rounded up, at least 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota()
    return max(1, min(n, math.ceil(quota)) if quota else n)
