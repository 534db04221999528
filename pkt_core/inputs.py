"""Every input file bounded before it is read: only regular files, of a size and line length pkt
can hold, with whole numbers in a range the code below can use.

A device (/dev/zero), a FIFO or a socket given as a seeds file, config or runs table would be read
until memory runs out, or block forever; a 50 MB line would be parsed and tokenized whole. Files
are opened without blocking, checked with fstat on the open descriptor (the file read is the
file checked), and read through a bounded reader. `--max-input-mb N` (PKT_MAX_INPUT_MB, which
carries it to worker processes) raises both limits to N MiB.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import UserError

ENV = "PKT_MAX_INPUT_MB"
MAX_FILE_MB = 512  # a seeds/train/test jsonl, a sweep config, a runs table: far larger is not one
MAX_LINE_MB = 1  # one chat sample or one CSV row: thousands of times any real one
SEED_LIMIT = 2**63  # torch.manual_seed and numpy take seeds below 2^64; pkt keeps them signed-64-bit safe


class InputError(UserError, ValueError):
    pass


def limits() -> tuple[int, int]:
    """(file bytes, line bytes) allowed: the defaults, or --max-input-mb's N MiB for both."""
    value = os.environ.get(ENV)
    if value is None:
        return MAX_FILE_MB * 2**20, MAX_LINE_MB * 2**20
    try:
        n = float(value)
    except ValueError:
        n = 0
    if not n > 0 or n == float("inf"):
        raise InputError(f"--max-input-mb {value}: give a positive number of MiB, e.g. --max-input-mb 2048")
    return int(n * 2**20), int(n * 2**20)


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def check_regular(path: str | Path, what: str) -> os.stat_result:
    """The stat of a regular file, or one sentence: missing, a directory, a device, a FIFO, a socket."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; give {what}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror}); give {what}") from None
    _refuse_irregular(path, st, what)
    return st


def _refuse_irregular(path: Path, st: os.stat_result, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise InputError(f"{path}: is {kind}, not a regular file; give {what}")


def check_folder(path: str | Path, what: str) -> None:
    """Every entry under a source folder (a model directory, a task directory) is a regular file or a
    folder: a FIFO, a device or a socket among them (which a digest or a loader would block on, or read
    without end) is one sentence naming it. Symlinks are followed to what they name; a symlinked
    folder is not descended."""
    for root, _, names in os.walk(path):
        for name in sorted(names):
            f = Path(root) / name
            try:
                st = os.stat(f)
            except OSError:  # a dangling link: whoever reads it says so
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                kind = KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
                raise InputError(f"{f}: is {kind} inside {what} {path}, which pkt reads as regular files only; "
                                 "remove it (or give a copy of the folder without it)")


def open_input(path: str | Path, what: str) -> BinaryIO:
    """The file opened for reading, once its open descriptor is a regular file within the size limit
    (opened non-blocking, so that a FIFO with no writer is refused instead of waited for)."""
    path = Path(path)
    check_regular(path, what)  # a clear sentence for a missing file or a directory
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f"{path}: cannot be opened ({e.strerror}); give {what}") from None
    try:
        st = os.fstat(fd)  # the file being read, even if the path was swapped since the check above
        _refuse_irregular(path, st, what)
        max_bytes, _ = limits()
        if st.st_size > max_bytes:
            raise InputError(f"{path}: {_mib(st.st_size)}, above the {_mib(max_bytes)} pkt reads of one input; "
                             f"check it is {what}, or pass --max-input-mb {st.st_size // 2**20 + 1} to read it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, what: str) -> bytes:
    """The whole file, bounded by the size limit (also when it grows while being read)."""
    max_bytes, _ = limits()
    with open_input(path, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"{path}: grew past {_mib(max_bytes)} while being read; give {what} that is not being "
                         "written to")
    return data


def read_text(path: str | Path, what: str, max_line: bool = True) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped), bounded in size and line length."""
    data = read_bytes(path, what)
    if max_line:
        check_line_lengths(path, data, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as "
                         "UTF-8") from None


def check_line_lengths(path: str | Path, data: bytes, what: str) -> None:
    _, max_line = limits()
    start, n = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > max_line:
            raise _long_line(path, n, max_line, what)
        start, n = end + 1, n + 1


def _long_line(path, n: int, max_line: int, what: str) -> InputError:
    return InputError(f"{path} line {n}: longer than {_mib(max_line)}, far beyond any line of {what}; check the "
                      f"file, or pass --max-input-mb N to read lines up to N MiB")


def lines(path: str | Path, what: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a text file, each line and the whole file within the limits:
    memory stays bounded whatever the file holds."""
    max_bytes, max_line = limits()
    total = 0
    with open_input(path, what) as f:
        for n in range(1, 2**62):
            raw = f.readline(max_line + 2)  # the newline (and a CR) are not part of the line's length
            if not raw:
                return
            if len(raw.rstrip(b"\r\n")) > max_line:
                raise _long_line(path, n, max_line, what)
            total += len(raw)
            if total > max_bytes:
                raise InputError(f"{path}: grew past {_mib(max_bytes)} while being read; give {what} that is not "
                                 "being written to")
            yield n, raw


def check_seed(value: int, where: str) -> int:
    """A seed pkt can hand to torch, numpy and random: a whole number from 0 to 2^63 - 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        big = isinstance(value, int) and abs(value).bit_length() > 96  # str() of a 100,000-digit int raises
        shown = f"(a {abs(value).bit_length()}-bit number)" if big else str(value)[:40]
        raise InputError(f"{where} {shown}: a seed must be a whole number from 0 to 2^63 - 1 "
                         f"({SEED_LIMIT - 1})")
    return value


def check_port(value: str, flag: str = "--port") -> int:
    """A TCP port to listen on: 1 to 65535."""
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise InputError(f"{flag} {value}: give a port from 1 to 65535, e.g. {flag} 4200")
    return port
