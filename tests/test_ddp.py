"""``torchrun --nproc_per_node 2`` runs the same fit under DistributedDataParallel (gloo on CPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from core.data import PROJECT_ROOT


def test_two_cpu_processes_train_identical_weights(ham_dir: Path, small_split: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(PROJECT_ROOT / "train.py"), "fit", "--out", str(run), "--data-dir", str(ham_dir),
               "--split-file", str(small_split), "--input-size", "64", "--epochs", "2", "--batch-size", "8",
               "--amp", "false", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all 2 ranks hold identical weights" in done.stdout
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2]  # written once, by rank 0
    assert (run / "metrics.json").is_file()
