"""A pytest plugin (loaded by conftest.py): under CI (``CI`` set in the environment, as
``.ci/run`` does) a skipped test or module fails instead, naming what it skipped for, so that a
missing C++ compiler or torch cannot turn CI green by running less. Skips whose reason names a
deliberate part of another environment (:data:`ALLOWED`) stay skips."""

from __future__ import annotations

import os

import pytest

# reasons that CI's environment is not meant to satisfy
ALLOWED = (
    "needs the CUDA plugin",  # the GPU plan test: .venv-gpu, make test-gpu-plan
)


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip(report) -> None:
    if not (_under_ci() and report.skipped) or getattr(report, "wasxfail", None):
        return
    reason = _reason(report)
    if any(a in reason for a in ALLOWED):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI ({reason}): CI must run every test; install what it "
                       "needs, or add the reason to tests/ci_skips.py ALLOWED with why")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())
