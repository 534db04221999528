"""pkt report and pkt export: a report rebuilt from a runs table, an adapter merged into its student."""
from __future__ import annotations

import json
import os
from pathlib import Path




def cmd_report(args) -> int:
    from pkt.core import inputs, report
    from pkt.core.data import DataError

    path = Path(args.runs)
    inputs.check_regular(path, "the runs.csv a sweep wrote (in its report directory)")
    runs = _read_runs(path)
    missing = {"student", "task", "benchmark", "metric", "variant", "seed", "value"} - set(runs.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; give the runs.csv a sweep wrote")
    if runs.empty:
        raise DataError(f"{path}: no rows, only the header; give the runs.csv of a sweep that ran")
    _check_run_cells(runs, path)
    from .outputs import check_out_dir, write_files

    check_out_dir(args.out, "--out", force=args.force)
    # the report directory's other tables and its protocol (endpoint, grids, caveat), when beside it
    extra = {name: report.read_csv(table) for name in ("curves", "selection", "items", "dose")
             if (table := _beside(path, name)) is not None}
    protocol = _read_protocol(path.with_name("protocol.json"))
    # written into a temp directory, moved in only once whole: a failure leaves --out as it was
    paths = write_files(args.out, lambda tmp: report.write_report(runs, tmp, args.metric, extra.pop("curves", None),
                                                                  protocol=protocol, **extra), "--out", force=args.force)
    print(Path(paths["markdown"]).read_text())
    for name, path in paths.items():
        print(f"{name:9s} {Path(path).resolve()}")
    return 0


RUN_KEYS = ("student", "task", "benchmark", "metric", "variant")  # what pairs and labels a run


def _check_run_cells(runs, path: Path) -> None:
    """Every run names its student, task, benchmark, metric and variant: an empty cell would drop the
    run from its comparison without a word."""
    for col in RUN_KEYS:
        empty = runs[col].isna() | (runs[col].astype(str).str.strip() == "")
        if empty.any():
            from pkt.core.data import DataError

            line = int(empty.to_numpy().nonzero()[0][0]) + 2
            raise DataError(f"{path} line {line}: {col} is empty; every run needs its {col} (drop that row, or rerun "
                            "its sweep)")


def _read_protocol(path: Path) -> dict | None:
    """protocol.json beside runs.csv (a report directory's), or None; bounded like every input."""
    from pkt.core import inputs
    from pkt.core.data import DataError

    if not path.exists():
        return None
    try:
        protocol = json.loads(inputs.read_text(path, "the protocol.json a sweep wrote beside runs.csv"))
    except (ValueError, RecursionError) as e:
        if isinstance(e, inputs.InputError):
            raise
        raise DataError(f"{path}: not readable JSON ({str(e).splitlines()[0][:80]}); delete it or rerun the sweep "
                        "that wrote it") from None
    if not isinstance(protocol, dict):
        raise DataError(f"{path}: not a JSON object; delete it or rerun the sweep that wrote it")
    return protocol


def _beside(runs: Path, name: str) -> Path | None:
    """The report directory's table `name` beside its runs.csv: name.csv, or name.csv.gz (how
    docs/study/ keeps the per-item scores)."""
    return next((p for p in (runs.with_name(f"{name}.csv"), runs.with_name(f"{name}.csv.gz")) if p.is_file()), None)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _read_runs(path: Path):
    """A runs.csv as a table, or one sentence naming the file (and line) that is not one: text that is
    not UTF-8 CSV, or a value or seed cell that is empty or not a number (the statistics would pair
    and count a missing value as if it were a run)."""
    import numpy as np
    import pandas as pd

    from pkt.core import inputs, report
    from pkt.core.data import DataError

    with inputs.open_input(path, "the runs.csv a sweep wrote") as f:
        if b"\0" in f.read(65536):
            raise DataError(f"{path}: a binary file, not a CSV table; give the runs.csv a sweep wrote")
    try:
        runs = report.read_csv(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; give the runs.csv a sweep wrote") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable CSV table ({first}); give the runs.csv a sweep wrote") from None
    for col in ("value", "seed"):
        if col not in runs:
            continue
        try:
            numbers = pd.to_numeric(runs[col], errors="coerce")
        except OverflowError:  # a whole number past a float's range: read as floats, it is inf (refused below)
            numbers = pd.to_numeric(runs[col].astype(str).map(_float), errors="coerce")
        bad = numbers.isna() | ~np.isfinite(numbers.fillna(0).astype(float))  # inf, and 1e400 read as inf
        if col == "seed":  # a whole number a seed can be (pkt_core/inputs.py)
            bad |= numbers.map(lambda x: bool(np.isfinite(x)) and not (x == round(x) and 0 <= x < inputs.SEED_LIMIT))
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            cell = runs[col].iloc[i]
            kind = "whole number from 0 to 2^63 - 1" if col == "seed" else "number"
            what = ("is empty" if pd.isna(cell) else
                    f"is {str(cell)[:30]!r}, not a {'finite ' if pd.notna(numbers.iloc[i]) else ''}{kind}")
            raise DataError(f"{path} line {i + 2}: {col} {what}; every run needs a numeric {col} (drop that row, "
                            "or rerun its sweep)")
        runs[col] = numbers.astype(int) if col == "seed" else numbers
    return runs


def cmd_export(args) -> int:
    from peft import PeftModel

    from pkt.artifacts.store import Ref, Store
    from pkt.core import models, preflight

    from .outputs import check_out_dir, write_dir

    preflight.check_model_files(args.student)
    store = Store(args.store)
    if not args.adapter.strip():
        raise models.ModelNotFound("--adapter is empty; give an adapter key (`pkt store ls --kind adapter` lists "
                                   "them) or an adapter folder")
    if Path(args.adapter).is_dir():
        folder = Path(args.adapter)
    else:
        rec = store.find(args.adapter)
        if rec is None or rec["kind"] != "adapter":
            raise models.ModelNotFound(f"no adapter with key {args.adapter!r} in {store.root}; see `pkt store ls`")
        folder = store.tree(Ref.of(rec))
    _check_adapter_folder(folder)
    out = check_out_dir(args.out, "--out", force=args.force, inputs=[args.student, folder], store=store.root,
                        replaces=True)
    try:
        model = PeftModel.from_pretrained(models.load_model(args.student), str(folder)).merge_and_unload()
    except RuntimeError as e:  # torch's "size mismatch for <name>: copying a param with shape ..."
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise preflight.ShapeMismatch(f"adapter {folder} does not fit student {args.student} ({mismatch.rstrip('.')}); "
                                      "give the adapter trained for this student, or the student it was trained "
                                      "for") from None

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        models.load_tokenizer(args.student).save_pretrained(tmp)

    def check(tmp: Path) -> None:
        if not (tmp / "config.json").is_file() or not models.weight_files(tmp):
            raise OSError(f"--out {args.out}: the merged model was not written (no config.json or *.safetensors); "
                          "nothing was changed there")

    write_dir(out, fill, check)
    print(f"merged model written to {out.resolve()}")
    return 0


def _check_adapter_folder(folder: Path) -> None:
    """A peft adapter folder pkt may load: adapter_config.json and safetensors weights, or pickled
    adapter_model.bin only with --allow-bin (peft would torch.load it)."""
    from pkt.core.models import ModelNotFound, PickledWeights

    if not (folder / "adapter_config.json").is_file():
        raise ModelNotFound(f"{folder}: no adapter_config.json; give a peft adapter folder or an adapter key from "
                            "`pkt store ls`")
    if (folder / "adapter_model.safetensors").is_file():
        return
    if not (folder / "adapter_model.bin").is_file():
        raise ModelNotFound(f"{folder}: no adapter_model.safetensors; give a peft adapter folder with its weights")
    if os.environ.get("PKT_ALLOW_BIN") != "1":
        raise PickledWeights(f"{folder}: the adapter's weights are pickled (adapter_model.bin), which can run code "
                             "when loaded; convert them to safetensors, or pass --allow-bin to load them with "
                             "weights_only=True")
