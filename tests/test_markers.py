"""The marker check in conftest.py: a test that starts Triton without ``@pytest.mark.triton``
fails at once, before any Triton process starts, so that ``-m "not triton"`` stays the fast
pass. Run on a copy of the suite's conftest in a pytester directory."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent


def test_a_test_that_starts_triton_unmarked_fails(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    triton: needs real Triton\n")
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.syspathinsert(TESTS)  # harness
    pytester.makepyfile(test_unmarked='''
        import pytest

        def test_uses_the_pool(worker_pool):
            pass

        def test_starts_a_pool(loop_thread):
            from harness import start_pool
            start_pool(loop_thread, 1)

        @pytest.mark.triton
        def test_marked_and_never_run():
            pass
    ''')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-m", "not triton")
    result.assert_outcomes(failed=1, errors=1, deselected=1)
    result.stdout.fnmatch_lines([
        "*test_uses_the_pool uses the worker_pool fixture and starts real Triton without "
        "@pytest.mark.triton*",
        "*test_starts_a_pool starts real Triton without @pytest.mark.triton*",
    ])
