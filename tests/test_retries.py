"""A source read that fails on I/O that may pass is retried after a delay; one whose input is wrong is not."""
import errno

import pytest
from prefect import flow

from pkt.tasks import sources


@pytest.mark.parametrize("error, calls", [(OSError(errno.EIO, "Input/output error"), 2),
                                          (FileNotFoundError(errno.ENOENT, "No such file"), 1)])
def test_a_transient_source_failure_is_retried(prefect_env, tmp_path, monkeypatch, error, calls):
    f = tmp_path / "train.jsonl"
    f.write_text("{}\n")
    seen, real = [], sources.file_source

    def flaky(path):
        seen.append(path)
        if len(seen) == 1:
            raise error
        return real(path)

    monkeypatch.setattr(sources, "file_source", flaky)
    quick = sources.source.with_options(retry_delay_seconds=0)

    @flow
    def read():
        return quick("file", str(f), str(tmp_path / "store"), "file[train.jsonl]", return_state=True)

    state = read(return_state=True)
    assert len(seen) == calls
    assert state.is_completed() == (calls == 2)
    assert sources.source.retries == sources.SOURCE_RETRIES > 0 and sources.source.retry_delay_seconds
