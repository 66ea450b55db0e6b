"""Under CI a skipped test fails (tests/ci_skips.py); outside CI it stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

SAMPLE = '''
import pytest
missing = pytest.importorskip("a_module_that_is_not_installed_anywhere")

def test_never_runs():
    pass
'''

SAMPLE_IN_TEST = '''
import pytest

def test_needs_a_compiler():
    pytest.skip("no C++ compiler")

@pytest.mark.skipif(True, reason="needs the CUDA plugin (elsewhere)")
def test_gpu_only():
    pass
'''


def _run(tmp_path, source, ci):
    path = tmp_path / "test_sample.py"
    path.write_text(source)
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CI", None)
    if ci:
        env["CI"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p",
                           "no:cacheprovider", "--rootdir", str(tmp_path), str(path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_a_module_skipped_for_a_missing_import_fails_under_ci(tmp_path):
    quiet = _run(tmp_path, SAMPLE, ci=False)
    assert "1 skipped" in quiet.stdout and quiet.returncode in (0, 5), quiet.stdout  # 5: no tests
    proc = _run(tmp_path, SAMPLE, ci=True)
    assert proc.returncode != 0 and "skipped under CI" in proc.stdout, proc.stdout


def test_a_skipped_test_fails_under_ci_unless_its_reason_is_allowed(tmp_path):
    proc = _run(tmp_path, SAMPLE_IN_TEST, ci=True)
    assert "1 failed" in proc.stdout and "1 skipped" in proc.stdout, proc.stdout
    assert "no C++ compiler" in proc.stdout
    assert _run(tmp_path, SAMPLE_IN_TEST, ci=False).returncode == 0
