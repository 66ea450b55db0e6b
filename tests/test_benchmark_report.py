"""benchmarks/run.py's report: several runs merged into one table (no timing here)."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(REPO, "benchmarks",
                                                                              "run.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def _row(bench, model, what, flax, torch_s):
    return bench.Row(model, what, flax, torch_s, None, 1.0, None, None, None, "n")


def test_merge_keeps_earlier_rows_and_replaces_remeasured(bench, tmp_path):
    out = str(tmp_path / "b.md")
    bench.write_markdown(out, [_row(bench, "snr", "forward 256x256", 1.0, 2.0),
                               _row(bench, "snr", "train 128x128 x4", 3.0, 2.0)],
                         ["--models", "snr"], ["snr forward 512x512 FAILED: E: boom"])
    bench.write_markdown(out, [_row(bench, "restormer:motion_deblurring", "forward 256x256",
                                    4.0, 8.0),
                               _row(bench, "snr", "train 128x128 x4", 1.0, 2.0)],
                         ["--models", "restormer", "snr", "--merge"], [], merge=True)
    text = open(out).read()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "**" in ln]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| restormer:motion_deblurring", "forward 256x256"], ["| snr", "forward 256x256"],
        ["| snr", "train 128x128 x4"]]
    assert "**0.50**" in rows[2]  # the re-measured row replaced the earlier 1.50
    assert text.count("`python benchmarks/run.py --models") == 2
    assert "FAILED" not in text  # snr was measured again, its old failure line is dropped
    # a run rewrites the report after each measurement: still one line for it
    bench.write_markdown(out, [_row(bench, "snr", "train 128x128 x4", 1.0, 2.0)],
                         ["--models", "restormer", "snr", "--merge"], [], merge=True)
    assert open(out).read().count("`python benchmarks/run.py --models") == 2

    bench.write_markdown(out, [_row(bench, "snr", "forward 256x256", 1.0, 1.0)], ["x"], [])
    text = open(out).read()
    assert text.count("`python benchmarks/run.py") == 1 and "restormer" not in text


def test_merge_does_not_mix_machines(bench, tmp_path, monkeypatch):
    out = str(tmp_path / "b.md")
    monkeypatch.setattr(bench, "machine", lambda: "CPU A, 2 cores")
    bench.write_markdown(out, [_row(bench, "snr", "forward 256x256", 1.0, 2.0)], ["a"], [])
    bench.write_markdown(out, [_row(bench, "aecrnet", "forward 256x256", 1.0, 2.0)], ["b"], [],
                         merge=True)
    text = open(out).read()
    assert "| snr |" in text and "| aecrnet |" in text  # same machine: merged
    monkeypatch.setattr(bench, "machine", lambda: "CPU B, 2 cores")
    bench.write_markdown(out, [_row(bench, "darkir:m", "forward 256x256", 1.0, 2.0)], ["c"], [],
                         merge=True)
    text = open(out).read()
    assert "Machine: CPU B, 2 cores." in text
    assert "| darkir:m |" in text and "| snr |" not in text and "| aecrnet |" not in text
    assert text.count("`python benchmarks/run.py") == 1
