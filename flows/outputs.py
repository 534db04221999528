"""Where pkt writes outside its store (report directories, `pkt export --out`): never over a
user's files.

A directory is written only when it is new, empty, or one pkt wrote before (a report directory
carries a marker file); `--force` allows another one, but never a model input's own directory
(nor one inside it, nor, for `export`, one holding it) and never the store itself.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from pkt.core.errors import UserError

MARKER = ".pkt-report"  # in a report directory pkt wrote: the next run may replace its report files


class OutputRefused(UserError):
    pass


def check_out_dir(path: str | Path, flag: str, *, force: bool = False, inputs: Iterable[str | Path] = (),
                  store: str | Path | None = None, replaces: bool = False) -> Path:
    """Refuse (with a sentence) an output directory that would clobber something: an existing file,
    a model input's directory, the store, or a non-empty directory pkt did not write (unless force).
    replaces: the whole directory is replaced (export), so one holding an input is refused too."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"{flag} {path} is an existing file; give a new or empty directory")
    where = out.resolve()
    for given in inputs:
        inp = Path(given).expanduser().resolve()
        if where == inp or inp in where.parents or (replaces and where in inp.parents):
            how = "is" if where == inp else "is inside" if inp in where.parents else "holds"
            raise OutputRefused(f"{flag} {path} {how} the model input {given}: writing there would replace its "
                                "files, so pkt never does, even with --force; give another directory")
    if store is not None:
        root = Path(store).expanduser().resolve()
        if where == root or root in where.parents or (replaces and where in root.parents):
            how = "is" if where == root else "is inside" if root in where.parents else "holds"
            raise OutputRefused(f"{flag} {path} {how} the store {store}; give a directory outside it")
    if out.is_dir() and not force and not (out / MARKER).exists():
        present = sorted(p.name for p in out.iterdir())
        if present:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            raise OutputRefused(f"{flag} {path} is not empty ({shown}) and pkt did not write it; give a new or "
                                "empty directory, or pass --force to write into it anyway")
    return out


def claim_report_dir(path: str | Path, flag: str = "report directory", force: bool = False, **checks) -> Path:
    """Create the report directory (if new) and mark it as pkt's, after check_out_dir: a directory
    holding a user's files is refused unless force (the CLI's --force claims it before the flow)."""
    out = check_out_dir(path, flag, force=force, **checks)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        marker.write_text("pkt writes its report files here; the next run may replace them\n")
    return out


def write_dir(path: str | Path, fill: Callable[[Path], None], check: Callable[[Path], None]) -> Path:
    """Write a whole directory atomically: fill() a temp directory beside path, check() it (raise if
    something is missing), then move it into place, replacing what was there (already allowed by
    check_out_dir). A failure leaves path as it was."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.pkt-tmp-", dir=out.parent))
    try:
        fill(tmp)
        check(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.pkt-old-", dir=out.parent))
            os.replace(out, old / "dir")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_files(path: str | Path, fill: Callable[[Path], dict], flag: str = "report directory", force: bool = False,
                **checks) -> dict[str, Path]:
    """Report files written whole or not at all: fill(tmp) writes them into a temp directory beside
    path and returns {name: its path there}; only once it has succeeded is path claimed
    (claim_report_dir) and each file moved in (os.replace). A failure leaves path as it was."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.pkt-tmp-", dir=out.parent))
    try:
        made = fill(tmp)
        claim_report_dir(out, flag, force=force, **checks)
        moved = {}
        for name, file in made.items():
            moved[name] = out / Path(file).relative_to(tmp)
            os.replace(file, moved[name])
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
