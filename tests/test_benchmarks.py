"""The benchmark scripts run and report what RESULTS.md quotes (tiny settings: their numbers are measured elsewhere,
on an idle machine, never in a test)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import PROJECT_ROOT


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


def test_bench_predict_reports_a_median(ham_dir: Path) -> None:
    done = run_script("benchmarks/bench_predict.py", "--run", "models/default", "--repeats", "3")
    assert done.returncode == 0, done.stderr
    median = re.search(r"median ([\d.]+) ms, p90 ([\d.]+) ms over 3 calls", done.stdout)
    assert median and 0 < float(median[1]) <= float(median[2])


def test_bench_predict_refuses_compile_with_explain() -> None:
    done = run_script("benchmarks/bench_predict.py", "--compile", "--explain")
    assert done.returncode == 2 and "Grad-CAM hooks need the eager modules" in done.stderr


def test_bench_train_reports_throughput_and_its_parts() -> None:
    done = run_script("benchmarks/bench_train.py", "--input-size", "64", "--batch-size", "4", "--repeats", "2",
                      "--device", "cpu")
    assert done.returncode == 0, done.stderr
    found = re.search(r"batch 4, CPU, \d+ threads: (\d+) img/s .* augment\+normalise ([\d.]+) ms", done.stdout)
    assert found and int(found[1]) > 0 and float(found[2]) > 0


@pytest.mark.parametrize("script", ["bench_predict.py", "bench_train.py", "bench_dashboard.py", "ensemble_search.py",
                                    "load_dashboard.py"])
def test_benchmark_scripts_document_their_command(script: str) -> None:
    done = run_script(f"benchmarks/{script}", "--help")
    assert done.returncode == 0 and f"benchmarks/{script}" in done.stdout, done.stderr
