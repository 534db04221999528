"""Prefect's per-node costs on the process pool paid once (flows/pool_costs.py) without changing what a node
sees: the settings of the context it was submitted from, and a verified TLS context."""
from __future__ import annotations

import ssl

import certifi
import pytest
from prefect import task


@task
def settings_seen() -> tuple[int, str]:
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return settings.client.max_retries, str(settings.api.url)


@task
def pays_once() -> bool:
    """Whether this process hydrates a node's context through pool_costs (the runner set it up here)."""
    import prefect.context
    import prefect.task_engine

    return all(getattr(m.hydrated_context, "_pkt_cached", False) for m in (prefect.context, prefect.task_engine))


@pytest.mark.parametrize("kind", ["processes", "dask"])
def test_pool_nodes_see_the_settings_they_were_submitted_under_each_time(prefect_env, kind):
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from pkt.flows.graph import task_runner

    if kind == "dask":
        pytest.importorskip("prefect_dask")
    default, url = PREFECT_CLIENT_MAX_RETRIES.value(), PREFECT_API_URL.value()
    with task_runner(kind, 2) as runner:
        seen = [runner.submit(settings_seen, {}).result(timeout=240) for _ in range(3)]  # one serialization, reused
        with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: default + 2}):  # a new settings context
            seen += [runner.submit(settings_seen, {}).result(timeout=240) for _ in range(3)]
        seen.append(runner.submit(settings_seen, {}).result(timeout=240))  # back to the first one
        assert runner.submit(pays_once, {}).result(timeout=240)
    assert seen == [(default, url)] * 3 + [(default + 2, url)] * 3 + [(default, url)]


def test_prefects_client_module_gets_one_verified_tls_context_per_certificate_file():
    from pkt.flows.pool_costs import _TLSContextOnce

    tls = _TLSContextOnce()
    first, again = (tls.create_default_context(cafile=certifi.where()) for _ in range(2))
    assert first is again and first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    assert tls.CERT_NONE == ssl.CERT_NONE  # the rest of the module is ssl's own
