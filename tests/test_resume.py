"""Killing a run at any moment and resuming it gives the losses of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from parallax.checkpoint import load_run
from parallax.config import RunConfig
from parallax.errors import TrainingDiverged
from parallax.train import Trainer, resume_config, train
from parallax.train.metrics_log import read_metrics

STEPS = 120


def overrides(tiny_sort_overrides):
    return tiny_sort_overrides + [f"train.steps={STEPS}", "train.save_every=5", "train.eval_every=1000", "model.dropout=0.1"]


def losses(run_dir):
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train_loss" in row:
            assert row["step"] not in by_step, f"step {row['step']} logged twice"
            by_step[row["step"]] = row["train_loss"]
    return by_step


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_sort_overrides):
    over = overrides(tiny_sort_overrides)
    reference = tmp_path / "reference"
    train(RunConfig.from_dict({}, over), reference)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallax", "train", "--out", str(killed), *over],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not pointer.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    interrupted_at = load_run(killed).step  # whatever was last written must load
    assert 0 < interrupted_at < STEPS
    train(resume_config(killed, []), killed, resume=True)
    ref, got = losses(reference), losses(killed)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step


def test_resume_logs_each_step_once(tmp_path, tiny_sort_overrides):
    """Steps logged after the last checkpoint by a run that stopped (here: diverged at step 9,
    checkpoint at 6) are logged again by the resumed run; the old rows are dropped first, in
    metrics.jsonl and in TensorBoard, so each step has one row of each kind."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="at step 9"):
        trainer_diverging_at(9, out, tiny_sort_overrides).fit()
    assert [r["step"] for r in read_metrics(out) if "train_loss" in r] == list(range(1, 9))
    train(resume_config(out, []), out, resume=True)
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))


def test_resume_cannot_change_the_model(tmp_path, tiny_sort_overrides):
    out = tmp_path / "run"
    train(RunConfig.from_dict({}, tiny_sort_overrides), out)
    from parallax.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot change the model"):
        resume_config(out, ["model.d_model=64"])
    with pytest.raises(ConfigError, match="^train.steps must be int"):  # the override's error, not the file's
        resume_config(out, ["train.steps=abc"])
    assert resume_config(out, ["train.steps=20"]).train.steps == 20


def trainer_diverging_at(step: int, out, overrides) -> Trainer:
    """A trainer whose loss is NaN from training step ``step`` on."""
    trainer = Trainer(RunConfig.from_dict({}, overrides), out)
    real_forward = trainer.forward_model

    def poisoned(*args, **kwargs):
        result = real_forward(*args, **kwargs)
        if trainer.step + 1 >= step:  # trainer.step counts the steps already taken
            result.loss = result.loss * float("nan")
        return result

    trainer.forward_model = poisoned
    return trainer


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, tiny_sort_overrides):
    out = tmp_path / "run"
    trainer = trainer_diverging_at(4, out, tiny_sort_overrides + ["train.save_every=2"])
    with pytest.raises(TrainingDiverged, match="at step 4"):
        trainer.fit()
    assert load_run(out).step == 2


def test_divergence_between_logs_names_its_step_and_keeps_the_earlier_checkpoint(tmp_path, tiny_sort_overrides):
    """The loss is read only at log steps; a NaN at step 6 is still reported as step 6, before
    the step-8 checkpoint is written over good weights, and the step-4 checkpoint survives."""
    out = tmp_path / "run"
    over = tiny_sort_overrides + ["train.steps=12", "train.log_every=5", "train.save_every=4"]
    with pytest.raises(TrainingDiverged, match="at step 6"):
        trainer_diverging_at(6, out, over).fit()
    assert load_run(out).step == 4


def test_resume_keeps_its_overrides_and_refuses_a_finished_run(tmp_path, tiny_sort_overrides, capsys):
    """``train --resume RUN train.steps=N`` records N, so a later plain ``--resume`` goes on to
    it; a run already at train.steps is a one-line error, not a silent no-op."""
    from parallax.checkpoint import read_run_config
    from parallax.cli.main import main

    out = tmp_path / "run"
    train(RunConfig.from_dict({}, tiny_sort_overrides), out)  # 12 steps
    assert main(["train", "--resume", str(out)]) == 2
    assert "at step 12 already" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "train.steps=18", "train.save_every=100"]) == 0
    assert read_run_config(out).train.steps == 18 and load_run(out).step == 18
    assert main(["train", "--resume", str(out), "train.steps=24"]) == 0
    assert load_run(out).step == 24


def test_data_prepared_again_with_a_larger_vocabulary_is_a_one_line_error(tmp_path, tiny_sort_overrides):
    """A run whose data now has more tokens than its model's vocabulary (text prepared again)
    is refused by name, where loading it would index past the embedding."""
    from parallax.errors import CheckpointError

    out = tmp_path / "run"
    train(RunConfig.from_dict({}, tiny_sort_overrides), out)
    saved = json.loads((out / "config.json").read_text())
    saved["model"]["vocab_size"] -= 1  # as if the data's vocabulary grew by one since
    (out / "config.json").write_text(json.dumps(saved))
    for load in (lambda: load_run(out), lambda: Trainer(resume_config(out, []), out, resume=True)):
        with pytest.raises(CheckpointError, match="the data changed since the run was trained"):
            load()


def test_data_prepared_again_is_refused_on_resume(tmp_path, tiny_sort_overrides):
    """Resuming compares the data's fingerprint with the one the run recorded at its start."""
    from parallax.errors import CheckpointError

    out = tmp_path / "run"
    train(RunConfig.from_dict({}, tiny_sort_overrides), out)
    env = json.loads((out / "environment.json").read_text())
    Trainer(resume_config(out, ["train.steps=13"]), out, resume=True)  # the same data: resumes
    env["data"] += " (prepared again)"
    (out / "environment.json").write_text(json.dumps(env))
    with pytest.raises(CheckpointError, match="the data changed since the run started"):
        Trainer(resume_config(out, ["train.steps=13"]), out, resume=True)
