"""The main job end to end at the test size, through Prefect."""
import math
import shutil

import pandas as pd

from pkt.flows.demo import ALL_VARIANTS, demo


def test_demo_end_to_end_then_fully_reused(prefect_env, tmp_path):
    store, report_dir = str(tmp_path / "store"), tmp_path / "report"
    first = demo(size="test", seeds=[0, 1], store=store, report_dir=str(report_dir))
    rows = first["table"]
    gsm = [r for r in rows if r["metric"] == "exact_match/strict-match"]
    assert sorted(r["variant"] for r in gsm) == sorted(ALL_VARIANTS)
    assert all(math.isfinite(r["mean"]) for r in rows)
    nll = {r["variant"]: r for r in rows if r["metric"] == "answer_nll"}
    assert set(nll) == set(ALL_VARIANTS)
    assert {v: r["n"] for v, r in nll.items()} == {v: 1 if v == "vanilla" else 2 for v in ALL_VARIANTS}
    assert "diff" in nll["transfer"] and math.isfinite(nll["transfer"]["diff"])
    for name in ("report.md", "summary.csv", "runs.csv", "report.png"):
        assert (report_dir / name).stat().st_size > 0
    text = (report_dir / "report.md").read_text()
    assert "transfer" in text and "lora" in text

    drawn = {f.name: f.read_bytes() for f in report_dir.iterdir()}
    shutil.rmtree(report_dir)  # the report is a store node too: a rerun puts it back, drawing nothing
    second = demo(size="test", seeds=[0, 1], store=store, report_dir=str(report_dir))
    assert second["computed"] == 0 and second["family"]["status"] == "reused"
    assert ("report", "reused") in {(kind, status) for kind, _, status in second["nodes"]}
    assert {f.name: f.read_bytes() for f in report_dir.iterdir()} == drawn
    pd.testing.assert_frame_equal(pd.DataFrame(second["table"]), pd.DataFrame(first["table"]))
