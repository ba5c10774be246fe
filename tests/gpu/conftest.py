"""GPU tests may not pass having tested nothing: a test whose dependency is missing skips, unless the environment
says that dependency was provided, and then it fails.

ENTCOV_GPU_REQUIRE, a comma-separated subset of REQUIRABLE (`make test-gpu` sets cuda,sglang and te unless
GPU_EXTRAS is empty; tools/gpu_check.py sets cuda):
    cuda    a usable CUDA device; implied by any other name
    te      Transformer Engine imports (make test-gpu installs it unless GPU_EXTRAS=)
    sglang  SGLang's GPU server venv imports sgl_kernel (make sglang-env-gpu)
When it is set, a skip of any test under tests/gpu fails (the CUDA skip of tests/conftest.py included), except
the skip of a `gpu_need` dependency that is not named; and a GPU session (every selected test marked gpu, none
selected included: `pytest -m gpu` that matches nothing) in which no GPU test passed fails.
Unset (CPU CI, a developer's machine) everything skips as before.

Tests declare a dependency with the `gpu_need` fixture:

    def test_te(gpu_need):
        gpu_need("te", None if te_imports else "transformer_engine does not import: ...")
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "ENTCOV_GPU_REQUIRE"
REQUIRABLE = ("cuda", "te", "sglang")
OPTIONAL_SKIP = "[optional dependency missing]"
"""Prefix of the skip reason of a `gpu_need` dependency that is not required: the only skip allowed under
ENTCOV_GPU_REQUIRE."""
_PASSED = pytest.StashKey[int]()
_GPU_SESSION = pytest.StashKey[bool]()


def required_deps(environ=None) -> frozenset[str]:
    """The dependencies ENTCOV_GPU_REQUIRE names (with 'cuda' added when any is named); ValueError for a name
    not in REQUIRABLE."""
    raw = (os.environ if environ is None else environ).get(REQUIRE_ENV, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    unknown = sorted(names - set(REQUIRABLE))
    if unknown:
        raise ValueError(f"{REQUIRE_ENV}={raw!r}: unknown {unknown}; use a comma-separated subset of "
                         f"{', '.join(REQUIRABLE)} (e.g. {REQUIRE_ENV}=cuda,te), or unset it to let tests skip")
    return frozenset(names | {"cuda"}) if names else frozenset()


def need(dep: str, missing: str | None, environ=None) -> None:
    """In a test: nothing when ``missing`` is None (the dependency is there); else skip with ``missing`` as the
    reason, or fail when ENTCOV_GPU_REQUIRE names ``dep``."""
    if dep not in REQUIRABLE:
        raise ValueError(f"gpu_need: unknown dependency {dep!r}; expected one of {REQUIRABLE}")
    if missing is None:
        return
    environ = os.environ if environ is None else environ
    if dep in required_deps(environ):
        pytest.fail(f"{dep} is required ({REQUIRE_ENV}={environ.get(REQUIRE_ENV)}) but {missing}", pytrace=False)
    pytest.skip(f"{OPTIONAL_SKIP} {dep}: {missing}")


@pytest.fixture(scope="session")
def gpu_need():
    """``gpu_need(dep, missing)``: skip, or fail when the dependency is required (see :func:`need`)."""
    return need


def pytest_configure(config):
    required_deps()  # a misspelt ENTCOV_GPU_REQUIRE stops the session at once, naming the value
    config.stash[_PASSED] = 0


def pytest_collection_finish(session):
    session.config.stash[_GPU_SESSION] = all("gpu" in item.keywords for item in session.items)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    required = required_deps()
    if report.passed and report.when == "call":
        item.config.stash[_PASSED] += 1
    if required and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(OPTIONAL_SKIP):
            report.outcome = "failed"
            report.longrepr = (f"{REQUIRE_ENV}={','.join(sorted(required))} is set, so GPU tests may not skip; "
                               f"this one skipped: {reason}")
    return report


def pytest_sessionfinish(session, exitstatus):
    required, stash = required_deps(), session.config.stash
    if (required and stash.get(_GPU_SESSION, False) and stash.get(_PASSED, 0) == 0
            and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"{REQUIRE_ENV}={','.join(sorted(required))} is set but no GPU test passed: "
                                "this session tested nothing on the GPU", red=True)
