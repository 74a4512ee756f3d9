"""The experiment scripts run end to end at toy size and write what their docstrings promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallax.checkpoint import load_run

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = ["--steps", "3", "--dim", "32", "--batch", "8", "--eval-batches", "1", "--device", "cpu"]


def run(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(EXPERIMENTS / script), "--out", str(out), *TINY, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("task", ["pointer_chase", "chain_root"])
def test_depth_dial(tmp_path, task):
    res = run("depth_dial.py", tmp_path, "--task", task, "--nodes", "12", "--max-hops", "2", "--ood-hops", "4",
              "--transformer-layers", "1", "--iterations", "1", "3", "--sampling", "uniform",
              "--backprop-depth", "0", "--supervise-iterations")
    assert [p["iterations"] for p in res["recurrent"]["by_iterations"]] == [1, 3]
    assert load_run(tmp_path / "runs" / "recurrent").model.config.supervise_iterations  # the flag reached the model
    for point in res["recurrent"]["by_iterations"]:
        assert 0 <= point["out_of_distribution"]["token_accuracy"] <= 1
    assert res["transformer"]["parameters"] > 0
    assert (tmp_path / "accuracy_vs_iterations.png").is_file()


def test_regrounding(tmp_path):
    res = run("regrounding.py", tmp_path)
    assert set(res["models"]) == {"adapter", "none"}
    assert (tmp_path / "regrounding.png").is_file()


def test_eam_curves(tmp_path):
    res = run("eam_curves.py", tmp_path, "--heads", "2", "--tasks", "copy", "sort")
    for task in ("copy", "sort"):
        final = res["tasks"][task]["final"]
        assert len(final["residual"]) == len(final["energy"]) == res["config"]["solver_steps"]
    assert (tmp_path / "eam_curves.png").is_file()
