"""pkt as a real package: the wheel, installed non-editable into a fresh venv, runs `pkt extract` and a
pkt benchmark from a directory outside the checkout, and nothing of ours is a top-level module.

The throwaway venv reuses this environment's third-party packages through a .pth file (only
pkt itself is installed), so the test is offline and takes seconds beyond the two pkt runs.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "flows", "tasks", "artifacts", "pkt_core"]


def build_wheel(out: Path) -> Path:
    """From a copy of the sources: a stale build/ folder in the checkout cannot leak into it."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir()
                                        else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (out / "dist").glob("pkt-*.whl")
    return wheel


def fresh_venv(path: Path, wheel: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # this environment's site-packages, listed without processing their .pth files: an editable
    # install of pkt there (a finder hook) does not come along
    ours = {p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)} | {sysconfig.get_paths()["purelib"]}
    Path(site, "pkt-test-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True)
    return python


@pytest.mark.slow
@pytest.mark.ci
def test_the_installed_wheel_runs_extract_and_a_pkt_benchmark(mini_family, tmp_path):
    wheel = build_wheel(tmp_path / "build")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pkt", wheel.name.split("-py")[0] + ".dist-info"}
    for f in (ROOT / "pkt_core/lm_eval_tasks").iterdir():  # every file the code reads at run time
        assert f"pkt/core/lm_eval_tasks/{f.name}" in names

    python = fresh_venv(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PYTHONPATH"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PKT_STORE=str(tmp_path / "store"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")

    def run(*argv):
        return subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)

    for top in ("tasks", "flows", "artifacts", "pkt_core"):
        assert run(str(python), "-c", f"import {top}").returncode != 0, f"`import {top}` works: not one namespace"
    where = run(str(python), "-c", "import pkt.core.evaluate as e, pkt.flows.cli as c; print(e.__file__, c.__file__)")
    assert all(p.startswith(str(tmp_path / "venv")) for p in where.stdout.split()), where

    pkt = str(tmp_path / "venv/bin/pkt")
    fam = mini_family
    out = run(pkt, "extract", "--teacher", str(fam / "teacher"), "--seeds", str(fam / "tasks/gsm/seeds.jsonl"),
              "--student", str(fam / "student"), "--rank", "2")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    ledger = [line.split() for line in out.stdout.splitlines()  # kind key status
              if line.split()[2:] in (["computed"], ["reused"])]
    assert {"sensitivity", "extraction", "lora_init"} <= {k for k, _, _ in ledger}, out.stdout
    assert {s for _, _, s in ledger} == {"computed"}, out.stdout
    # a pkt benchmark (sni: its YAML calls pkt_metrics.py) on the untrained student
    out = run(pkt, "transfer", "--teacher", str(fam / "teacher"), "--student", str(fam / "student"), "--task-dir",
              str(fam / "tasks/sni"), "--benchmark", "sni", "--variants", "vanilla", "--report-dir",
              str(tmp_path / "report"))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "rougeL" in out.stdout and "exact_match" in out.stdout, out.stdout
