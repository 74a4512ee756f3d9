import re

import pytest
import torch

from parallax.config import RunConfig
from parallax.train import Trainer, train
from parallax.train.metrics_log import read_metrics
from parallax.train.schedule import lr_at


def test_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_run_directory_describes_itself(tmp_path, tiny_sort_overrides):
    out = tmp_path / "run"
    train(RunConfig.from_dict({}, tiny_sort_overrides), out)
    env = (out / "environment.json").read_text()
    assert '"torch"' in env and '"data": "SortTask(length=5, vocab=8)"' in env
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 13))
    assert any("val_token_accuracy" in r for r in rows)
    assert list(out.glob("events.out.tfevents.*"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_sort_overrides):
    """Two micro-batches of 8 give the same update as one batch of the same 16 examples."""
    base = tiny_sort_overrides + ["train.steps=1", "train.grad_clip=0", "train.warmup_steps=0"]
    a = Trainer(RunConfig.from_dict({}, base + ["train.batch_size=8", "train.grad_accum=2"]), tmp_path / "a")
    b = Trainer(RunConfig.from_dict({}, base + ["train.batch_size=8", "train.grad_accum=1"]), tmp_path / "b")
    from parallax.data.batch import batch_generator

    batches = [a.source.batch("train", 8, batch_generator(0, "train", i)) for i in range(2)]
    ids = torch.cat([x.input_ids for x in batches])
    tg = torch.cat([x.targets for x in batches])
    mask = torch.cat([x.loss_mask for x in batches])
    a.train_step()
    b.model(ids, tg, mask).loss.backward()
    b.optimizer.step()
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_transformer_learns_sort(tmp_path):
    over = ["model.name=transformer", "data.name=sort", "train.steps=150", "train.progress=false",
            "train.eval_every=150", "train.save_every=150"]
    summary = train(RunConfig.from_dict({}, over), tmp_path / "run")
    assert summary["eval"]["token_accuracy"] > 0.9


def test_bare_train_command_runs_the_default_job(tmp_path):
    """`parallax train` with no model/task trains the small CWS BIND/RECALL job of the README."""
    import json

    from parallax.cli.main import main

    out = tmp_path / "default"
    assert main(["train", "--out", str(out), "train.steps=2", "train.eval_every=2",
                 "train.eval_batches=1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["name"] == "cws" and cfg["model"]["d_model"] == 64
    assert cfg["data"]["name"] == "bind_recall" and cfg["data"]["n_keys"] == 8
    assert cfg["train"]["steps"] == 2

    explicit = tmp_path / "explicit"
    assert main(["train", "--out", str(explicit), "--model", "cws", "train.steps=1",
                 "train.eval_every=1", "train.eval_batches=1"]) == 0
    assert json.loads((explicit / "config.json").read_text())["model"]["d_model"] != 64


@pytest.mark.parametrize("progress", ["true", "false"])
def test_train_json_prints_only_the_summary(tmp_path, tiny_sort_overrides, capsys, progress):
    """`parallax train --json` writes JSON alone to stdout; the evaluation lines go to stderr,
    with the progress bar or without it."""
    import json

    from parallax.cli.main import main

    assert main(["train", "--json", "--out", str(tmp_path / "run"), *tiny_sort_overrides,
                 f"train.progress={progress}"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 12
    assert captured.err.count("step") >= 2  # the evaluations at steps 6 and 12


def test_compile_mode_reaches_torch_compile(tmp_path, tiny_sort_overrides, monkeypatch):
    """train.compile_mode is passed on (reduce-overhead: CUDA graphs of the training step)."""
    import parallax.train.trainer as trainer_module

    seen = []
    monkeypatch.setattr(trainer_module.torch, "compile", lambda model, mode: seen.append(mode) or model)
    over = tiny_sort_overrides + ["train.compile=true", "train.compile_mode=reduce-overhead"]
    Trainer(RunConfig.from_dict({}, over), tmp_path / "run")
    assert seen == ["reduce-overhead"]


def test_paths_that_cannot_be_written_and_bad_counts_are_one_line_errors(tmp_path, tiny_sort_overrides, capsys):
    """An --out under a file, a sequence length the model cannot hold, an eval override it would
    ignore: exit 2 with one line on stderr, no traceback and no run directory left behind; eval
    --batches 0 and generate --max-new-tokens 0 are argument errors."""
    from parallax.cli.main import main

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, fragment in [
        (["train", "--out", str(a_file / "run"), *tiny_sort_overrides], "Not a directory"),
        (["train", "--out", str(tmp_path / "short"), *tiny_sort_overrides, "model.max_seq_len=4"],
         "model.max_seq_len=4 is shorter than the data's sequences"),
        (["eval", str(tmp_path), "train.steps=5"], "eval takes model.KEY=VALUE or data.KEY=VALUE overrides only"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "short").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path), "--batches", "0"])
    assert exit_info.value.code == 2 and "--batches: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path), "--prompt", "a", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2 and "--max-new-tokens: must be at least 1" in capsys.readouterr().err


def test_swap_block_size_shorter_than_the_data_is_a_one_line_error(tmp_path, tiny_sort_overrides, capsys):
    """swap's context is model.block_size, checked against the data as model.max_seq_len is."""
    from parallax.cli.main import main

    swap = ["model.name=swap", "model.n_embd=32", "model.n_layer=1", "model.n_head=2", "model.n_kv_heads=1"]
    over = [o for o in tiny_sort_overrides if not o.startswith(("model.", "train.steps="))] + swap + ["train.steps=1"]
    assert main(["train", "--out", str(tmp_path / "short"), *over, "model.block_size=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.block_size=4 is shorter than the data's sequences" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "short").exists()
    assert main(["train", "--out", str(tmp_path / "fits"), *over, "model.block_size=16"]) == 0


def test_reused_out_and_a_killed_save_leave_no_mixed_logs_or_stale_folders(tmp_path, tiny_sort_overrides, capsys):
    """A new run in a folder that holds an earlier run's logs but no checkpoint is refused (its
    metrics would follow the old ones); a half-written checkpoint folder left by a killed save is
    removed by the next save; with train.progress=false the evaluation lines still print."""
    from parallax.errors import CheckpointError

    out = tmp_path / "run"
    stale = out / "checkpoints" / ".step_00000003.tmp-999999"
    stale.mkdir(parents=True)
    train(RunConfig.from_dict({}, tiny_sort_overrides), out)  # progress=false
    assert not stale.exists()
    assert re.search(r"step +6 .*val loss", capsys.readouterr().err)

    logs_only = tmp_path / "logs_only"
    logs_only.mkdir()
    (logs_only / "metrics.jsonl").write_text('{"step": 10, "train_loss": 1.0}\n')
    with pytest.raises(CheckpointError, match="holds the logs of an earlier run"):
        train(RunConfig.from_dict({}, tiny_sort_overrides), logs_only)
